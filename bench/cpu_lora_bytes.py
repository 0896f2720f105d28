"""Would an adapter of half the bytes (int8 instead of float16 weights) make CPU decoding with an adapter faster? The
perf-scale issue's 135M goal: ORT with an adapter >= 1.3x llama.cpp with the same adapter.

    python -m bench.cpu_lora_bytes [--size 135m] [--threads 2] [--rounds 7] [--new-tokens 128]

bench.scaling's ORT model of the size (random weights, `--lora-layout fused`, cached under --work) decodes the same
prompt with no adapter, with its random rank-16 adapter (float16 A and B, the LoraBranch op's inputs) and with the
same adapter cut to rank 8 (each part's first 8 columns of A and rows of B): half the bytes, read by the same op and
the same graph. Rounds are interleaved, the order flipping each round. An active LoraBranch node reads its adapter
from memory at every token (between two reads of one slot the whole model's weights pass through the caches), so
the rank-8 adapter's cost is what an int8 adapter of rank 16 would cost if the op is bound by those bytes; its FLOPs
are half too, so this is a bound on what int8 would save, not a measurement of int8. Writes
bench/results/<date>-cpu-lora-bytes-<size>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path

from bench.scaling import SIZES, build
from olive_lab.decode import SPEED_PROMPT, cpu_isa, cpu_name, linked_copy, ort_greedy, set_threads
from olive_lab.onnx.lora import read_adapter, write_adapter
from olive_lab.paths import BENCH_RESULTS

VARIANTS = ("none", "rank16", "rank8")


def cut_rank(adapter: Path, out: Path, rank: int) -> Path:
    """The .onnx_adapter `adapter` (the fused layout's packed inputs: A [K, P * r] and B [r, N] per slot, P parts
    sharing x, e.g. q, k and v) with each part's first `rank` columns of A and rows of B."""
    import numpy as np

    params = read_adapter(adapter)
    cut = {}
    for name, value in params.items():
        if name.endswith("lora_A.weight"):
            k, columns = value.shape
            r = params[name.replace("lora_A", "lora_B")].shape[0]
            cut[name] = np.ascontiguousarray(value.reshape(k, columns // r, r)[:, :, :rank].reshape(k, -1))
        elif name.endswith("lora_B.weight"):
            cut[name] = np.ascontiguousarray(value[:rank])
        else:
            cut[name] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    write_adapter(cut, out)
    return out


def adapter_mb(adapter: Path) -> float:
    return round(sum(v.nbytes for v in read_adapter(adapter).values()) / 1e6, 2)


def tok_s(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("bench/work/scaling"), help="bench.scaling's build cache")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: bench/results/<date>-cpu-lora-bytes-<size>.json"
    )
    args = parser.parse_args()
    out = args.out or BENCH_RESULTS / f"{date.today()}-cpu-lora-bytes-{args.size}.json"

    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    from olive_lab.lm import prompt_text

    state = build(args.size, args.work, lora_layout="fused")
    onnx_dir = Path(state["onnx"])
    files = {"rank16": onnx_dir / "adapters" / "adapter.onnx_adapter"}
    files["rank8"] = cut_rank(files["rank16"], args.work / args.size / "cpu-lora-bytes" / "rank8.onnx_adapter", 8)
    model_dir = linked_copy(onnx_dir / "model", args.work / args.size / "cpu-lora-bytes" / "model")
    set_threads(model_dir, args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(prompt_text(tok, SPEED_PROMPT), add_special_tokens=False).input_ids
    model = og.Model(str(model_dir))
    adapters = og.Adapters(model)
    for name in ("rank16", "rank8"):
        adapters.load(str(files[name]), name)

    def once(variant: str, n: int) -> list[float]:
        return ort_greedy(model, adapters, ids, None if variant == "none" else variant, n, exact=True)[1]

    for variant in VARIANTS:  # warm-up: first runs allocate and pre-pack
        once(variant, 16)
    speeds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            speeds[variant].append(round(tok_s(once(variant, args.new_tokens)), 2))
        print(f"[{args.size}] round {r + 1}/{args.rounds}: " + "  ".join(f"{v} {speeds[v][-1]}" for v in VARIANTS),
              flush=True)  # fmt: skip
    median = {v: statistics.median(s) for v, s in speeds.items()}
    cost_ms = {v: round(1e3 / median[v] - 1e3 / median["none"], 3) for v in ("rank16", "rank8")}
    mb = {name: adapter_mb(path) for name, path in files.items()}
    result = {
        "date": str(date.today()),
        "machine": {"cpu": cpu_name(), "isa": cpu_isa()},
        "size": args.size,
        "threads": args.threads,
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "prompt_tokens": len(ids),
        "adapter_mb": mb,
        "decode_tok_s": {"median": median, "readings": speeds},
        "adapter_cost_ms_per_token": cost_ms,
        # each adapter's ms per token over its MB: the rate the decoding step reads it at, if bytes are the cost
        "adapter_ms_per_mb": {v: round(cost_ms[v] / mb[v], 4) for v in cost_ms},
        "rank8_over_rank16_tok_s": round(median["rank8"] / median["rank16"], 3),
        "about": "rank 8 = the rank-16 adapter cut to half its bytes (and FLOPs): an upper bound on what int8 weights "
        "at rank 16 would give",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "decode_tok_s"} | {"median": median}, indent=2))


if __name__ == "__main__":
    main()
