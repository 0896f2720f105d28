"""System prompt and sampling settings; they apply from the next reply on."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, TextArea

from chat.engine import EngineError, Sampling
from chat.settings import ChatSettings


class SettingsScreen(ModalScreen[ChatSettings | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, settings: ChatSettings):
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings.sampling
        with Vertical(id="settings-body"):
            yield Label("Settings", classes="title")
            yield Label("System prompt")
            yield TextArea(self.settings.system_prompt, id="system-prompt", soft_wrap=True)
            with Horizontal(classes="fields"):
                yield Label("temperature (0 = greedy)")
                yield Input(str(s.temperature), id="temperature", type="number")
            with Horizontal(classes="fields"):
                yield Label("top_p")
                yield Input(str(s.top_p), id="top-p", type="number")
            with Horizontal(classes="fields"):
                yield Label("max new tokens")
                yield Input(str(s.max_new_tokens), id="max-new-tokens", type="integer")
            yield Label("", id="settings-error", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Save", id="save", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#system-prompt").focus()

    def read(self) -> ChatSettings:
        def number(widget_id: str, kind: type):
            raw = self.query_one(f"#{widget_id}", Input).value.strip()
            try:
                return kind(raw)
            except ValueError:
                raise EngineError(f"{widget_id.replace('-', ' ')}: '{raw}' is not a number") from None

        sampling = Sampling(number("temperature", float), number("top-p", float), number("max-new-tokens", int))
        sampling.check()
        prompt = self.query_one("#system-prompt", TextArea).text.strip()
        return ChatSettings(self.settings.model_dir, prompt, sampling)

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def action_save(self) -> None:
        try:
            self.dismiss(self.read())
        except EngineError as exc:
            self.query_one("#settings-error", Label).update(f"⚠ {exc}")

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
