"""Chat speed (issue #23): the real app under Textual's Pilot against the engine alone, on the same prompts in the
same run, plus what the KV cache kept across turns gives and what an adapter switch costs.

    python -m bench.chat_speed [--model models/onnx] [--device cpu|cuda] [--rounds 3] [--quick] [--out FILE]

- ui_over_engine: per reply length (about 50 and about 500 tokens, greedy, one prompt each), the median decode
  tok/s inside the app over the median of the engine alone. Both are the engine's own count (ReplyStats.tokens_per_s,
  what the status bar shows), so the ratio is what the UI costs the model. Rounds interleave: engine alone with no
  app running, then the same replies in a fresh app session. ui_over_engine_wall: the same ratio from wall time,
  Enter to the finished reply on screen against the engine's call.
- ttft_turn5_over_turn1: a 5-turn conversation in the app (same message length each turn, cache kept); turn 5's time
  to first token over turn 1's, median over rounds. Turn 5 without the cache (a fresh prefill of the same history)
  is reported for scale.
- The app runs the model as `make chat` does, in its own process (chat.engine_process.EngineProcess); the engine
  alone is chat.engine.Engine in this process, idle while the app runs. process_over_engine: that same
  EngineProcess streaming with no app, over the engine alone (what the process itself changes).
- --compare-in-process: each round also runs the app on the in-process Engine (`python -m chat --in-process`, and
  what the app did before the engine had a process of its own), reported as ui_over_engine_in_process.
- --compare-flush-hz HZ: each round also runs the app moving text to the screen HZ times a second instead of
  chat.app.FLUSH_HZ, reported as ui_over_engine_compared: what rendering costs the model, in the same run.
- switch: with about 2k tokens of history, the TTFT of the next turn on the same adapter (cache extended) and after
  switching adapters (the whole history prefilled again).

Writes bench/results/<date>-chat.json under the key `cpu` or `cuda` (--device), keeping the other key if the file
exists. --quick is a smoke run (short replies, one round, small history) that writes only with --out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = {  # greedy SmolLM2 runs the long one past 500 tokens without an end-of-turn token
    "short": "Name three things to do in Porto.",
    "long": "Write a long, detailed travel guide to Italy, city by city, with food, trains and museums.",
}
TURNS = [
    "Plan one day in Rome for me.",
    "Plan one day in Paris for me.",
    "Plan one day in Vienna for me.",
    "Plan one day in Lisbon for me.",
    "Plan one day in Berlin for me.",
]
FILLER = "A note on trains, museums, markets and food in the old town, and how to get there early. " * 12


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def reply_row(stats, wall_s: float) -> dict:
    """One reply's measurements: the engine's own counts (what the status bar shows) and the wall time."""
    return {
        "wall_s": wall_s,
        "tok_s": stats.tokens_per_s,
        "ttft_s": stats.ttft_s,
        "new_tokens": stats.new_tokens,
        "prefill_tokens": stats.prefill_tokens,
    }


def engine_reply(engine, messages, adapter: str, new_tokens: int) -> dict:
    from chat.engine import Sampling, collect

    start = time.perf_counter()
    _, stats = collect(engine.generate(messages, adapter, Sampling(0.0, 1.0, new_tokens)))
    return reply_row(stats, time.perf_counter() - start)


async def app_reply(app, pilot, text: str, new_tokens: int, fresh: bool) -> dict:
    """Type `text`, press Enter, wait for the finished reply on screen; the engine's stats and the wall time."""
    from chat.widgets.prompt import PromptInput

    app.settings.sampling.max_new_tokens = new_tokens
    if fresh:
        app.engine.drop_cache()  # the engine-alone reply left a cache for this very prompt
    started = app._reply_ids
    app.query_one(PromptInput).insert(text)
    t0 = time.perf_counter()
    await pilot.press("enter")
    while not (app._reply_ids > started and app.reply is None):  # no pilot.pause: it forces a screen update
        elapsed = time.perf_counter() - t0
        if elapsed > 600 or (elapsed > 10 and app._reply_ids == started):
            said = "; ".join(n.message for n in app._notifications) or "nothing"
            what = "finish a reply in 600 s" if app._reply_ids > started else "start a reply in 10 s"
            raise TimeoutError(f"the app did not {what} (its notifications: {said})")
        await asyncio.sleep(0.01)
    stats = app.last_stats
    if stats is None or app._reply_ids == started:
        raise RuntimeError("the app showed no reply (see its notifications)")
    return reply_row(stats, time.perf_counter() - t0)


async def app_session(engine, lengths: dict[str, int], turn_tokens: int, tmp: Path) -> dict:
    """One fresh app on the shared engine: one reply per length (each in a new conversation), then the conversation."""
    from chat.app import ChatApp
    from chat.engine import Sampling
    from chat.settings import ChatSettings
    from chat.store import Store

    store = Store(tmp / "chat.sqlite")
    app = ChatApp(engine, store, ChatSettings(engine.model_dir, "", Sampling(0.0, 1.0, 64)), export_dir=tmp)
    out = {"replies": {}, "turns": []}
    async with app.run_test(size=(120, 40)) as pilot:
        while not engine.loaded or app.query_one("#status").state != "ready":
            await asyncio.sleep(0.05)
        await app_reply(app, pilot, "Hi!", 4, fresh=True)  # warm-up, not measured: the first reply's mounts
        await asyncio.sleep(0.5)
        for name, tokens in lengths.items():
            await app.action_new_conversation()
            out["replies"][name] = await app_reply(app, pilot, PROMPTS[name], tokens, fresh=True)
        await app.action_new_conversation()
        for i, text in enumerate(TURNS):
            out["turns"].append(await app_reply(app, pilot, text, turn_tokens, fresh=i == 0))
        out["history"] = app.chat_messages()
    store.close()
    return out


def switch_cost(engine, history_tokens: int, adapter: str) -> dict:
    """TTFT with ~history_tokens of history: the next turn on the same adapter, then after a switch to base."""
    from chat.engine import BASE

    engine.prepare_adapter(adapter)
    engine.drop_cache()
    messages = []
    while engine.context_used(messages) < history_tokens:
        messages += [{"role": "user", "content": FILLER}, {"role": "assistant", "content": FILLER}]
    result = {"history_tokens": engine.context_used(messages)}
    replies = []
    for step, (name, question) in enumerate([(adapter, "Summarize."), (adapter, "And Rome?"), (BASE, "And Oslo?")]):
        messages = messages + [{"role": "user", "content": question}]
        reply = engine_reply(engine, messages, name, 8)
        replies.append(reply)
        messages = messages + [{"role": "assistant", "content": "Sure."}]  # an edit: step 1 rewinds, step 2 switches
        print(f"  switch step {step} ({name}): prefill {reply['prefill_tokens']}, ttft {reply['ttft_s']:.3f} s")
    result["first_prefill_s"] = round(replies[0]["ttft_s"], 3)
    result["same_adapter_ttft_s"] = round(replies[1]["ttft_s"], 3)
    result["same_adapter_prefill_tokens"] = replies[1]["prefill_tokens"]
    result["after_switch_ttft_s"] = round(replies[2]["ttft_s"], 3)
    result["after_switch_prefill_tokens"] = replies[2]["prefill_tokens"]
    return result


def main() -> None:
    import chat.app as chat_app
    from chat.engine import Engine
    from chat.engine_process import EngineProcess
    from chat.widgets.messages import StreamingText
    from olive_lab.decode import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/onnx")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adapter", default="travel", help="the adapter of the switch measurement")
    parser.add_argument("--quick", action="store_true", help="smoke run: short replies, one round, small history")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<date>-chat.json")
    parser.add_argument(
        "--compare-in-process",
        action="store_true",
        help="each round also runs the app on the in-process engine (ui_over_engine_in_process): what the process saves",
    )
    parser.add_argument(
        "--compare-flush-hz",
        type=float,
        default=None,
        help="each round also runs the app flushing text this often (ui_over_engine_compared): what rendering costs",
    )
    args = parser.parse_args()
    lengths = {"short": 8, "long": 24} if args.quick else {"short": 50, "long": 500}
    turn_tokens, history_tokens = (8, 300) if args.quick else (48, 2000)
    rounds = 1 if args.quick else args.rounds

    engine = Engine(args.model)
    engine.load()
    if engine.ep != args.device:
        raise SystemExit(f"{args.model}: its genai_config runs on '{engine.ep}', not '{args.device}'")
    app_engine = EngineProcess(args.model)  # the app's, as `make chat` runs it; each session (re)loads it
    app_engine.load()
    load_before = os.getloadavg()
    alone: dict[str, list[dict]] = {name: [] for name in lengths}
    alone_process: dict[str, list[dict]] = {name: [] for name in lengths}  # the app's engine, no app
    in_app: dict[str, list[dict]] = {name: [] for name in lengths}
    in_app_compared: dict[str, list[dict]] = {name: [] for name in lengths}  # --compare-flush-hz
    in_app_in_process: dict[str, list[dict]] = {name: [] for name in lengths}  # --compare-in-process
    sessions = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, tokens in lengths.items():
                engine.drop_cache()
                alone[name].append(engine_reply(engine, [{"role": "user", "content": PROMPTS[name]}], "base", tokens))
                app_engine.drop_cache()
                messages = [{"role": "user", "content": PROMPTS[name]}]
                alone_process[name].append(engine_reply(app_engine, messages, "base", tokens))
            session = asyncio.run(app_session(app_engine, lengths, turn_tokens, Path(tmp) / str(r)))
            for name in lengths:
                in_app[name].append(session["replies"][name])
            sessions.append(session)
            if args.compare_in_process:
                other = asyncio.run(app_session(engine, lengths, turn_tokens, Path(tmp) / f"{r}-in-process"))
                for name in lengths:
                    in_app_in_process[name].append(other["replies"][name])
            if args.compare_flush_hz:  # the same session at another flush rate, in the same round
                chosen, chat_app.FLUSH_HZ = chat_app.FLUSH_HZ, args.compare_flush_hz
                try:
                    other = asyncio.run(app_session(app_engine, lengths, turn_tokens, Path(tmp) / f"{r}-compared"))
                finally:
                    chat_app.FLUSH_HZ = chosen
                for name in lengths:
                    in_app_compared[name].append(other["replies"][name])
            for name in lengths:
                a, b = alone[name][-1], in_app[name][-1]
                rate = args.compare_flush_hz
                extra = f", app at {rate:g} Hz {in_app_compared[name][-1]['tok_s']:.1f}" if rate else ""
                if args.compare_in_process:
                    extra += f", app in-process {in_app_in_process[name][-1]['tok_s']:.1f}"
                print(
                    f"round {r + 1} {name}: engine {a['tok_s']:.1f} tok/s (own process "
                    f"{alone_process[name][-1]['tok_s']:.1f}), app {b['tok_s']:.1f}{extra} "
                    f"({b['new_tokens']} tokens)"
                )
            print(f"round {r + 1} ttft by turn (ms): {[round(t['ttft_s'] * 1000) for t in session['turns']]}")
    app_engine.close()
    # turn 5 again without the cache: the same history prefilled from scratch
    engine.drop_cache()
    turn5_fresh = engine_reply(engine, sessions[-1]["history"][:-1], "base", turn_tokens)
    switch = switch_cost(engine, history_tokens, args.adapter)
    ttft = [[t["ttft_s"] for t in s["turns"]] for s in sessions]
    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "model": str(args.model),
        "rounds": rounds,
        "ui": {
            "engine": "own process (chat.engine_process)",
            "flush_hz": chat_app.FLUSH_HZ,
            "tail_rows": StreamingText.TAIL_ROWS,
            "size": [120, 40],
            "compared_flush_hz": args.compare_flush_hz,
        },
        "ui_over_engine": {
            f"{name}_{lengths[name]}_tokens": median([b["tok_s"] for b in in_app[name]])
            / median([a["tok_s"] for a in alone[name]])
            for name in lengths
        },
        "ui_over_engine_wall": {
            f"{name}_{lengths[name]}_tokens": median([a["wall_s"] for a in alone[name]])
            / median([b["wall_s"] for b in in_app[name]])
            for name in lengths
        },
        "decode_tok_s": {
            name: {
                "engine": median([a["tok_s"] for a in alone[name]]),
                "app": median([b["tok_s"] for b in in_app[name]]),
            }
            for name in lengths
        },
        # the engine in its own process with no app, over the engine here: what the process itself costs or gives
        "process_over_engine": {
            f"{name}_{lengths[name]}_tokens": round(
                median([b["tok_s"] for b in alone_process[name]]) / median([a["tok_s"] for a in alone[name]]), 3
            )
            for name in lengths
        },
        "new_tokens": {name: [b["new_tokens"] for b in in_app[name]] for name in lengths},
        "ttft_turn5_over_turn1": median([t[4] / t[0] for t in ttft]),
        "ttft_ms_by_turn": [round(statistics.median(col) * 1000, 1) for col in zip(*ttft, strict=True)],
        "prefill_tokens_by_turn": [t["prefill_tokens"] for t in sessions[-1]["turns"]],
        "ttft_turn5_without_cache_ms": round(turn5_fresh["ttft_s"] * 1000, 1),
        "switch": switch,
    }
    if args.compare_flush_hz:
        result["ui_over_engine_compared"] = {
            f"{name}_{lengths[name]}_tokens": median([b["tok_s"] for b in in_app_compared[name]])
            / median([a["tok_s"] for a in alone[name]])
            for name in lengths
        }
    if args.compare_in_process:
        for key, field in (("ui_over_engine_in_process", "tok_s"), ("ui_over_engine_wall_in_process", "wall_s")):
            result[key] = {
                f"{name}_{lengths[name]}_tokens": (
                    median([b[field] for b in in_app_in_process[name]]) / median([a[field] for a in alone[name]])
                    if field == "tok_s"
                    else median([a[field] for a in alone[name]]) / median([b[field] for b in in_app_in_process[name]])
                )
                for name in lengths
            }
    keys = (
        "ui_over_engine",
        "ui_over_engine_wall",
        "ui_over_engine_compared",
        "ui_over_engine_in_process",
        "ui_over_engine_wall_in_process",
    )
    for key in keys:
        if key in result:
            result[key] = {k: round(v, 3) for k, v in result[key].items()}
    print(json.dumps(result, indent=2))
    out = args.out or (None if args.quick else ROOT / "bench/results" / f"{result['date']}-chat.json")
    if out is None:
        print("--quick: nothing written (give --out to keep it)")
        return
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged[args.device] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {out} ({args.device})")


if __name__ == "__main__":
    main()
