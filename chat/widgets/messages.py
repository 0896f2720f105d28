"""Rows of the conversation. Model and user text never goes through Rich markup (markup=False / Markdown)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

FINISH_NOTES = {"stopped": "stopped", "length": "cut off at max new tokens"}


class UserMessage(Static):
    def __init__(self, text: str):
        super().__init__(text, markup=False, classes="user")


class ErrorRow(Static):
    """One readable line for a failure; the app goes on."""

    def __init__(self, text: str):
        super().__init__(f"⚠ {text}", markup=False, classes="error")


class AssistantMessage(Vertical):
    """A reply: who wrote it (which adapter), the Markdown body, and a note when it did not end normally."""

    def __init__(self, adapter: str, text: str = "", finish: str | None = None):
        super().__init__(classes="assistant")
        self.adapter = adapter
        self.text = text
        self._finish = finish

    def compose(self) -> ComposeResult:
        yield Label(f"assistant · {self.adapter}", markup=False, classes="who")
        yield Markdown(self.text)
        yield Label(FINISH_NOTES.get(self._finish or "", ""), markup=False, classes="note")

    def on_mount(self) -> None:
        self.query_one(".note").display = bool(FINISH_NOTES.get(self._finish or ""))

    def get_stream(self) -> MarkdownStream:
        return Markdown.get_stream(self.query_one(Markdown))

    def finish(self, finish: str, error: str | None = None) -> None:
        self._finish = finish
        note = self.query_one(".note", Label)
        note.update(f"⚠ {error}" if error else FINISH_NOTES.get(finish, ""))
        note.set_class(bool(error), "error")
        note.display = bool(error or FINISH_NOTES.get(finish))
