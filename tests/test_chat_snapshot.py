"""SVG snapshots of the chat screen (pytest-textual-snapshot). Update after a deliberate UI change with
`pytest tests/test_chat_snapshot.py --snapshot-update` and look at the SVGs before committing them.

Kept deterministic: fixed terminal size, a conversation resumed from the database instead of sampled text, and
no reply generated in the session, so the status bar shows no timings ("–")."""

from __future__ import annotations

from pathlib import Path

import pytest

from chat.app import ChatApp
from chat.engine import Engine, Sampling
from chat.settings import ChatSettings
from chat.store import Message, Store
from chat.widgets.prompt import PromptInput

SIZE = (100, 32)


@pytest.fixture()
def app_with_history(tiny_onnx, tmp_path) -> ChatApp:
    model_dir = tmp_path / "tiny-onnx"  # the name the title and status bar show
    model_dir.symlink_to(Path(tiny_onnx).resolve())
    store = Store(tmp_path / "chat.sqlite")
    conv = store.create("Rome in two days", model_dir.name, "You are a helpful, concise travel assistant.")
    store.add(conv, Message("user", "Plan two days in Rome, [bold]cheaply[/bold]."))
    store.add(
        conv, Message("assistant", "**Day 1:** Colosseum, Forum.\n\n- Day 2: Vatican\n- Trastevere", "base", "done")
    )
    store.add(conv, Message("user", "Now as JSON"))
    store.add(conv, Message("assistant", '{"days": [{"day": 1, "sights": ["Colos', "trip_json", "stopped"))
    settings = ChatSettings(model_dir, "You are a helpful, concise travel assistant.", Sampling(0.7, 0.9, 256))
    return ChatApp(Engine(model_dir), store, settings, adapter="trip_json", resume=conv)


async def loaded(pilot) -> None:
    pilot.app.query_one(PromptInput).cursor_blink = False  # a blinking cursor would make the SVG flaky
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()  # model and adapter loaded: the status bar says "ready"
    await pilot.pause()


def test_main_screen_with_a_resumed_conversation(snap_compare, app_with_history):
    assert snap_compare(app_with_history, terminal_size=SIZE, run_before=loaded)
