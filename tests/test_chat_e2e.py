"""End to end: the real `python -m chat` in a real terminal (tmux), on conftest's tiny ORT GenAI model."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 60


class Tmux:
    """One private tmux server (its own socket), so parallel runs and the user's sessions never meet."""

    def __init__(self, name: str):
        if shutil.which("tmux") is None:
            pytest.fail("tmux is not installed (apt-get install tmux); the end-to-end chat test needs it")
        self.socket = f"{name}-{os.getpid()}"
        # Something in the test session exports COLUMNS=80/LINES=24; Textual would believe them over the pane.
        self.env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}

    def __call__(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10, env=self.env
        )
        return out.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "chat")

    def dead(self) -> bool:
        """The app's process has exited (the pane stays, with what it printed last: remain-on-exit)."""
        return self("display-message", "-p", "-t", "chat", "#{pane_dead}").strip() == "1"

    def wait_for(self, what: str, done: Callable[[str], bool]) -> str:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            screen = self.screen()
            if done(screen):
                return screen
            if self.dead():
                pytest.fail(f"the app exited while waiting for {what}; the terminal shows:\n{self.screen()}")
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what}; the screen was:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


def test_chat_command_in_a_terminal(tiny_onnx, tmp_path):
    db, rc_file = tmp_path / "chat.sqlite", tmp_path / "rc"
    command = f"{sys.executable} -m chat --model {tiny_onnx} --db {db}; echo $? > {rc_file}"
    tmux = Tmux("chat-e2e")
    try:
        # remain-on-exit, set in the same tmux command: if the app dies, its last words stay on the screen
        tmux(
            "new-session",
            "-d",
            "-x",
            "120",
            "-y",
            "40",
            "-s",
            "chat",
            "-c",
            str(ROOT),
            command,
            ";",
            "set-option",
            "-t",
            "chat",
            "remain-on-exit",
            "on",
        )
        tmux.wait_for("the model to load", lambda s: " ready │ onnx │ adapter base │ cpu" in s)
        tmux("send-keys", "-t", "chat", "-l", "Plan a weekend in Porto")
        tmux("send-keys", "-t", "chat", "Enter")
        screen = tmux.wait_for("a finished reply", lambda s: re.search(r"ready │.*\d+\.\d tok/s │ TTFT \d+ ms", s))
        assert "assistant · base" in screen  # (the question itself may have scrolled off by now)
        assert "f5 Copy" in screen  # the footer's end: the app drew at the pane's 120 columns
        tmux("send-keys", "-t", "chat", "C-q")
        deadline = time.monotonic() + DEADLINE_S
        while not rc_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rc_file.exists(), "the app did not quit on ctrl+q"
        assert rc_file.read_text().strip() == "0"
    finally:
        tmux.close()
    rows = sqlite3.connect(db).execute("SELECT role, adapter, content FROM message ORDER BY id").fetchall()
    assert [(role, adapter) for role, adapter, _ in rows] == [("user", None), ("assistant", "base")]
    assert rows[0][2] == "Plan a weekend in Porto" and rows[1][2].strip()
