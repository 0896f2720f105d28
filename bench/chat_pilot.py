"""The real chat app (`python -m chat`) driven headless by Textual's Pilot on a built model: one conversation that
switches adapters with ctrl+t between replies. For machines without a terminal session, e.g. the GPU machine:

    python -m bench.chat_pilot [--model models/onnx] [--out FILE]

Prints, per reply, the adapter label, the status bar's device / tok/s / TTFT and the start of the text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

TURNS = [
    "What should I pack for a week in Iceland in October?",
    "And what is the best way to get around the island?",
    "Me and my wife want to spend 10 days in Japan in April 2027 with a budget of 4000 USD.",
]


async def until(pilot, condition, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not finish a reply in time")
        await pilot.pause(0.05)


async def drive(app) -> list[dict]:
    from chat.widgets.messages import AssistantMessage
    from chat.widgets.prompt import PromptInput
    from chat.widgets.status import StatusBar

    log = []
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await app.workers.wait_for_complete()
        for i, text in enumerate(TURNS):
            if i:
                await pilot.press("ctrl+t")  # base -> travel -> trip_json
                await pilot.pause()
                await app.workers.wait_for_complete()
            started = app._reply_ids
            app.query_one(PromptInput).insert(text)
            await pilot.press("enter")
            await until(pilot, lambda started=started: app._reply_ids > started and app.reply is None)
            await app.workers.wait_for_complete()
            await pilot.pause()
            reply = app.query(AssistantMessage).last()
            status = app.query_one(StatusBar)
            log.append(
                {
                    "label": str(reply.query_one(".who").render()),
                    "device": status.device,
                    "tok_s": round(status.tokens_per_s or 0, 1),
                    "ttft_ms": round((status.ttft_s or 0) * 1000, 1),
                    "reply": reply.text,
                }
            )
            print(f"[{log[-1]['label']}] {status.device} {log[-1]['tok_s']} tok/s: {reply.text[:120]!r}", flush=True)
    return log


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/onnx")
    parser.add_argument("--out")
    args = parser.parse_args()

    from chat.__main__ import build_app, parse_args

    with tempfile.TemporaryDirectory() as tmp:
        app = build_app(parse_args(["--model", args.model, "--db", f"{tmp}/chat.sqlite", "--export-dir", tmp]))
        app.settings.sampling.temperature = 0.0  # greedy: the same replies every run
        app.settings.sampling.max_new_tokens = 96
        log = asyncio.run(drive(app))
        app.store.close()
    if args.out:
        Path(args.out).write_text(json.dumps(log, indent=2) + "\n")


if __name__ == "__main__":
    main()
