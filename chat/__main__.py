"""python -m chat [--model DIR] [--adapter NAME] [--db FILE]: the terminal chat on the ONNX model.

Defaults come from params.yaml `chat.*` (model_dir, system_prompt, temperature, top_p, max_new_tokens).
Anything wrong before the UI starts (no model, unknown adapter, bad params) is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chat.engine import BASE, MAX_CONTEXT, Engine, EngineError
from chat.engine_process import EngineProcess
from chat.settings import from_params
from chat.store import DB_ENV, Store, StoreError, default_db_path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (model/ + adapters/); default: params chat.model_dir")
    parser.add_argument("--adapter", default=BASE, help=f"adapter for the first reply (default: {BASE})")
    parser.add_argument("--db", help=f"conversation database (default: ${DB_ENV} or {default_db_path()})")
    parser.add_argument("--params", default="params.yaml", help="params file with the chat section")
    parser.add_argument("--resume", metavar="ID|last", help="reopen a saved conversation (ids: the F3 list)")
    parser.add_argument("--export-dir", default=".", help="where Markdown exports go (default: here)")
    parser.add_argument(
        "--max-context",
        type=int,
        default=MAX_CONTEXT,
        metavar="TOKENS",
        help=f"longest history kept, when the model allows more (default: {MAX_CONTEXT}; its KV cache is allocated whole)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the model in the UI's process (default: its own, so rendering never holds up decoding)",
    )
    return parser.parse_args(argv)


def build_app(args: argparse.Namespace):
    """Everything that can fail without a screen, checked before the UI starts."""
    from olive_lab.errors import StageError
    from olive_lab.params import load_params

    try:
        settings = from_params(load_params(args.params), args.params)
    except StageError as exc:
        raise EngineError(str(exc)) from exc
    if args.model:
        settings.model_dir = Path(args.model)
    if args.max_context < 16:
        raise EngineError(f"--max-context: expected at least 16 tokens, not {args.max_context}")
    engine_class = Engine if args.in_process else EngineProcess
    engine = engine_class(settings.model_dir, args.max_context)  # ModelMissing names the command that builds it
    if args.adapter not in engine.adapter_names:
        found = ", ".join(engine.adapter_names)
        raise EngineError(f"adapter '{args.adapter}' not found in {settings.model_dir / 'adapters'} (have: {found})")
    store = Store(Path(args.db) if args.db else default_db_path())
    resume = None
    if args.resume == "last":
        saved = store.conversations()
        resume = saved[0].id if saved else None
    elif args.resume is not None:
        if not args.resume.isdigit():
            raise EngineError(f"--resume: expected a conversation id or 'last', not '{args.resume}'")
        resume = store.get(int(args.resume)).id  # StoreError names a missing one

    from chat.app import ChatApp  # Textual only once the checks have passed

    return ChatApp(engine, store, settings, adapter=args.adapter, export_dir=args.export_dir, resume=resume)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        app = build_app(args)
    except (EngineError, StoreError) as exc:
        print(f"chat: error: {exc}", file=sys.stderr)
        return 1
    try:
        app.run()
    finally:
        app.store.close()
        app.engine.close()
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
