"""Rows of the conversation. Model and user text never goes through Rich markup (markup=False / Markdown).

A reply streams as plain text and becomes Markdown once it is done (issue #23). Profiled on 2 cores with SmolLM2:
the UI's cost is CPU time, not the GIL (a busy Python thread beside ORT GenAI slowed decode less than a busy
process), and on 2 cores every millisecond the UI thread spends stalls one of ORT's two intra-op threads. With a
MarkdownStream at 20 Hz the UI thread spent 4.2-5.5 ms per streamed token: each update laid out the screen again
(28 ms a layout) and re-rendered every visible row of the growing reply. Now the reply's rows being written sit in a
fixed-height tail, finished rows are rendered once, the screen is laid out once per few rows, and updates come at
10 Hz (chat.app.FLUSH_HZ): 1.3-1.8 ms per token.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Label, Markdown, Static

FINISH_NOTES = {"stopped": "stopped", "length": "cut off at max new tokens"}


class UserMessage(Static):
    def __init__(self, text: str):
        super().__init__(text, markup=False, classes="user")


class ErrorRow(Static):
    """One readable line for a failure; the app goes on."""

    def __init__(self, text: str):
        super().__init__(f"⚠ {text}", markup=False, classes="error")


class StreamingText(Vertical):
    """The text of a reply while it streams, as plain text. The rows being written sit in a tail of TAIL_ROWS rows
    (a fixed height: updating it needs no layout, only a repaint of those rows); when it is full, its complete rows
    move into a Static above it that is rendered once, and the screen is laid out again, once per TAIL_ROWS - 1
    rows instead of once per row. The price: up to TAIL_ROWS - 1 blank rows under the text until the reply ends."""

    TAIL_ROWS = 5

    def __init__(self) -> None:
        super().__init__(classes="streaming")
        self._tail = Static("", markup=False, classes="tail")
        self._tail.styles.height = self.TAIL_ROWS
        self._text = ""  # what the tail holds

    def compose(self) -> ComposeResult:
        yield self._tail

    def add(self, chunk: str) -> None:
        self._text += chunk
        width = self._tail.content_size.width
        rows = Content(self._text).wrap(width) if width else []
        if len(rows) <= self.TAIL_ROWS:
            self._tail.update(self._text, layout=False)
            return
        # all rows but the last are complete: earlier lines, and the wrapped rows above the last one of the line
        # being written (greedy word wrap: appending text only changes the last row)
        done, newline, line = self._text.rpartition("\n")
        cut = last_row_start(line, width)
        frozen = [done] if newline else []
        if cut:
            frozen.append(line[:cut].rstrip(" "))
        if not frozen:  # nothing complete to move up (a line the wrap cannot place): the tail shows what fits
            self._tail.update(self._text, layout=False)
            return
        self._text = line[cut:].lstrip(" ")  # the wrap drops the spaces at a break
        self.mount(Static("\n".join(frozen), markup=False), before=self._tail)
        self._tail.update(self._text)


def last_row_start(line: str, width: int) -> int:
    """Where the last of `line`'s wrapped rows starts in it. Found row by row while the wrap keeps the text as is;
    a model can write anything, and where the wrap rewrites characters (it expands tabs and drops carriage returns,
    for example) the cut goes at the last space that leaves at most two rows after it, or mid-word: the frozen part
    then wraps on its own, a row may end early until the reply becomes Markdown, and no text is lost."""
    rows = Content(line).wrap(width)
    end = 0
    for row in rows[:-1]:
        at = line.find(row.plain, end)
        if at < 0:
            break
        end = at + len(row.plain)
    else:
        return end
    floor = max(len(line) - width, 0)
    space = line.rfind(" ", 0, floor + 1)
    return space if space > 0 and len(line) - space <= 2 * width else floor


class AssistantMessage(Vertical):
    """A reply: who wrote it (which adapter), its body (plain text while it streams, then Markdown), and a note when
    it did not end normally."""

    def __init__(self, adapter: str, text: str = "", finish: str | None = None, streaming: bool = False):
        super().__init__(classes="assistant")
        self.adapter = adapter
        self.text = text
        self._finish = finish
        self._streaming = streaming

    def compose(self) -> ComposeResult:
        yield Label(f"assistant · {self.adapter}", markup=False, classes="who")
        yield StreamingText() if self._streaming else Markdown(self.text)
        yield Label(FINISH_NOTES.get(self._finish or "", ""), markup=False, classes="note")

    def on_mount(self) -> None:
        self.query_one(".note").display = bool(FINISH_NOTES.get(self._finish or ""))

    def append(self, chunk: str) -> None:
        self.text += chunk
        self.query_one(StreamingText).add(chunk)

    async def finish(self, finish: str, error: str | None = None) -> None:
        """The reply is over: its text becomes Markdown, with a note when it was cut, stopped or failed."""
        if self._streaming:
            self._streaming = False
            streaming = self.query_one(StreamingText)
            await self.mount(Markdown(self.text), after=streaming)
            await streaming.remove()
        self._finish = finish
        note = self.query_one(".note", Label)
        note.update(f"⚠ {error}" if error else FINISH_NOTES.get(finish, ""))
        note.set_class(bool(error), "error")
        note.display = bool(error or FINISH_NOTES.get(finish))
