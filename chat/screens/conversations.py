"""Saved conversations: resume one (enter) or delete it (d / delete)."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from chat.store import Conversation, Store


def describe(conv: Conversation) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conv.updated_at))
    return f"#{conv.id}  {conv.title}  ·  {conv.messages} messages  ·  {when}"


class ConversationsScreen(ModalScreen[int | None]):
    """Dismisses with the id of the conversation to resume, or None."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("d,delete", "delete", "Delete"),
    ]

    def __init__(self, store: Store):
        super().__init__()
        self.store = store

    def compose(self) -> ComposeResult:
        with Vertical(id="conversations-body"):
            yield Label("Conversations  (enter resumes · d deletes · esc closes)", classes="title")
            yield OptionList(id="conversation-list")

    def on_mount(self) -> None:
        self.refresh_list()
        self.query_one(OptionList).focus()

    def refresh_list(self) -> None:
        options = self.query_one(OptionList)
        highlighted = options.highlighted
        options.clear_options()
        conversations = self.store.conversations()
        options.add_options(Option(Content(describe(c)), id=str(c.id)) for c in conversations)
        if not conversations:
            options.add_option(Option("No saved conversations yet.", disabled=True))
        else:
            options.highlighted = min(highlighted or 0, len(conversations) - 1)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id))

    def action_delete(self) -> None:
        options = self.query_one(OptionList)
        if options.highlighted is None:
            return
        option = options.get_option_at_index(options.highlighted)
        if option.id is None:
            return
        title = self.store.get(int(option.id)).title
        self.store.delete(int(option.id))
        self.notify(f"Deleted “{title}”", markup=False)
        self.refresh_list()
