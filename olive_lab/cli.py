"""The wrapper every entry point (stages/, tools/) runs under: logging, one-line errors, exit codes."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from olive_lab.errors import StageError

NOISY_LOGGERS = ("httpx", "urllib3", "azure", "filelock")
SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "fish"}
WATCH_S = 0.5  # how often a stage looks whether the process that started it is still there


class Terminated(BaseException):
    """SIGTERM or SIGHUP as an exception, like KeyboardInterrupt for SIGINT: `finally` blocks and atomic_dir clean up
    (Python's default for SIGTERM ends the process on the spot, leaving `.partial` folders behind)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _launcher() -> tuple[int, int | None]:
    """(our parent, and when that parent is only a `sh -c` wrapper, the wrapper's parent): DVC runs a stage's cmd
    through $SHELL -c, and a shell that does not exec its command stays between DVC and the stage."""
    parent = os.getppid()
    try:
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return parent, None
    wrapper = os.path.basename(argv[0].decode(errors="replace")) in SHELLS and b"-c" in argv[1:]
    return parent, _parent_of(parent) if wrapper else None


@contextlib.contextmanager
def stops_cleanly(name: str) -> Iterator[None]:
    """SIGTERM and SIGHUP raise Terminated, and if the process that started this one (DVC, a shell) dies, this one
    stops as if it had sent SIGTERM: `kill <dvc pid>` would otherwise leave the stage running on as an orphan,
    writing outputs nobody records. Only in the main thread; handlers are restored on the way out (tests call
    entry points in-process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    parent, grandparent = _launcher()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(WATCH_S):
            if os.getppid() != parent or (grandparent is not None and _parent_of(parent) != grandparent):
                gone = parent if os.getppid() != parent else grandparent
                print(f"{name}: the process that started it (pid {gone}) has exited: stopping", file=sys.stderr)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    if parent > 1:  # else started by init or a container's pid 1: nothing to watch
        threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def entry_point(fn: Callable[[list[str]], None]) -> Callable[[list[str] | None], None]:
    """Wrap an entry point: errors end as one line on stderr and exit 1, Ctrl+C as exit 130, SIGTERM as 143 (after
    `finally` blocks and atomic_dir have cleaned up); the process stops too when the one that started it dies.

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
            with stops_cleanly(name):
                fn(sys.argv[1:] if argv is None else argv)
        except StageError as exc:
            if debug:
                raise
            print(f"{name}: error: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print(f"{name}: interrupted", file=sys.stderr)
            sys.exit(130)
        except Terminated as exc:
            print(f"{name}: terminated ({signal.Signals(exc.signum).name})", file=sys.stderr)
            sys.exit(128 + exc.signum)
        except Exception as exc:  # a bug or an environment problem: still one line, traceback on request
            if debug:
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"{name}: error: {type(exc).__name__}: {msg} (STAGE_DEBUG=1 shows the traceback)", file=sys.stderr)
            sys.exit(1)

    return run
