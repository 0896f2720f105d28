"""The chat app: conversation, prompt, adapter selector, status bar; the model runs in thread workers.

Threads: the model loads and generates in Textual thread workers (the engine's lock allows one at a time).
Workers never touch widgets: they push text into a deque and post messages; a timer moves the text onto the
screen FLUSH_HZ times a second, as plain text until the reply is done (see chat/widgets/messages.py for why).
"""

from __future__ import annotations

import re
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Footer, Label, Select
from textual.widgets._footer import FooterKey

from chat.commands import ChatCommands
from chat.engine import BASE, Engine, EngineError, ReplyStats, one_line
from chat.screens.conversations import ConversationsScreen
from chat.screens.help import HelpScreen
from chat.screens.settings import SettingsScreen
from chat.settings import ChatSettings
from chat.store import Message as Stored
from chat.store import Store
from chat.widgets.messages import AssistantMessage, ErrorRow, UserMessage
from chat.widgets.prompt import PromptInput
from chat.widgets.status import StatusBar

FLUSH_HZ = 10


class ModelLoaded(Message):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds


class ModelFailed(Message):
    def __init__(self, error: str):
        super().__init__()
        self.error = error


class AdapterReady(Message):
    def __init__(self, name: str, error: str | None = None):
        super().__init__()
        self.name, self.error = name, error


class ReplyDone(Message):
    def __init__(self, reply_id: int, stats: ReplyStats | None, error: str | None = None):
        super().__init__()
        self.reply_id, self.stats, self.error = reply_id, stats, error


@dataclass
class ActiveReply:
    id: int
    widget: AssistantMessage
    prompt_text: str
    stop: threading.Event = field(default_factory=threading.Event)
    pending: deque[str] = field(default_factory=deque)  # filled by the worker thread, drained by the UI


class ChatApp(App):
    TITLE = "olive-lab chat"
    CSS_PATH = "app.tcss"
    COMMANDS = App.COMMANDS | {ChatCommands}
    AUTO_FOCUS = "#prompt"
    BINDINGS = [
        Binding("escape", "stop", "Stop", tooltip="stop the streaming reply now (the partial reply is kept)"),
        Binding("ctrl+t", "cycle_adapter", "Adapter", tooltip="next adapter (base, then each LoRA adapter)"),
        Binding("ctrl+n", "new_conversation", "New", tooltip="start a new conversation"),
        Binding("f1", "help", "Help", tooltip="this screen"),
        Binding("f2", "settings", "Settings", tooltip="system prompt and sampling settings"),
        Binding("f3", "conversations", "Chats", tooltip="saved conversations: resume or delete"),
        Binding("f4", "export", "Export", tooltip="export the conversation to Markdown"),
        Binding("f5", "copy_last", "Copy", tooltip="copy the last reply to the clipboard"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        engine: Engine,
        store: Store,
        settings: ChatSettings,
        adapter: str = BASE,
        export_dir: Path | str = ".",
        resume: int | None = None,
    ):
        super().__init__()
        self.engine = engine
        self.store = store
        self.settings = settings
        self.export_dir = Path(export_dir)
        self.adapter = BASE  # the adapter the next reply uses; changes once the chosen one is loaded
        self.wanted_adapter = adapter
        self.broken_adapters: dict[str, str] = {}
        self.load_error: str | None = None
        self.conversation_id: int | None = None
        self.history: list[Stored] = []
        self.reply: ActiveReply | None = None
        self._reply_ids = 0
        self.last_stats: ReplyStats | None = None
        self.resume_at_start = resume

    # ---------------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        with Horizontal(id="top"):
            yield Label(f"{self.TITLE} · {self.engine.name}", id="title", markup=False)
            yield Label("adapter", id="adapter-label")
            yield Select(
                self._adapter_options(), value=self.wanted_adapter, allow_blank=False, id="adapter", compact=True
            )
        yield VerticalScroll(id="conversation")
        yield PromptInput(id="prompt")
        yield StatusBar(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        status = self.query_one(StatusBar)
        status.model, status.device, status.adapter = self.engine.name, self.engine.ep, self.adapter
        status.context_max = self.engine.context_length
        self.query_one("#conversation", VerticalScroll).anchor()
        self.set_interval(1 / FLUSH_HZ, self._flush_reply)
        self.run_worker(self._load_model, thread=True, group="model", exit_on_error=False)
        if self.resume_at_start is not None:
            await self.resume(self.resume_at_start)

    def _adapter_options(self) -> list[tuple[str, str]]:
        return [(f"{name} ✗" if name in self.broken_adapters else name, name) for name in self.engine.adapter_names]

    def adapter_choices(self) -> list[str]:
        return self.engine.adapter_names

    # ---------------------------------------------------------------- model + adapters (thread workers)
    def _load_model(self) -> None:
        try:
            self.post_message(ModelLoaded(self.engine.load()))
        except EngineError as exc:
            self.post_message(ModelFailed(str(exc)))
        except Exception as exc:  # noqa: BLE001 - any failure must end as one line in the UI
            self.post_message(ModelFailed(f"{type(exc).__name__}: {one_line(exc)}"))

    def on_model_loaded(self, message: ModelLoaded) -> None:
        self.query_one(StatusBar).state = "ready"
        self._update_context()
        if self.wanted_adapter != self.adapter:
            self._prepare_adapter(self.wanted_adapter)

    def on_model_failed(self, message: ModelFailed) -> None:
        self.load_error = message.error
        self.query_one(StatusBar).state = "no model"
        self.show_error(message.error)

    def _prepare_adapter(self, name: str) -> None:
        def work() -> None:
            try:
                self.engine.prepare_adapter(name)
                self.post_message(AdapterReady(name))
            except EngineError as exc:
                self.post_message(AdapterReady(name, str(exc)))
            except Exception as exc:  # noqa: BLE001 - never leave the selector waiting on a lost worker
                self.post_message(AdapterReady(name, f"adapter {name}: {type(exc).__name__}: {one_line(exc)}"))

        self.run_worker(work, thread=True, group="adapter", exit_on_error=False)

    def on_adapter_ready(self, message: AdapterReady) -> None:
        select = self.query_one("#adapter", Select)
        if message.error:
            self.broken_adapters[message.name] = message.error
            self.notify(message.error, title=f"adapter {message.name}", severity="error", markup=False)
            self.wanted_adapter = self.adapter
            with self.prevent(Select.Changed):
                select.set_options(self._adapter_options())
                select.value = self.adapter
            return
        if message.name != self.wanted_adapter:  # the user moved on while it loaded
            return
        self.adapter = message.name
        self.query_one(StatusBar).adapter = message.name

    @on(Select.Changed, "#adapter")
    def _adapter_changed(self, event: Select.Changed) -> None:
        self.select_adapter(str(event.value))

    def select_adapter(self, name: str) -> None:
        """Use `name` for the next reply (loads its file first; a broken one is reported and skipped)."""
        select = self.query_one("#adapter", Select)
        if select.value != name:
            with self.prevent(Select.Changed):
                select.value = name
        if name == self.wanted_adapter and name in (self.adapter, *self.broken_adapters):
            return
        self.wanted_adapter = name
        if name == BASE:
            self.adapter = BASE
            self.query_one(StatusBar).adapter = BASE
        elif self.engine.loaded:
            self._prepare_adapter(name)

    def action_cycle_adapter(self) -> None:
        names = [n for n in self.engine.adapter_names if n not in self.broken_adapters]
        current = self.wanted_adapter if self.wanted_adapter in names else BASE
        self.select_adapter(names[(names.index(current) + 1) % len(names)])

    # ---------------------------------------------------------------- sending and streaming
    def chat_messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.settings.system_prompt}] if self.settings.system_prompt else []
        return system + [{"role": m.role, "content": m.content} for m in self.history]

    @on(PromptInput.Submitted)
    async def _send(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if not text:
            return
        if self.reply is not None:
            self.notify("A reply is still streaming: Esc stops it.", severity="warning")
            return
        if not self.engine.loaded:
            self.notify(
                self.load_error or "The model is still loading…",
                severity="error" if self.load_error else "warning",
                markup=False,
            )
            return
        if self.wanted_adapter != self.adapter:
            self.notify(f"Adapter {self.wanted_adapter} is still loading.", severity="warning", markup=False)
            return
        event.prompt.clear()
        if self.conversation_id is None:
            self.conversation_id = self.store.create(text, self.engine.name, self.settings.system_prompt)
        user = Stored("user", text)
        self.history.append(user)
        self.store.add(self.conversation_id, user)
        log = self.query_one("#conversation", VerticalScroll)
        widget = AssistantMessage(self.adapter, streaming=True)
        await log.mount_all([UserMessage(text), widget])
        log.anchor()
        self._reply_ids += 1
        self.reply = ActiveReply(self._reply_ids, widget, text)
        self.query_one(StatusBar).state = "generating…"
        self._show_stop_key()
        sampling = replace(self.settings.sampling)  # a copy: the worker must not read app state later
        work = partial(self._generate, self.chat_messages(), self.adapter, sampling, self.reply)
        self.run_worker(work, thread=True, group="reply", exit_on_error=False)

    def _generate(self, messages, adapter, sampling, reply: ActiveReply) -> None:
        """Worker thread: stream into reply.pending (a deque) and post one ReplyDone; touches no widget."""
        stream = self.engine.generate(messages, adapter, sampling, reply.stop)
        try:
            while True:
                reply.pending.append(next(stream))
        except StopIteration as done:
            self.post_message(ReplyDone(reply.id, done.value))
        except EngineError as exc:
            self.post_message(ReplyDone(reply.id, None, str(exc)))
        except Exception as exc:  # noqa: BLE001
            self.post_message(ReplyDone(reply.id, None, f"generation failed: {type(exc).__name__}: {one_line(exc)}"))

    def _flush_reply(self) -> None:
        reply = self.reply
        if reply is None or not reply.pending:
            return
        reply.widget.append("".join(reply.pending.popleft() for _ in range(len(reply.pending))))

    async def on_reply_done(self, message: ReplyDone) -> None:
        reply = self.reply
        if reply is None or reply.id != message.reply_id:
            return
        self._flush_reply()
        # the reply stays active while its text becomes Markdown: a new conversation must not remove it meanwhile
        await reply.widget.finish("error" if message.error else message.stats.finish, message.error)
        self.reply = None
        self._show_stop_key()
        status = self.query_one(StatusBar)
        status.state = "ready"
        if message.error:
            self.notify(message.error, severity="error", markup=False)
            return
        stats = message.stats
        saved = Stored("assistant", reply.widget.text, stats.adapter, stats.finish)
        self.history.append(saved)
        self.store.add(self.conversation_id, saved)
        self.last_stats = stats
        status.tokens_per_s, status.ttft_s = stats.tokens_per_s, stats.ttft_s
        status.context_used = stats.prompt_tokens + stats.new_tokens
        if stats.dropped_messages:
            self.notify(f"The {stats.dropped_messages} oldest messages were left out to fit the context.")

    async def action_quit(self) -> None:
        if self.reply is not None:
            self.reply.stop.set()  # a thread worker cannot be cancelled: end the reply so the app can exit
        self.exit()

    def _show_stop_key(self) -> None:
        """The footer's Esc key, dimmed unless a reply streams (check_action decides what a key press does). Not
        refresh_bindings(): that recomposes the whole footer, about 70 % of the UI thread's work when a reply starts,
        while ORT prefills on the same 2 cores (issue #23)."""
        idle = self.reply is None
        for key in self.query_one(Footer).query(FooterKey):
            if key.action == "stop":
                key._disabled = idle  # what a click on it does: Textual's own flag, set the same way on recompose
                key.set_class(idle, "-disabled")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return True if self.reply is not None else None  # None: shown dimmed in the footer
        return True

    def action_stop(self) -> None:
        reply = self.reply
        if reply is None:
            return
        reply.stop.set()  # the engine checks it before every token
        prompt = self.query_one(PromptInput)
        if not prompt.text.strip():
            prompt.text = reply.prompt_text
            prompt.move_cursor(prompt.document.end)
        prompt.focus()

    # ---------------------------------------------------------------- conversations
    def _update_context(self) -> None:
        try:
            used = self.engine.context_used(self.chat_messages())
        except EngineError:
            return
        self.query_one(StatusBar).context_used = used

    async def _show_conversation(self) -> None:
        log = self.query_one("#conversation", VerticalScroll)
        await log.remove_children()
        rows = [
            UserMessage(m.content) if m.role == "user" else AssistantMessage(m.adapter or BASE, m.content, m.finish)
            for m in self.history
        ]
        await log.mount_all(rows)
        log.scroll_end(animate=False)
        log.anchor()
        self._update_context()

    def _busy(self) -> bool:
        if self.reply is not None:
            self.notify("A reply is streaming: Esc stops it first.", severity="warning")
        return self.reply is not None

    async def action_new_conversation(self) -> None:
        if self._busy():
            return
        self.conversation_id, self.history = None, []
        await self._show_conversation()
        self.query_one(PromptInput).focus()

    async def resume(self, conversation_id: int) -> None:
        if self._busy():
            return
        conv = self.store.get(conversation_id)
        self.conversation_id = conv.id
        self.history = self.store.messages(conv.id)
        self.settings.system_prompt = conv.system_prompt
        await self._show_conversation()

    def action_conversations(self) -> None:
        async def chosen(conversation_id: int | None) -> None:
            if conversation_id is not None:
                await self.resume(conversation_id)
                self.notify(f"Resumed “{self.store.get(conversation_id).title}”", markup=False)
            elif self.conversation_id is not None and not any(
                c.id == self.conversation_id for c in self.store.conversations()
            ):
                await self.action_new_conversation()  # the open one was deleted

        self.push_screen(ConversationsScreen(self.store), chosen)

    def action_settings(self) -> None:
        def saved(settings: ChatSettings | None) -> None:
            if settings is None:
                return
            self.settings = settings
            if self.conversation_id is not None:
                self.store.set_system_prompt(self.conversation_id, settings.system_prompt)
            self._update_context()
            self.notify("Settings apply from the next reply.")

        self.push_screen(SettingsScreen(self.settings), saved)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.BINDINGS))

    def action_export(self) -> None:
        if self.conversation_id is None:
            self.notify("Nothing to export yet.", severity="warning")
            return
        conv = self.store.get(self.conversation_id)
        slug = re.sub(r"[^a-z0-9]+", "-", conv.title.lower()).strip("-")[:40] or "chat"
        path = self.export_dir / f"chat-{conv.id}-{slug}.md"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.store.to_markdown(conv.id), encoding="utf-8")
        except OSError as exc:
            self.show_error(f"{path}: cannot write the export: {exc.strerror}")
            return
        self.notify(f"Exported to {path}", markup=False)

    def action_copy_last(self) -> None:
        replies = [m for m in self.history if m.role == "assistant"]
        if not replies:
            self.notify("No reply to copy yet.", severity="warning")
            return
        self.copy_to_clipboard(replies[-1].content)
        self.notify(f"Copied the last reply ({len(replies[-1].content)} characters).")

    def show_error(self, text: str) -> None:
        """One readable line in the conversation and a notification; nothing else changes."""
        self.query_one("#conversation", VerticalScroll).mount(ErrorRow(text))
        self.notify(text, severity="error", markup=False)
