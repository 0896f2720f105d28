"""Decode speed of multi-LoRA ONNX vs the plain int4 model, and adapter load time (ORT GenAI, CPU).

    python -m bench.decode_lora [--hf-dir models/quantized] [--tokens 64] [--rounds 5]

Builds, in a scratch folder, the plain int4 model (no LoRA inputs) and the multi-LoRA model from the same HF folder,
then decodes the same prompt greedily, round-robin so machine noise hits every variant alike:
  plain        int4 model built without adapters
  lora_none    multi-LoRA model, no adapter active (rank-0 defaults)
  lora_<task>  multi-LoRA model with that adapter active; the tasks alternate A/B/A/B within each round
Prints min/median tok/s and median ratios to `plain`; writes bench/results/<date>-lora-cpu.json.
Adapters: models/adapters/<task> when present, else random r=16 ones made on the HF folder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from olive_lab.decode import adapter_load_ms, cpu_name, first_step_ms, set_threads
from olive_lab.decode import model_peak_rss_mb as peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]

PROMPT = "Plan a three-day trip to Lisbon for a family with two kids, with a day-by-day list of places to visit."


def decode_tok_s(model, tokenizer, adapters, name: str | None, tokens: int) -> float:
    import onnxruntime_genai as og

    ids = tokenizer.encode(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    params = og.GeneratorParams(model)
    # min_length = max_length: never stop at an end token, so every run decodes the same count
    params.set_search_options(do_sample=False, max_length=len(ids) + tokens, min_length=len(ids) + tokens)
    gen = og.Generator(model, params)
    if name:
        gen.set_active_adapter(adapters, name)
    gen.append_tokens(ids)  # prefill, not timed
    gen.generate_next_token()
    start = time.perf_counter()
    for _ in range(tokens - 1):
        gen.generate_next_token()
    return (tokens - 1) / (time.perf_counter() - start)


def dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 2)


def build_both(args) -> tuple:
    """The plain and the multi-LoRA int4 model from the same HF folder, with the pipeline's own settings."""
    import yaml

    from olive_lab.onnx.export import build_onnx

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    hf_dir = args.hf_dir or next(p for p in (ROOT / "models/quantized", ROOT / "models/base") if p.exists())
    block = args.block_size or params["optimize"]["block_size"]
    lm_head = args.lm_head or params["optimize"].get("lm_head", "int8")
    layout = args.lora_layout or params["optimize"].get("lora_layout", "branches")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-lora-"))
    adapters = {t: ROOT / "models/adapters" / t for t in args.tasks}
    if not all((p / "adapter_config.json").exists() for p in adapters.values()):
        from olive_lab.lora import random_adapter

        print(f"no trained adapters in models/adapters: making random r=16 ones on {hf_dir}")
        adapters = {t: random_adapter(hf_dir, work / "peft" / t, seed, r=16) for seed, t in enumerate(args.tasks)}
    opts = dict(
        precision="int4",
        block_size=block,
        accuracy_level=params["optimize"]["accuracy_level"],
        execution_provider="cpu",
        lm_head=lm_head,
    )
    print(
        f"building plain and multi-LoRA int4 models from {hf_dir} (block {block}, lm_head {lm_head}, {layout}) in {work}"
    )
    plain = build_onnx(hf_dir, work / "plain", {}, **opts)
    lora = build_onnx(hf_dir, work / "lora", adapters, **opts, lora_layout=layout)
    settings = {"hf_dir": str(hf_dir), "block_size": block, "lm_head": lm_head, "lora_layout": layout}
    return work, settings, {"plain": plain["model_mb"], "lora": lora["model_mb"]}, lora["adapter_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", type=Path, default=None, help="default: models/quantized, else models/base")
    parser.add_argument("--tasks", nargs="+", default=["travel", "trip_json"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=None, help="default: model.group_size from params.yaml")
    parser.add_argument("--lm-head", default=None, help="default: optimize.lm_head from params.yaml")
    parser.add_argument(
        "--lora-layout", default=None, help="branches | switch | resident | fused (default: optimize.lora_layout)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ORT intra-op threads (1: steadier ratios on a shared machine; 0: ORT's default)",
    )
    parser.add_argument(
        "--prebuilt",
        type=Path,
        default=None,
        help="skip building: use PREBUILT/plain and PREBUILT/lora (each laid out like models/onnx)",
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<date>-lora-cpu.json")
    args = parser.parse_args()

    import onnxruntime_genai as og

    if args.prebuilt:
        work, settings = args.prebuilt, {"prebuilt": str(args.prebuilt)}
        sizes = {f: dir_mb(work / f / "model") for f in ("plain", "lora")}
        adapter_mb = {
            t: round((work / "lora/adapters" / f"{t}.onnx_adapter").stat().st_size / 1e6, 2) for t in args.tasks
        }
    else:
        work, settings, sizes, adapter_mb = build_both(args)

    for folder in ("plain", "lora"):
        set_threads(work / folder / "model", args.threads)
    plain = og.Model(str(work / "plain" / "model"))
    lora = og.Model(str(work / "lora" / "model"))
    plain_tok, lora_tok = og.Tokenizer(plain), og.Tokenizer(lora)
    loaded = og.Adapters(lora)
    for t in args.tasks:
        loaded.load(str(work / "lora" / "adapters" / f"{t}.onnx_adapter"), t)

    variants = ["plain", "lora_none"] + [f"lora_{t}" for t in args.tasks]
    speeds: dict[str, list[float]] = {v: [] for v in variants}
    decode_tok_s(plain, plain_tok, None, None, 8)  # warm-up: first runs allocate
    decode_tok_s(lora, lora_tok, loaded, args.tasks[0], 8)
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[:2] + variants[2:][::-1]  # A/B/A/B across rounds
        for v in order:
            if v == "plain":
                speeds[v].append(decode_tok_s(plain, plain_tok, None, None, args.tokens))
            else:
                name = None if v == "lora_none" else v.removeprefix("lora_")
                speeds[v].append(decode_tok_s(lora, lora_tok, loaded, name, args.tokens))
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{v} {speeds[v][-1]:.1f}" for v in variants))

    load_ms = adapter_load_ms(lora, work / "lora" / "adapters" / f"{args.tasks[0]}.onnx_adapter", 10)
    first_none = first_step_ms(lora, loaded, None, 10)
    first_switch = []
    for i in range(10):  # alternate, so each activation is a switch
        first_switch += first_step_ms(lora, loaded, args.tasks[i % len(args.tasks)], 1)
    base = statistics.median(speeds["plain"])
    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        **settings,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "plain_model_mb": sizes["plain"],
        "lora_model_mb": sizes["lora"],
        "adapter_mb": adapter_mb,
        # peak RSS of a process that loads the model and decodes one token (ORT pre-packs int4 weights per kernel)
        "rss_mb": {f: peak_rss_mb(work / f / "model") for f in ("plain", "lora")},
        "tok_s": {v: {"min": round(min(s), 1), "median": round(statistics.median(s), 1)} for v, s in speeds.items()},
        "ratio_to_plain": {v: round(statistics.median(s) / base, 3) for v, s in speeds.items()},
        "adapter_load_ms": {"min": round(min(load_ms), 2), "median": round(statistics.median(load_ms), 2)},
        # a fresh generator plus one token, with no adapter vs with a different adapter each time
        "first_step_ms": {
            "none": round(statistics.median(first_none), 2),
            "switched_adapter": round(statistics.median(first_switch), 2),
        },
    }
    print(json.dumps(result, indent=2))
    out = args.out or ROOT / "bench/results" / f"{result['date']}-lora-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
