"""Conversations in SQLite: list, resume, delete, export to Markdown.

Schema changes go in MIGRATIONS (index = PRAGMA user_version), so an old database upgrades in place.
Used from the UI thread only (sqlite3 connections are per-thread).
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

DB_ENV = "OLIVE_CHAT_DB"

MIGRATIONS = [
    """
    CREATE TABLE conversation (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        model TEXT NOT NULL,
        system_prompt TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE message (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversation(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        adapter TEXT,               -- which adapter wrote an assistant reply
        finish TEXT,                -- done | length | stopped
        created_at REAL NOT NULL
    );
    CREATE INDEX message_by_conversation ON message(conversation_id, id);
    """,
]


def default_db_path() -> Path:
    if os.environ.get(DB_ENV):
        return Path(os.environ[DB_ENV])
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "olive-lab" / "chat.sqlite"


@dataclass
class Conversation:
    id: int
    title: str
    model: str
    system_prompt: str
    updated_at: float
    messages: int = 0


@dataclass
class Message:
    role: str
    content: str
    adapter: str | None = None
    finish: str | None = None


class StoreError(Exception):
    pass


class Store:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the chat database: {exc}") from exc

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(f"{self.path}: written by a newer version (schema {version})")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self.db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")

    def close(self) -> None:
        self.db.close()

    def create(self, title: str, model: str, system_prompt: str) -> int:
        now = time.time()
        title = " ".join(title.split())[:60] or "untitled"
        with self.db:
            cur = self.db.execute(
                "INSERT INTO conversation (title, model, system_prompt, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (title, model, system_prompt, now, now),
            )
        return int(cur.lastrowid)

    def add(self, conversation_id: int, message: Message) -> None:
        now = time.time()
        with self.db:
            self.db.execute(
                "INSERT INTO message (conversation_id, role, content, adapter, finish, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (conversation_id, message.role, message.content, message.adapter, message.finish, now),
            )
            self.db.execute("UPDATE conversation SET updated_at = ? WHERE id = ?", (now, conversation_id))

    def set_system_prompt(self, conversation_id: int, system_prompt: str) -> None:
        with self.db:
            self.db.execute("UPDATE conversation SET system_prompt = ? WHERE id = ?", (system_prompt, conversation_id))

    _SELECT = (
        "SELECT c.id, c.title, c.model, c.system_prompt, c.updated_at, COUNT(m.id) FROM conversation c "
        "LEFT JOIN message m ON m.conversation_id = c.id"
    )

    def conversations(self) -> list[Conversation]:
        rows = self.db.execute(f"{self._SELECT} GROUP BY c.id ORDER BY c.updated_at DESC, c.id DESC").fetchall()
        return [Conversation(*row) for row in rows]

    def get(self, conversation_id: int) -> Conversation:
        row = self.db.execute(f"{self._SELECT} WHERE c.id = ? GROUP BY c.id", (conversation_id,)).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: conversation {conversation_id} not found")
        return Conversation(*row)

    def messages(self, conversation_id: int) -> list[Message]:
        rows = self.db.execute(
            "SELECT role, content, adapter, finish FROM message WHERE conversation_id = ? ORDER BY id",
            (conversation_id,),
        ).fetchall()
        return [Message(*row) for row in rows]

    def delete(self, conversation_id: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM conversation WHERE id = ?", (conversation_id,))

    def to_markdown(self, conversation_id: int) -> str:
        conv = self.get(conversation_id)
        out = [f"# {conv.title}", "", f"Model: `{conv.model}`", "", f"> System: {conv.system_prompt}", ""]
        for msg in self.messages(conversation_id):
            if msg.role == "user":
                out += ["## You", "", msg.content, ""]
            else:
                note = " (stopped)" if msg.finish == "stopped" else ""
                out += [f"## Assistant · {msg.adapter}{note}", "", msg.content, ""]
        return "\n".join(out)
