"""chat.store: the SQLite conversation store (real sqlite files in tmp)."""

from __future__ import annotations

import sqlite3

import pytest

from chat.store import MIGRATIONS, Message, Store, StoreError, default_db_path


def test_create_add_list_resume_delete(tmp_path):
    store = Store(tmp_path / "sub" / "chat.sqlite")
    first = store.create("  Rome\nin   May ", "onnx", "Be brief.")
    second = store.create("x" * 100, "onnx", "")
    store.add(first, Message("user", "Plan Rome"))
    store.add(first, Message("assistant", "Day 1 …", "travel", "stopped"))
    listed = store.conversations()
    assert [c.id for c in listed] == [first, second]  # most recently updated first
    assert listed[0].title == "Rome in May" and listed[0].messages == 2
    assert len(listed[1].title) == 60
    assert store.messages(first) == [Message("user", "Plan Rome"), Message("assistant", "Day 1 …", "travel", "stopped")]
    store.delete(first)
    assert [c.id for c in store.conversations()] == [second]
    assert store.messages(first) == []  # messages went with it (ON DELETE CASCADE)
    with pytest.raises(StoreError, match="not found"):
        store.get(first)


def test_reopening_keeps_data_and_schema_version(tmp_path):
    path = tmp_path / "chat.sqlite"
    store = Store(path)
    conv = store.create("t", "m", "s")
    store.add(conv, Message("user", "hi"))
    store.close()
    again = Store(path)
    assert again.messages(conv) == [Message("user", "hi")]
    assert again.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "chat.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer version"):
        Store(path)


def test_unwritable_location_is_one_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open the chat database"):
        Store(blocker / "chat.sqlite")


def test_markdown_export(tmp_path):
    store = Store(tmp_path / "chat.sqlite")
    conv = store.create("Porto", "onnx", "Be brief.")
    store.add(conv, Message("user", "A weekend in Porto?"))
    store.add(conv, Message("assistant", "Ribeira, then port cellars.", "travel", "done"))
    store.add(conv, Message("assistant", '{"city": "Por', "trip_json", "stopped"))
    md = store.to_markdown(conv)
    assert md.startswith("# Porto\n")
    assert "## You\n\nA weekend in Porto?" in md
    assert "## Assistant · travel\n\nRibeira, then port cellars." in md
    assert "## Assistant · trip_json (stopped)" in md


def test_default_path_follows_env(monkeypatch, tmp_path):
    monkeypatch.delenv("OLIVE_CHAT_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_db_path() == tmp_path / "olive-lab" / "chat.sqlite"
    monkeypatch.setenv("OLIVE_CHAT_DB", str(tmp_path / "x.sqlite"))
    assert default_db_path() == tmp_path / "x.sqlite"


def test_resume_last_from_the_command_line(tiny_onnx, tmp_path):
    from chat.__main__ import build_app, parse_args

    db = tmp_path / "chat.sqlite"
    store = Store(db)
    store.create("old", "onnx", "")
    newest = store.create("new", "onnx", "")
    store.close()
    app = build_app(parse_args(["--model", str(tiny_onnx), "--db", str(db), "--resume", "last"]))
    assert app.resume_at_start == newest
    with pytest.raises(StoreError, match=r"chat\.sqlite: conversation 99 not found"):
        build_app(parse_args(["--model", str(tiny_onnx), "--db", str(db), "--resume", "99"]))
