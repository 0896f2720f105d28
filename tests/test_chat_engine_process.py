"""chat.engine_process: the chat engine in its own process, on conftest's tiny multi-LoRA ORT GenAI model.

It must behave as the in-process Engine does (same greedy text, stop, errors as one line, the cache kept across
turns), keep decoding while this process holds the GIL (why it exists), and survive the child's death.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from chat.engine import BASE, Engine, EngineError, Sampling, collect
from chat.engine_process import EngineProcess
from tests.test_chat_engine import MESSAGES, model_with_adapters


@pytest.fixture()
def chat_model(tiny_onnx):
    return tiny_onnx


@pytest.fixture()
def remote(chat_model):
    eng = EngineProcess(chat_model)
    eng.load()
    yield eng
    eng.close()


@pytest.fixture()
def in_process(chat_model):
    eng = Engine(chat_model)
    eng.load()
    yield eng
    eng.close()


def test_same_greedy_text_and_stats_as_in_process(remote, in_process):
    engine = in_process
    for adapter in (BASE, "travel", "trip_json"):
        engine.prepare_adapter(adapter)
        remote.prepare_adapter(adapter)
        engine.drop_cache()
        want_text, want = collect(engine.generate(MESSAGES, adapter, Sampling(0, 1.0, 40)))
        got_text, got = collect(remote.generate(MESSAGES, adapter, Sampling(0, 1.0, 40)))
        assert got_text == want_text
        assert (got.adapter, got.prompt_tokens, got.new_tokens, got.finish) == (
            want.adapter,
            want.prompt_tokens,
            want.new_tokens,
            want.finish,
        )
    assert remote.pid != os.getpid()
    assert remote.context_used(MESSAGES) == engine.context_used(MESSAGES)


def test_the_cache_lives_in_the_child_across_turns(remote):
    builds = remote.cache_builds
    _, first = collect(remote.generate(MESSAGES, BASE, Sampling(0, 1.0, 8)))
    follow = [*MESSAGES, {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "And Milan?"}]
    _, second = collect(remote.generate(follow, BASE, Sampling(0, 1.0, 8)))
    assert not first.cache_reused and second.cache_reused
    assert second.prefill_tokens < second.prompt_tokens
    assert remote.cache_builds == builds + 1 and len(remote.cached_tokens) > second.prompt_tokens
    remote.drop_cache()
    assert remote.cached_tokens == []


def test_stop_ends_the_reply_and_the_engine_goes_on(remote):
    stop = threading.Event()
    stream = remote.generate(MESSAGES, BASE, Sampling(0, 1.0, 5000), stop)
    next(stream)
    stop.set()
    _, stats = collect(stream)
    assert stats.finish == "stopped" and stats.new_tokens < 5000
    assert not remote.lock.locked()
    _, stats = collect(remote.generate(MESSAGES, BASE, Sampling(0, 1.0, 8)))
    assert stats.new_tokens == 8


def test_an_abandoned_stream_ends_in_the_child_too(remote):
    remote.prepare_adapter("travel")
    stream = remote.generate(MESSAGES, BASE, Sampling(0, 1.0, 100_000))
    next(stream)
    started = time.monotonic()
    stream.close()  # what the app's worker does when the app quits mid-reply
    assert time.monotonic() - started < 5, "close() waited for a 100k-token reply"
    _, stats = collect(remote.generate(MESSAGES, "travel", Sampling(0, 1.0, 8)))  # the child's lock is free
    assert stats.new_tokens == 8 and stats.adapter == "travel"


def test_errors_are_the_engines_one_liners(remote, chat_model, tmp_path):
    with pytest.raises(EngineError, match=r"^the prompt is \d+ tokens; the model's context holds 2048$"):
        collect(remote.generate([{"role": "user", "content": "word " * 3000}], BASE, Sampling(0, 1.0, 8)))
    with pytest.raises(EngineError, match="temperature must be between 0 and 5"):
        collect(remote.generate(MESSAGES, BASE, Sampling(9, 1.0, 8)))
    with pytest.raises(EngineError, match="adapter 'nope' not found"):
        remote.prepare_adapter("nope")
    broken = EngineProcess(model_with_adapters(chat_model, tmp_path / "m", garbage=("junk",)))
    try:
        broken.load()
        with pytest.raises(EngineError, match=r"junk\.onnx_adapter: not a usable adapter") as info:
            broken.prepare_adapter("junk")
        assert "\n" not in str(info.value)
        broken.prepare_adapter("travel")  # the child serves on after an error
    finally:
        broken.close()


def test_a_dead_child_fails_the_reply_in_one_line_and_the_next_reply_restarts_it(remote):
    remote.prepare_adapter("travel")
    want, _ = collect(remote.generate(MESSAGES, "travel", Sampling(0, 1.0, 16)))
    stream = remote.generate(MESSAGES, BASE, Sampling(0, 1.0, 100_000))
    next(stream)
    old = remote.pid
    os.kill(old, signal.SIGKILL)  # what a crash inside ORT looks like from here
    with pytest.raises(
        EngineError, match=r"^the model process ended \(exit code -9\); the next reply starts it again$"
    ):
        collect(stream)
    assert remote.loaded  # the app keeps its state; the next reply brings the child back
    got, stats = collect(remote.generate(MESSAGES, "travel", Sampling(0, 1.0, 16)))  # travel is loaded again
    assert remote.pid != old and got == want and stats.adapter == "travel"


def test_close_ends_the_child(chat_model):
    eng = EngineProcess(chat_model)
    eng.load()
    process = eng._process
    eng.close()
    assert process.poll() == 0
    with pytest.raises(EngineError, match="not loaded"):
        collect(eng.generate(MESSAGES, BASE, Sampling(0, 1.0, 8)))
    eng.load()  # and it can start again
    try:
        assert collect(eng.generate(MESSAGES, BASE, Sampling(0, 1.0, 4)))[1].new_tokens == 4
    finally:
        eng.close()


def decode_seconds_while_this_process_holds_the_gil(eng, hold_s: float) -> float:
    """Start a reply in a worker thread (as the app does), keep this process's GIL busy for `hold_s` (as a UI
    thread rendering), then return the reply's decode time as the engine measured it."""
    shuffled = random.Random(0).sample(range(300_000), 300_000)  # made before the reply starts: it takes a while
    done = {}
    first_piece = threading.Event()

    def reply() -> None:
        stream = eng.generate(MESSAGES, BASE, Sampling(0, 1.0, 200))
        pieces = [next(stream)]
        first_piece.set()
        done["text"], done["stats"] = collect(stream)
        done["text"] = pieces[0] + done["text"]

    worker = threading.Thread(target=reply)
    worker.start()
    assert first_piece.wait(30)
    end = time.perf_counter() + hold_s
    while time.perf_counter() < end:
        sorted(shuffled)  # one C call that keeps the GIL for tens of ms, as a long render would
    worker.join(60)
    stats = done["stats"]
    return (stats.new_tokens - 1) / stats.tokens_per_s


def test_decoding_does_not_wait_for_this_process(remote, in_process):
    """The reason for the child: while the UI's process is busy in Python, the model goes on. The in-process engine
    is the control: its reply stalls for the whole hold (it needs this process's GIL between tokens)."""
    hold_s = 1.5
    stalled = decode_seconds_while_this_process_holds_the_gil(in_process, hold_s)
    free = decode_seconds_while_this_process_holds_the_gil(remote, hold_s)
    print(f"decode of 200 tokens while this process is busy: in process {stalled:.3f} s, in the child {free:.3f} s")
    assert stalled > 2 * free
