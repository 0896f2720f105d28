"""The wrapper every entry point (stages/, tools/) runs under: logging, one-line errors, exit codes."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

from olive_lab.errors import StageError

NOISY_LOGGERS = ("httpx", "urllib3", "azure", "filelock")


def entry_point(fn: Callable[[list[str]], None]) -> Callable[[list[str] | None], None]:
    """Wrap an entry point: errors end as one line on stderr and exit 1, Ctrl+C as exit 130.

    STAGE_DEBUG=1 re-raises instead, to see the traceback.
    """

    @functools.wraps(fn)
    def run(argv: list[str] | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)
        debug = os.environ.get("STAGE_DEBUG") == "1"
        module = sys.modules.get(fn.__module__)
        spec = getattr(module, "__spec__", None)  # under `python -m`, __module__ is "__main__"
        name = (spec.name if spec else fn.__module__).rsplit(".", 1)[-1]
        try:
            fn(sys.argv[1:] if argv is None else argv)
        except StageError as exc:
            if debug:
                raise
            print(f"{name}: error: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print(f"{name}: interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as exc:  # a bug or an environment problem: still one line, traceback on request
            if debug:
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"{name}: error: {type(exc).__name__}: {msg} (STAGE_DEBUG=1 shows the traceback)", file=sys.stderr)
            sys.exit(1)

    return run
