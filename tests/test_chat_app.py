"""The Textual chat app driven by Pilot on conftest's tiny multi-LoRA ORT GenAI model."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from textual import events
from textual.widgets import Input, Markdown, Select

from chat.app import ChatApp
from chat.engine import Sampling
from chat.engine_process import EngineProcess
from chat.screens.conversations import ConversationsScreen
from chat.screens.help import HelpScreen
from chat.screens.settings import SettingsScreen
from chat.settings import ChatSettings
from chat.store import Store
from chat.widgets.messages import AssistantMessage, ErrorRow, UserMessage
from chat.widgets.prompt import PromptInput
from chat.widgets.status import StatusBar
from tests.test_chat_engine import model_with_adapters

pytestmark = pytest.mark.anyio  # async tests run on asyncio through anyio's pytest plugin

ROOT = Path(__file__).resolve().parents[1]
SIZE = (110, 36)


@pytest.fixture()
def make_app(tiny_onnx, tmp_path):
    """The app as `make chat` runs it: the model in its own process (chat.engine_process)."""
    engines = []

    def make(model_dir: Path | None = None, max_new_tokens: int = 24, **kwargs) -> ChatApp:
        model_dir = Path(model_dir or tiny_onnx)
        settings = ChatSettings(model_dir, "Be brief.", Sampling(0.8, 0.95, max_new_tokens))
        store = Store(tmp_path / "chat.sqlite")
        engines.append(EngineProcess(model_dir))
        return ChatApp(engines[-1], store, settings, export_dir=tmp_path / "exports", **kwargs)

    yield make
    for engine in engines:
        engine.close()


async def settle(pilot) -> None:
    """Let messages run, wait for every worker (model load, adapter load, reply), then let their messages land."""
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def send(pilot, text: str) -> AssistantMessage:
    app = pilot.app
    started = app._reply_ids
    app.query_one(PromptInput).insert(text)
    await pilot.press("enter")
    await until(pilot, lambda: app._reply_ids > started and app.reply is None, "the reply to finish")
    await settle(pilot)
    return app.query(AssistantMessage).last()


async def until(pilot, condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.01)


def press_enter_now(app: ChatApp, text: str) -> None:
    """Type `text` and press Enter without Pilot's wait for an idle CPU (which would outlast a 2000-token reply)."""
    prompt = app.query_one(PromptInput)
    prompt.insert(text)
    prompt.post_message(events.Key("enter", None))


def stop_key(app: ChatApp):
    from textual.widgets._footer import FooterKey

    return next(key for key in app.query(FooterKey) if key.action == "stop")


def labels(app: ChatApp) -> list[str]:
    return [str(w.query_one(".who").render()) for w in app.query(AssistantMessage)]


def errors(app: ChatApp) -> list[str]:
    return [n.message for n in app._notifications if n.severity == "error"]


async def test_send_streams_a_reply_and_saves_it(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(app.focused, PromptInput)
        await pilot.press(*"hello")  # typed, not inserted: the prompt takes keys at start
        reply = await send(pilot, " there")
        assert [str(u.render()) for u in app.query(UserMessage)] == ["hello there"]
        assert labels(app) == ["assistant · base"]
        assert reply.text.strip()
        assert reply.query_one(Markdown).source == reply.text  # everything streamed reached the screen
        assert app.query_one(PromptInput).text == ""
        status = app.query_one(StatusBar)
        assert status.state == "ready" and status.tokens_per_s > 0 and status.ttft_s > 0
        assert status.context_used == app.last_stats.prompt_tokens + app.last_stats.new_tokens
        saved = app.store.messages(app.conversation_id)
        assert [(m.role, m.adapter) for m in saved] == [("user", None), ("assistant", "base")]
        assert saved[1].content == reply.text


async def test_switching_adapter_keeps_history_and_labels_the_reply(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "Where should I go in May?")
        first_prompt_tokens = app.last_stats.prompt_tokens
        await pilot.press("ctrl+t")
        await settle(pilot)
        assert app.adapter == "travel" and app.query_one("#adapter", Select).value == "travel"
        assert app.query_one(StatusBar).adapter == "travel"
        await send(pilot, "And in June?")
        assert labels(app) == ["assistant · base", "assistant · travel"]
        assert app.last_stats.adapter == "travel"
        assert app.last_stats.prompt_tokens > first_prompt_tokens + 5  # the first turn went along
        assert [m.adapter for m in app.store.messages(app.conversation_id)] == [None, "base", None, "travel"]
        await pilot.press("ctrl+t")
        await settle(pilot)
        assert app.adapter == "trip_json"
        await pilot.press("ctrl+t")
        await settle(pilot)
        assert app.adapter == "base"


async def test_escape_stops_mid_stream_and_keeps_the_partial_reply(make_app):
    app = make_app(max_new_tokens=2000)
    app.settings.sampling.temperature = 0  # greedy: the tiny model runs to max_new_tokens (~2 s), never an early end
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        press_enter_now(app, "Tell me everything about Lisbon")
        await until(pilot, lambda: app._reply_ids == 1, "the reply to start")
        await until(pilot, lambda: app.reply is None or app.reply.widget.text, "the first text on screen")
        assert app.reply is not None, "the reply ended before Esc could stop it"
        assert not stop_key(app).has_class("-disabled")  # the footer shows Esc as usable while a reply streams
        await pilot.press("escape")
        await settle(pilot)
        assert stop_key(app).has_class("-disabled")
        stats = app.last_stats
        assert stats.finish == "stopped" and stats.new_tokens < 1900
        reply = app.query(AssistantMessage).last()
        note = reply.query_one(".note")
        assert note.display and str(note.render()) == "stopped"
        assert reply.text and reply.query_one(Markdown).source == reply.text
        assert app.query_one(PromptInput).text == "Tell me everything about Lisbon"  # restored for editing
        assert app.store.messages(app.conversation_id)[-1].finish == "stopped"
        # still usable: a short second reply
        app.settings.sampling.max_new_tokens = 8
        app.query_one(PromptInput).clear()
        await send(pilot, "Shorter please")
        assert len(app.query(AssistantMessage)) == 2 and app.last_stats.finish in ("done", "length")


async def test_broken_adapters_are_one_line_errors_and_the_app_goes_on(make_app, tiny_onnx, tmp_path):
    model_dir = model_with_adapters(tiny_onnx, tmp_path / "m", garbage=("broken",), foreign=("wide",))
    app = make_app(model_dir)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        select = app.query_one("#adapter", Select)
        for name, reason in (("broken", "not a usable adapter"), ("wide", "does not fit this model")):
            select.value = name
            await settle(pilot)
            assert app.adapter == "base" and select.value == "base"  # back to the working one
            message = errors(app)[-1]
            assert f"{name}.onnx_adapter: {reason}" in message and "\n" not in message
            assert name in app.broken_adapters
        assert [label for label, _ in app._adapter_options()] == ["base", "broken ✗", "travel", "trip_json", "wide ✗"]
        await pilot.press("ctrl+t")  # cycling skips the broken ones
        await settle(pilot)
        assert app.adapter == "travel"
        await send(pilot, "Still there?")
        assert labels(app) == ["assistant · travel"] and app.last_stats.new_tokens >= 1


async def test_model_that_fails_to_load_is_an_error_row_not_a_crash(make_app, tiny_onnx, tmp_path):
    model = tmp_path / "m" / "model"
    model.mkdir(parents=True)
    for f in (tiny_onnx / "model").iterdir():
        (model / f.name).symlink_to(f.resolve())
    (model / "model.onnx").unlink()
    (model / "model.onnx").write_bytes(b"\x00not onnx")
    app = make_app(tmp_path / "m")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        rows = [str(r.render()) for r in app.query(ErrorRow)]
        assert len(rows) == 1 and "cannot load the model" in rows[0] and "\n" not in rows[0]
        assert app.query_one(StatusBar).state == "no model"
        app.query_one(PromptInput).insert("hello")
        await pilot.press("enter")
        await pilot.pause()
        assert not app.query(UserMessage) and "cannot load the model" in errors(app)[-1]
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


def test_missing_model_is_one_line_before_any_ui(tmp_path):
    db = tmp_path / "chat.sqlite"
    cmd = [sys.executable, "-m", "chat", "--model", str(tmp_path / "nothing"), "--db", str(db)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1
    assert out.stdout == ""  # no screen was drawn
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "dvc repro optimize" in lines[0] and "dvc pull optimize" in lines[0]
    assert not db.exists()


def test_unknown_adapter_is_one_line_before_any_ui(tiny_onnx, tmp_path):
    cmd = [sys.executable, "-m", "chat", "--model", str(tiny_onnx), "--adapter", "nope", "--db", str(tmp_path / "db")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    assert (
        out.stderr.strip()
        == f"chat: error: adapter 'nope' not found in {tiny_onnx / 'adapters'} (have: base, travel, trip_json)"
    )


def test_max_context_from_the_command_line(tiny_onnx, tmp_path):
    from chat.__main__ import build_app, parse_args

    base = ["--model", str(tiny_onnx), "--db", str(tmp_path / "db"), "--export-dir", str(tmp_path)]
    app = build_app(parse_args([*base, "--max-context", "512"]))
    assert app.engine.context_length == 512 and app.engine.model_context_length == 2048
    app.store.close()
    out = subprocess.run(
        [sys.executable, "-m", "chat", *base, "--max-context", "4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == "chat: error: --max-context: expected at least 16 tokens, not 4"


async def test_enter_sends_and_ctrl_j_adds_a_line(make_app):
    app = make_app(max_new_tokens=4)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("a", "ctrl+j", "b")
        assert app.query_one(PromptInput).text == "a\nb" and not app.query(UserMessage)
        await pilot.press("enter")
        await settle(pilot)
        assert [str(u.render()) for u in app.query(UserMessage)] == ["a\nb"]


async def test_adapter_from_the_command_line_is_used_first(make_app):
    app = make_app(adapter="trip_json")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.adapter == "trip_json"
        await send(pilot, "Trip to Oslo as JSON")
        assert labels(app) == ["assistant · trip_json"]


async def test_settings_screen_edits_sampling_and_rejects_bad_values(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("f2")
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#top-p", Input).value = "2"
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        assert "top_p" in str(app.screen.query_one("#settings-error").render())
        app.screen.query_one("#top-p", Input).value = "0.5"
        app.screen.query_one("#temperature", Input).value = "0"
        app.screen.query_one("#max-new-tokens", Input).value = "3"
        app.screen.query_one("#system-prompt").text = "Answer in French."
        await pilot.press("ctrl+s")
        assert not isinstance(app.screen, SettingsScreen)
        assert app.settings.sampling == Sampling(0.0, 0.5, 3) and app.settings.system_prompt == "Answer in French."
        await send(pilot, "Bonjour")
        assert app.last_stats.new_tokens <= 3
        assert app.store.get(app.conversation_id).system_prompt == "Answer in French."
        await pilot.press("f2")
        await pilot.press("escape")  # cancel keeps what was saved
        assert app.settings.sampling.max_new_tokens == 3


async def test_conversations_resume_export_copy_delete(make_app, tmp_path):
    app = make_app(max_new_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        reply = await send(pilot, "First trip")
        first_id = app.conversation_id
        await pilot.press("f5")
        assert app.clipboard == reply.text
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.conversation_id is None and not app.query(AssistantMessage)
        await pilot.press("f3")
        assert isinstance(app.screen, ConversationsScreen)
        await pilot.press("enter")
        await pilot.pause()
        assert app.conversation_id == first_id
        assert [str(u.render()) for u in app.query(UserMessage)] == ["First trip"]
        assert labels(app) == ["assistant · base"] and app.query(AssistantMessage).last().text == reply.text
        await pilot.press("f4")
        exported = list((tmp_path / "exports").glob("chat-*.md"))
        assert len(exported) == 1
        text = exported[0].read_text()
        assert "## You\n\nFirst trip" in text and "## Assistant · base" in text and reply.text.strip() in text
        await pilot.press("f3", "d")
        await pilot.pause()
        assert app.store.conversations() == []
        await pilot.press("escape")
        await pilot.pause()
        assert app.conversation_id is None and not app.query(UserMessage)  # the open one was deleted


async def test_command_palette_switches_adapter(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+p")
        await pilot.press(*"Adapter: trip")
        await pilot.pause(0.3)  # the palette searches in the background
        await pilot.press("enter")
        await settle(pilot)
        assert app.adapter == "trip_json"


async def test_help_screen_lists_the_keys(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        text = app.screen.query_one(Markdown).source
        for key in ("ctrl+t", "escape", "ctrl+j", "f2", "f3", "f4", "f5"):
            assert f"`{key}" in text


async def test_quit_during_a_reply_ends_the_generation(make_app):
    app = make_app(max_new_tokens=2000)
    app.settings.sampling.temperature = 0  # greedy: runs to max_new_tokens, so it is still going at ctrl+q
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        press_enter_now(app, "Tell me everything about Lisbon")
        # the first token, not the first text on screen: on a busy host the tiny model could finish its 2,000 tokens
        # (it decodes over 1,000 a second) while the UI is still rendering, and there would be no reply left to end
        seen = []  # the reply, taken when its first token is in: it may end soon after

        def streaming() -> bool:
            if app.reply is not None and (app.reply.pending or app.reply.widget.text):
                seen.append(app.reply)
            return bool(seen)

        await until(pilot, streaming, "the first token")
        stop = seen[0].stop
        await pilot.press("ctrl+q")
    assert stop.is_set()
    await app.workers.wait_for_complete()
    assert not app.engine.lock.locked()


async def test_generation_error_is_a_line_on_the_reply_and_the_chat_goes_on(make_app):
    app = make_app(max_new_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        reply = await send(pilot, "word " * (app.engine.context_length + 50))  # longer than the whole context
        note = str(reply.query_one(".note").render())
        assert note.startswith("⚠ the prompt is") and "context holds 2048" in note
        assert "context holds" in errors(app)[-1]
        assert app.store.messages(app.conversation_id)[-1].role == "user"  # no reply saved for the failure
        reply = await send(pilot, "Something short")  # the oversized turn is left out to fit
        assert reply.text and app.last_stats.dropped_messages == 1


def slowed(generate, seconds_per_piece: float = 0.003):
    """engine.generate streaming at most ~300 pieces a second, so a reply of the tiny model lasts long enough to
    act on while it streams, however fast the host and the UI are."""

    def stream(*args, **kwargs):
        pieces = generate(*args, **kwargs)
        while True:
            try:
                piece = next(pieces)
            except StopIteration as done:
                return done.value  # the ReplyStats
            time.sleep(seconds_per_piece)
            yield piece

    return stream


async def test_switching_the_adapter_while_a_reply_streams_applies_to_the_next_reply(make_app):
    """The streaming reply keeps the adapter it started with (label, saved row, tokens); the new one loads once the
    reply lets go of the engine and writes the next reply."""
    from chat.engine import collect

    app = make_app(max_new_tokens=2000)
    app.settings.sampling.temperature = 0  # greedy: comparable with a fresh base reply
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.engine.generate = slowed(app.engine.generate)  # the tiny model writes 2000 tokens in about a second
        press_enter_now(app, "Tell me everything about Lisbon")
        await until(pilot, lambda: app.reply is not None and app.reply.widget.text, "the first text on screen")
        messages = app.chat_messages()  # what the reply was asked with
        await pilot.press("ctrl+t")  # to travel, mid-stream
        await pilot.pause(0.2)
        assert app.reply is not None, "the reply ended before the switch"
        assert app.wanted_adapter == "travel" and app.query_one("#adapter", Select).value == "travel"
        assert app.adapter == "base"  # not before the reply lets go of the engine
        seen = len(app.reply.widget.text)
        await until(pilot, lambda: app.reply is None or len(app.reply.widget.text) > seen, "more text after it")
        await pilot.press("escape")
        await settle(pilot)
        stopped = app.query(AssistantMessage).last()
        assert labels(app) == ["assistant · base"] and app.last_stats.adapter == "base"
        assert [m.adapter for m in app.store.messages(app.conversation_id)] == [None, "base"]
        assert app.adapter == "travel" and app.query_one(StatusBar).adapter == "travel"
        del app.engine.generate  # the engine's own method again
        # every streamed token was the base model's: a fresh greedy base reply starts with the same text
        text, _ = collect(app.engine.generate(messages, "base", Sampling(0, 1.0, app.last_stats.new_tokens)))
        assert text == stopped.text
        app.settings.sampling.max_new_tokens = 8
        app.query_one(PromptInput).clear()
        await send(pilot, "And in June?")
        assert labels(app) == ["assistant · base", "assistant · travel"] and app.last_stats.adapter == "travel"


async def test_sending_while_the_adapter_still_loads_waits_and_keeps_the_prompt(make_app):
    """The engine is busy (its lock held, as during a reply) while the chosen adapter waits to load: Enter says so and
    sends nothing; once loaded, the same prompt goes out with that adapter."""
    app = make_app(max_new_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.engine.lock.acquire()
        try:
            await pilot.press("ctrl+t")
            await pilot.pause(0.2)
            assert app.wanted_adapter == "travel" and app.adapter == "base"
            app.query_one(PromptInput).insert("Two days in Porto?")
            await pilot.press("enter")
            await pilot.pause()
            warnings = [n.message for n in app._notifications if n.severity == "warning"]
            assert warnings and warnings[-1] == "Adapter travel is still loading."
            assert not app.query(UserMessage) and app.reply is None and app.conversation_id is None
            assert app.query_one(PromptInput).text == "Two days in Porto?"
        finally:
            app.engine.lock.release()
        await settle(pilot)
        assert app.adapter == "travel"
        await pilot.press("enter")
        await until(pilot, lambda: app._reply_ids == 1 and app.reply is None, "the reply to finish")
        await settle(pilot)
        assert [str(u.render()) for u in app.query(UserMessage)] == ["Two days in Porto?"]
        assert labels(app) == ["assistant · travel"] and app.last_stats.adapter == "travel"
