"""The prompt: a multi-line TextArea where Enter sends and ctrl+j (or shift+enter) starts a new line."""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.message import Message
from textual.widgets import TextArea

# Terminals send Enter as "\r" and ctrl+j as "\n"; shift/alt+enter arrive only where the terminal reports them.
NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")


class PromptInput(TextArea):
    @dataclass
    class Submitted(Message):
        prompt: PromptInput
        text: str

    def __init__(self, **kwargs):
        kwargs.setdefault("placeholder", "Message the model. Enter sends, ctrl+j adds a new line, F1 lists the keys.")
        super().__init__(soft_wrap=True, tab_behavior="focus", show_line_numbers=False, compact=True, **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)
