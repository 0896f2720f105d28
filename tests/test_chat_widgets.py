"""The streaming reply widget on its own (Textual Pilot, no model): what it shows while a reply streams must be what
the whole text shows, row for row, and it must not lay the screen out again at every row."""

from __future__ import annotations

import random

import pytest
from textual.app import App, ComposeResult
from textual.content import Content
from textual.widgets import Markdown, Static

from chat.widgets.messages import AssistantMessage, StreamingText

pytestmark = pytest.mark.anyio  # async tests run on asyncio through anyio's pytest plugin
WIDTH = 40


class OneReply(App):
    CSS = f"AssistantMessage {{ width: {WIDTH}; height: auto; }}"

    def compose(self) -> ComposeResult:
        yield AssistantMessage("base", streaming=True)


def shown_rows(widget: StreamingText, width: int) -> list[str]:
    """The rows on screen: each Static's text wrapped at the widget's width, top to bottom."""
    rows = []
    for static in widget.query(Static):
        rows += [row.plain for row in Content(str(static.content)).wrap(width)]
    return rows


def pieces(seed: int, count: int) -> list[str]:
    """Token-like pieces: words with leading spaces, some newlines and blank lines, a few very long words."""
    rng = random.Random(seed)
    words = ["Rome", "is", "a", "city", "of", "fountains,", "trains", "and", "museums.", "**Day", "2**:", "-"]
    out = []
    for _ in range(count):
        r = rng.random()
        if r < 0.06:
            out.append("\n")
        elif r < 0.08:
            out.append("\n\n")
        elif r < 0.1:
            out.append(" " + "x" * rng.randint(30, 90))  # longer than a row: broken mid-word
        else:
            out.append(("" if out and out[-1].endswith("\n") else " ") + rng.choice(words))
    return out


async def test_streaming_rows_match_the_whole_text_and_become_markdown():
    app = OneReply()
    async with app.run_test(size=(80, 200)) as pilot:
        reply = app.query_one(AssistantMessage)
        streaming = reply.query_one(StreamingText)
        await pilot.pause()
        width = streaming.content_size.width
        layouts = 0
        for i, piece in enumerate(pieces(seed=3, count=600)):
            before = len(streaming.query(Static))
            reply.append(piece)
            layouts += len(streaming.query(Static)) > before
            if i % 7 == 0:
                await pilot.pause()
                whole = [row.plain for row in Content(reply.text).wrap(width)]
                shown = shown_rows(streaming, width)
                assert shown == whole, f"after piece {i}"
        rows = len(Content(reply.text).wrap(width))
        # a new row of frozen text (one layout) per TAIL_ROWS - 1 rows at most, not one per row
        assert layouts <= rows // (StreamingText.TAIL_ROWS - 1) + 1, (layouts, rows)
        await reply.finish("done")
        await pilot.pause()
        assert not reply.query(StreamingText) and reply.query_one(Markdown).source == reply.text


def hostile_pieces(seed: int, count: int) -> list[str]:
    """What a model (the tests' random one above all) can write: tabs, carriage returns and other characters the
    wrap rewrites or drops, wide and zero-width characters, words longer than a row, runs of spaces."""
    rng = random.Random(seed)
    kinds = [
        " word",
        "\t",
        "\tindented",
        "\r",
        "\r\n",
        "\x0b",
        "\x0c",
        "  ",
        " 中文字",
        " 🙂",
        "\u200b",
        "e\u0301",
        "\u2028",
        "\n",
        " " + "y" * 70,
        "z" * 25,
        "[bold]not markup[/]",
        " -",
    ]
    return [rng.choice(kinds) for _ in range(count)]


@pytest.mark.parametrize("seed", range(4))
async def test_streaming_survives_anything_a_model_writes(seed):
    """The first CI failure of the tail: a tab or a carriage return, which the wrap rewrites, made finding the rows
    raise, and the app exited mid-reply. Now every such piece streams, no text is lost, and it still ends as
    Markdown."""
    app = OneReply()
    async with app.run_test(size=(80, 200)) as pilot:
        reply = app.query_one(AssistantMessage)
        streaming = reply.query_one(StreamingText)
        await pilot.pause()
        for i, piece in enumerate(hostile_pieces(seed, 800)):
            reply.append(piece)
            if i % 25 == 0:
                await pilot.pause()
        await pilot.pause()
        shown = "".join(str(static.content) for static in streaming.query(Static))
        assert "".join(shown.split()) == "".join(reply.text.split())  # every character but whitespace, in order
        assert len(streaming.query(Static)) < 200  # frozen in blocks, not one Static per piece
        await reply.finish("done")
        await pilot.pause()
        assert reply.query_one(Markdown).source == reply.text
