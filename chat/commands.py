"""Command palette (ctrl+p) entries: every chat action, and one entry per adapter."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider


class ChatCommands(Provider):
    def _commands(self) -> list[tuple[str, object, str]]:
        app = self.app
        commands = [
            (f"Adapter: {name}", partial(app.select_adapter, name), "use it for the next reply")
            for name in app.adapter_choices()
        ]
        commands += [
            ("New conversation", app.action_new_conversation, "start an empty chat (the current one stays saved)"),
            ("Conversations", app.action_conversations, "resume or delete a saved conversation"),
            ("Settings", app.action_settings, "system prompt, temperature, top_p, max new tokens"),
            ("Export conversation to Markdown", app.action_export, "write the chat to a .md file"),
            ("Copy last reply", app.action_copy_last, "to the clipboard"),
            ("Stop reply", app.action_stop, "end the streaming reply now"),
            ("Next adapter", app.action_cycle_adapter, "cycle through base and the adapters"),
            ("Help", app.action_help, "keys and what they do"),
        ]
        return commands

    async def discover(self) -> Hits:
        for name, callback, help_text in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, callback, help_text in self._commands():
            if (score := matcher.match(name)) > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
