"""The chat engine in a process of its own, behind the interface of `chat.engine.Engine` that the app uses.

Why: ORT GenAI's Python binding holds the GIL for the whole of `generate_next_token`. With ORT on one thread and a
free core beside it, a pure-Python loop in another thread ran at 9 % of its speed while a reply was generating. In
one process, then, every millisecond the UI thread renders is a millisecond the model waits. That cost is small at
70 tok/s on 2 CPU cores. On an H200 (a 2.5 ms step), the app decoded at 0.81x the engine alone
(bench/results/2026-12-02-chat.json, issue #23). Here the model runs in a spawned child process that streams a
reply's pieces through a pipe without ever waiting for the UI.

Protocol (two pipes, one each way, framed and pickled by multiprocessing.connection): the parent sends (call_id, method, args). The child runs each
call in a thread of its own, so a quick call such as `encode` is answered while a reply streams, as in one process;
the child's Engine lock still allows one load, adapter or reply at a time. The child answers (call_id, kind,
value):
- "ok": a call's result;
- "error": an EngineError's line;
- "piece": text streamed by `generate`, many per call;
- "done": `generate`'s ReplyStats.
(call_id, "stop", ()) ends a streaming reply before its next token. A reader thread in the parent routes the answers
to a queue per call. If the child dies (a crash inside ORT, say), every waiting call fails with one EngineError line,
and the next `generate` starts a new child and loads the model and the adapters it had again.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

from chat.engine import BASE, MAX_CONTEXT, Engine, EngineError, Sampling, one_line

ROOT = Path(__file__).resolve().parents[1]  # where `chat` imports from, for the child
STOP_POLL_S = 0.02  # how often a waiting `generate` looks at its stop event: Esc ends a reply within this
CLOSE_WAIT_S = 5.0
# the child's answers to these, read-only and quick; everything else a caller may run is a method below
STATE = ("cached_tokens", "prefilled_tokens", "cache_builds")
CALLS = ("load", "prepare_adapter", "render", "encode", "fit", "drop_cache", "state")


def serve(calls, answers, model_dir: str, max_context: int) -> None:
    """The child process: one Engine, each call in its own thread, until the parent says "exit" or goes away."""
    engine = Engine(model_dir, max_context)
    send_lock = threading.Lock()
    stops: dict[int, threading.Event] = {}

    def answer(call_id: int, kind: str, value) -> None:
        with send_lock:
            answers.send((call_id, kind, value))

    def run(call_id: int, method: str, args: tuple) -> None:
        try:
            if method == "generate":
                stream = engine.generate(*args, stop=stops[call_id])
                while True:
                    try:
                        piece = next(stream)
                    except StopIteration as done:
                        answer(call_id, "done", done.value)
                        return
                    answer(call_id, "piece", piece)
            elif method == "state":
                answer(call_id, "ok", {name: getattr(engine, name) for name in STATE})
            else:
                answer(call_id, "ok", getattr(engine, method)(*args))
        except EngineError as exc:
            answer(call_id, "error", str(exc))
        except Exception as exc:  # noqa: BLE001 - the parent shows one line, the child serves on
            answer(call_id, "error", f"{method} failed: {type(exc).__name__}: {one_line(exc)}")
        finally:
            stops.pop(call_id, None)

    while True:
        try:
            call_id, method, args = calls.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        if method == "exit":
            break
        if method == "stop":
            if call_id in stops:
                stops[call_id].set()
            continue
        if method == "generate":
            stops[call_id] = threading.Event()
        threading.Thread(target=run, args=(call_id, method, args), daemon=True, name=f"call-{call_id}").start()
    # No interpreter teardown: a generation thread may still be inside ORT, whose objects must not be freed under it.
    os._exit(0)


class EngineProcess:
    """`Engine`'s interface, with the model in a child process. Construction reads the model's files only (the same
    errors as Engine, before any UI); the child starts at `load()`."""

    def __init__(self, model_dir: Path | str, max_context: int = MAX_CONTEXT):
        files = Engine(model_dir, max_context)  # config checks and metadata; loads nothing
        self.model_dir, self.model_path, self.adapter_files = files.model_dir, files.model_path, files.adapter_files
        self.genai_config, self.ep = files.genai_config, files.ep
        self.context_length, self.model_context_length = files.context_length, files.model_context_length
        self.max_context = max_context
        self.lock = threading.Lock()  # one load, adapter or reply at a time, as Engine's (and the app's tests) expect
        self.load_s: float | None = None
        self._loaded = False
        self._prepared: set[str] = set()  # adapters the child has loaded: a restarted child loads them again
        self._process = None
        self._calls_out = None  # parent -> child
        self._answers_in = None  # child -> parent
        self._send_lock = threading.Lock()
        self._waiting: dict[int, queue.SimpleQueue] = {}
        self._ids = itertools.count(1)
        self._gone: str | None = "the model process is not started"

    # ---------------------------------------------------------------- what the app reads
    @property
    def name(self) -> str:
        return self.model_dir.name

    @property
    def adapter_names(self) -> list[str]:
        return [BASE, *self.adapter_files]

    @property
    def loaded(self) -> bool:
        """True once loaded, also after the child died: the next reply starts a new one."""
        return self._loaded

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # ---------------------------------------------------------------- the child and its pipes
    def _start(self) -> None:
        # A plain `python -m chat.engine_process`, not multiprocessing's spawn, which re-imports the caller's main
        # module and so fails in any script without a __main__ guard. The pipes are two inherited file descriptors.
        calls_in, calls_out = os.pipe()
        answers_in, answers_out = os.pipe()
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "chat.engine_process",
                    str(calls_in),
                    str(answers_out),
                    str(self.model_dir),
                    str(self.max_context),
                ],
                stdin=subprocess.DEVNULL,  # the terminal's keys are the UI's
                pass_fds=(calls_in, answers_out),
                env=env,
            )
        except OSError as exc:
            for fd in (calls_in, calls_out, answers_in, answers_out):
                os.close(fd)
            raise EngineError(f"cannot start the model process: {one_line(exc)}") from exc
        os.close(calls_in)  # the child's ends: once it exits, a read here sees EOF
        os.close(answers_out)
        self._process = process
        self._calls_out = Connection(calls_out, readable=False)
        answers = Connection(answers_in, writable=False)
        self._gone = None
        threading.Thread(target=self._route, args=(process, answers), daemon=True, name="chat-engine-answers").start()

    def _route(self, process, answers_in) -> None:
        """Reader thread: each answer to the queue of its call; when the child goes, an error to every waiting one."""
        try:
            while True:
                call_id, kind, value = answers_in.recv()
                waiting = self._waiting.get(call_id)
                if waiting is not None:
                    waiting.put((kind, value))
        except (EOFError, OSError):
            pass
        answers_in.close()
        try:
            code = process.wait(CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:  # its pipe closed but it lives on: end it
            process.kill()
            code = process.wait()
        if self._process is not process:  # an old child, replaced after it died
            return
        self._gone = f"the model process ended (exit code {code})" + (
            "" if code == 0 else "; the next reply starts it again"
        )
        for waiting in list(self._waiting.values()):  # _gone is set first: a call registered later sees it
            waiting.put(("error", self._gone))

    def _open(self) -> tuple[int, queue.SimpleQueue]:
        call_id, waiting = next(self._ids), queue.SimpleQueue()
        self._waiting[call_id] = waiting
        if self._gone:
            del self._waiting[call_id]
            raise EngineError(self._gone)
        return call_id, waiting

    def _send(self, call_id: int, method: str, args: tuple = ()) -> None:
        try:
            with self._send_lock:
                self._calls_out.send((call_id, method, args))
        except (OSError, ValueError) as exc:  # a closed or broken pipe: the child is gone
            raise EngineError(self._gone or f"the model process is unreachable: {one_line(exc)}") from exc

    def _call(self, method: str, *args):
        assert method in CALLS, method
        call_id, waiting = self._open()
        try:
            self._send(call_id, method, args)
            kind, value = waiting.get()
        finally:
            self._waiting.pop(call_id, None)
        if kind == "error":
            raise EngineError(value)
        return value

    def _revive(self) -> None:
        """A new child after the old one died, with the model and the adapters it had (caller holds the lock)."""
        self._start()
        self._call("load")
        for name in sorted(self._prepared):
            self._call("prepare_adapter", name)

    # ---------------------------------------------------------------- Engine's interface
    def load(self) -> float:
        start = time.perf_counter()
        with self.lock:
            if self._gone:
                self._start()
            self._call("load")
            self._prepared = set()
            self._loaded = True
        self.load_s = time.perf_counter() - start
        return self.load_s

    def _require_loaded(self) -> None:
        if not self._loaded:
            raise EngineError("the model is not loaded")

    def prepare_adapter(self, name: str) -> None:
        self._require_loaded()
        if name == BASE or name in self._prepared:
            return
        if name not in self.adapter_files:
            raise EngineError(f"adapter '{name}' not found in {self.model_dir / 'adapters'}")
        with self.lock:
            if self._gone:
                self._revive()
            self._call("prepare_adapter", name)
            self._prepared.add(name)

    def render(self, messages: list[dict[str, str]]) -> str:
        self._require_loaded()
        return self._call("render", messages)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        self._require_loaded()
        return self._call("encode", messages)

    def fit(self, messages: list[dict[str, str]], room: int, slack: int = 0) -> tuple[list[int], int]:
        self._require_loaded()
        return tuple(self._call("fit", messages, room, slack))

    def context_used(self, messages: list[dict[str, str]]) -> int:
        return len(self.encode(messages)) if self.loaded and messages else 0

    def drop_cache(self) -> None:
        if not self._gone:
            self._call("drop_cache")

    def _state(self) -> dict:
        return self._call("state") if not self._gone else dict.fromkeys(STATE, 0) | {"cached_tokens": []}

    @property
    def cached_tokens(self) -> list[int]:
        return self._state()["cached_tokens"]

    @property
    def prefilled_tokens(self) -> int:
        return self._state()["prefilled_tokens"]

    @property
    def cache_builds(self) -> int:
        return self._state()["cache_builds"]

    def generate(
        self, messages: list[dict[str, str]], adapter: str, sampling: Sampling, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """As Engine.generate: stream the reply's text; StopIteration's value is the ReplyStats; `stop.set()` ends
        it before the next token. The child never waits for this side: pieces queue up until read."""
        self._require_loaded()
        sampling.check()
        stop = stop or threading.Event()
        with self.lock:
            if self._gone:
                self._revive()
            call_id, waiting = self._open()
            stopped, finished = False, False
            try:
                self._send(call_id, "generate", (messages, adapter, sampling))
                while True:
                    if stop.is_set() and not stopped:
                        self._send(call_id, "stop")
                        stopped = True
                    try:
                        kind, value = waiting.get(timeout=STOP_POLL_S)
                    except queue.Empty:
                        continue
                    if kind == "piece":
                        yield value
                    elif kind == "done":
                        finished = True
                        return value
                    else:
                        finished = True
                        raise EngineError(value)
            finally:
                if not finished:  # abandoned mid-stream (closed, or the app quit): end it in the child too
                    self._drain(call_id, waiting)
                self._waiting.pop(call_id, None)

    def _drain(self, call_id: int, waiting: queue.SimpleQueue) -> None:
        """Stop an abandoned reply and wait for its end, so the child's lock is free for the next call."""
        try:
            self._send(call_id, "stop")
        except EngineError:
            return
        deadline = time.monotonic() + CLOSE_WAIT_S
        while time.monotonic() < deadline:
            try:
                kind, _ = waiting.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                return
            if kind in ("done", "error"):
                return

    def close(self) -> None:
        """End the child (a reply still streaming ends with it). The engine can `load()` again later."""
        process = self._process
        if process is None:
            return
        self._gone = "the model process was closed"
        try:
            with self._send_lock:
                self._calls_out.send((0, "exit", ()))
        except (OSError, ValueError):
            pass
        try:
            process.wait(CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._calls_out.close()
        self._loaded = False
        self._prepared = set()


def main(argv: list[str]) -> None:
    """`python -m chat.engine_process CALLS_FD ANSWERS_FD MODEL_DIR MAX_CONTEXT`: the child, started by EngineProcess."""
    calls_fd, answers_fd, model_dir, max_context = argv
    # Ctrl+C is the UI's to handle (the app ends this process); a signal to the whole process group must not print a
    # traceback over the screen
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    calls = Connection(int(calls_fd), writable=False)
    answers = Connection(int(answers_fd), readable=False)
    try:
        serve(calls, answers, model_dir, int(max_context))
    except EngineError as exc:  # the parent read the same files a moment ago: only a change since then gets here
        print(f"chat.engine_process: error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
