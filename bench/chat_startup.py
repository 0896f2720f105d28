"""Chat startup: seconds from launching `python -m chat` to a prompt that takes keys (goal <= 2 s).

The model loads in a background worker, so the prompt is usable before the model is; the model's load time
and the time to "ready" are reported beside it, not counted. Each sample is a fresh interpreter (imports count),
run headless at 120x40: the clock starts in the parent just before the spawn and stops once a typed key has
landed in the focused prompt. Baseline, measured in the same run: a bare Textual app with one TextArea.

    python -m bench.chat_startup [--model DIR | --tiny] [--runs 5]

Prints the numbers and writes bench/results/chat_startup.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "chat_startup.json"
GOAL_S = 2.0
SIZE = (120, 40)


async def _type_and_time(pilot, t0: float) -> dict:
    from textual.widgets import TextArea

    await pilot.press("h")
    prompt = pilot.app.focused
    assert isinstance(prompt, TextArea) and prompt.text == "h", f"the key did not reach the prompt ({prompt!r})"
    return {"usable_s": time.time() - t0}


def child_baseline(t0: float) -> dict:
    from textual.app import App
    from textual.widgets import Footer, TextArea

    class Bare(App):
        AUTO_FOCUS = "TextArea"

        def compose(self):
            yield TextArea()
            yield Footer()

    async def pilot_fn(pilot):
        pilot.app.exit(await _type_and_time(pilot, t0))

    return Bare().run(headless=True, size=SIZE, auto_pilot=pilot_fn)


def child_chat(t0: float, model: str, db: str) -> dict:
    from chat.__main__ import build_app, parse_args

    app = build_app(parse_args(["--model", model, "--db", db]))

    async def pilot_fn(pilot):
        result = await _type_and_time(pilot, t0)
        await pilot.app.workers.wait_for_complete()  # the model load
        await pilot.pause()
        result["ready_s"] = time.time() - t0
        result["model_load_s"] = pilot.app.engine.load_s
        result["load_error"] = pilot.app.load_error
        pilot.app.exit(result)

    return app.run(headless=True, size=SIZE, auto_pilot=pilot_fn)


def sample(kind: str, model: str | None, db: str) -> dict:
    t0 = time.time()
    cmd = [sys.executable, __file__, "--child", kind, "--t0", repr(t0), "--db", db]
    cmd += ["--model", model] if model else []
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"chat_startup: {kind} run failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_model(workdir: Path) -> Path:
    """The tests' tiny model (random 2-layer Llama, int4 ONNX, two random adapters): seconds to build."""
    import yaml

    from olive_lab.base_model import materialize
    from olive_lab.lora import random_adapter
    from olive_lab.onnx.export import build_onnx

    base = workdir / "base"
    materialize(yaml.safe_load((ROOT / "conf/model/tiny.yaml").read_text()), base)
    adapters = {name: random_adapter(base, workdir / name, seed) for seed, name in enumerate(["travel", "trip_json"])}
    build_onnx(
        base, workdir / "onnx", adapters, precision="int4", block_size=32, accuracy_level=4, execution_provider="cpu"
    )
    return workdir / "onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: params chat.model_dir)")
    parser.add_argument("--tiny", action="store_true", help="build and use the tests' tiny model")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--child", choices=["baseline", "chat"], help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = child_baseline(args.t0) if args.child == "baseline" else child_chat(args.t0, args.model, args.db)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            print("building the tiny model …", flush=True)
            model = str(tiny_model(Path(tmp)))
        else:
            from chat.engine import EngineError, model_files
            from chat.settings import from_params
            from olive_lab.params import load_params

            model = args.model or str(from_params(load_params()).model_dir)
            try:
                model_files(model)
            except EngineError as exc:
                raise SystemExit(f"chat_startup: {exc} (or run with --tiny)") from None
        db = str(Path(tmp) / "chat.sqlite")
        sample("chat", model, db)  # warm the OS file cache once, like any second launch
        runs = [(sample("baseline", None, db), sample("chat", model, db)) for _ in range(args.runs)]

    errors = {r["load_error"] for _, r in runs if r["load_error"]}
    if errors:
        raise SystemExit(f"chat_startup: the model failed to load: {errors.pop()}")
    baseline = statistics.median(b["usable_s"] for b, _ in runs)
    usable = statistics.median(c["usable_s"] for _, c in runs)
    ready = statistics.median(c["ready_s"] for _, c in runs)
    load = statistics.median(c["model_load_s"] for _, c in runs)
    result = {
        "model": model if not args.tiny else "tiny (tests' random int4 model)",
        "runs": args.runs,
        "usable_prompt_s": round(usable, 3),
        "baseline_bare_textarea_s": round(baseline, 3),
        "ratio_vs_baseline": round(usable / baseline, 2),
        "model_load_s": round(load, 3),
        "ready_s": round(ready, 3),
        "goal_s": GOAL_S,
        "goal_met": usable <= GOAL_S,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"usable prompt     {usable:.3f} s  (median of {args.runs}, model load excluded)")
    print(f"bare Textual app  {baseline:.3f} s  -> ratio {usable / baseline:.2f}x")
    print(f"model load        {load:.3f} s  (in the background; 'ready' at {ready:.3f} s)")
    print(f"goal <= {GOAL_S:.1f} s    {'met' if usable <= GOAL_S else 'MISSED'}")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
