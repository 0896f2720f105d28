"""Keys and what they do, built from the app's own bindings so it cannot drift."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

INTRO = """\
# Chat keys

Replies stream from the ONNX Runtime GenAI model. The adapter selector (top right) picks the LoRA adapter
for the **next** reply; the history stays. Each reply is labelled with the adapter that wrote it.
"""

PROMPT_KEYS = [
    ("enter", "send the prompt"),
    ("ctrl+j / shift+enter", "new line in the prompt (shift+enter where the terminal reports it)"),
    ("ctrl+p", "command palette: every action below, and each adapter by name"),
    ("ctrl+q", "quit"),
]


def keys_table(bindings: list[Binding]) -> str:
    rows = ["| key | action |", "|---|---|"]
    rows += [f"| `{key}` | {what} |" for key, what in PROMPT_KEYS]
    rows += [f"| `{b.key}` | {b.tooltip or b.description} |" for b in bindings if b.description]
    return "\n".join(rows)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def __init__(self, bindings: list[Binding]):
        super().__init__()
        self.text = f"{INTRO}\n{keys_table(bindings)}\n\nEsc closes this screen."

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Markdown(self.text)
