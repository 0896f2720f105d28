"""Would an adapter of half the bytes (int8 instead of float16 weights) make CPU decoding with an adapter faster? The
perf-scale issue's 135M goal: ORT with an adapter >= 1.3x llama.cpp with the same adapter.

    python -m bench.cpu_lora_bytes [--size 135m] [--threads 2] [--rounds 7] [--new-tokens 128]

bench.scaling's ORT model of the size (random weights, `--lora-layout fused`, cached under --work) decodes the same
prompt, rounds interleaved and the order flipping each round:
  none, rank16   no adapter, and its random rank-16 adapter (float16 A and B, the LoraBranch op's inputs);
  rank8          the same adapter cut to rank 8 (each part's first 8 columns of A and rows of B): half the bytes
                 and half the FLOPs, read by the same op and graph;
  q8_none, q8_rank16  the same model with every LoraBranch a LoraBranchQ8 (a graph edit, `q8_model`), and the
                 rank-16 adapter quantized to int8 A and B with one scale per column of A (`q8_adapter`).
An active LoraBranch node reads its adapter from memory at every token (between two reads of one slot the whole
model's weights pass through the caches), so at 135M its cost follows its bytes. Both model folders get this
checkout's kernel library. Also: the int8 adapter's change to the logits against float16's (cosine and norm ratio)
and the first 32 greedy tokens. Writes bench/results/<date>-cpu-lora-bytes-<size>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path

from bench.scaling import SIZES, build, cosine, last_logits_ort
from olive_lab.decode import SPEED_PROMPT, cpu_isa, cpu_name, decode_tok_s, linked_copy, ort_greedy, set_threads
from olive_lab.kernels import LIBRARY, kernels_isa
from olive_lab.kernels import build as build_kernels
from olive_lab.onnx.lora import read_adapter, write_adapter
from olive_lab.paths import BENCH_RESULTS

VARIANTS = ("none", "rank16", "rank8", "q8_none", "q8_rank16")


def q8_model(model_dir: Path, out: Path) -> Path:
    """The fused model folder `model_dir` with every LoraBranch node a LoraBranchQ8 (a graph edit: the weights file
    is hard-linked): A and B int8, and a `<slot>.lora_scale` [rank] input defaulting to [0] like A and B."""
    import onnx
    from onnx import TensorProto, helper

    from olive_lab.onnx.lora import BRANCH_OP, BRANCH_Q8_OP

    linked_copy(model_dir, out)
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    graph = model.graph
    weights = set()
    for node in graph.node:
        if node.op_type == BRANCH_OP:
            y, x, a, b, parts = node.input
            scale = a.replace("lora_A.weight", "lora_scale")
            node.op_type = BRANCH_Q8_OP
            del node.input[:]
            node.input.extend([y, x, a, b, scale, parts])
            weights |= {a, b}
            rank = next(d.dim_param for v in graph.input if v.name == a for d in v.type.tensor_type.shape.dim[1:])
            graph.input.append(helper.make_tensor_value_info(scale, TensorProto.FLOAT, [rank]))
            graph.initializer.append(helper.make_tensor(scale, TensorProto.FLOAT, [0], []))
    for value in graph.input:
        if value.name in weights:
            value.type.tensor_type.elem_type = TensorProto.INT8
    for tensor in graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(helper.make_tensor(tensor.name, TensorProto.INT8, list(tensor.dims), []))
    (out / "model.onnx").unlink()  # a symlink to the original: never write through it
    onnx.save(model, str(out / "model.onnx"))
    # ORT refuses external data that resolves outside the model's folder: a hard link stays inside
    data = out / "model.onnx.data"
    data.unlink()
    data.hardlink_to(model_dir / "model.onnx.data")
    return out


def q8_adapter(adapter: Path, model_dir: Path, out: Path) -> Path:
    """The fused layout's .onnx_adapter `adapter` as LoraBranchQ8 inputs (olive_lab.kernels.quantize_branch_int8),
    the part widths read from the model's `<slot>.lora_parts`."""
    import onnx
    from onnx import numpy_helper

    from olive_lab.kernels import quantize_branch_int8

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    widths = {
        t.name: numpy_helper.to_array(t).tolist() for t in model.graph.initializer if t.name.endswith("lora_parts")
    }
    params = read_adapter(adapter)
    q8 = {}
    for name, a in params.items():
        if name.endswith("lora_A.weight"):
            b_name = name.replace("lora_A", "lora_B")
            qa, qb, scale = quantize_branch_int8(a, params[b_name], widths[name.replace("lora_A.weight", "lora_parts")])
            q8 |= {name: qa, b_name: qb, name.replace("lora_A.weight", "lora_scale"): scale}
    write_adapter(q8, out)
    return out


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

    import numpy as np
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    from olive_lab.lm import prompt_text

    state = build(args.size, args.work, lora_layout="fused")
    onnx_dir = Path(state["onnx"])
    files = {"rank16": onnx_dir / "adapters" / "adapter.onnx_adapter"}
    scratch = args.work / args.size / "cpu-lora-bytes"
    files["rank8"] = cut_rank(files["rank16"], scratch / "rank8.onnx_adapter", 8)
    model_dir = linked_copy(onnx_dir / "model", scratch / "model")
    q8_dir = q8_model(onnx_dir / "model", scratch / "model-q8")
    files["q8_rank16"] = q8_adapter(files["rank16"], onnx_dir / "model", scratch / "q8.onnx_adapter")
    for folder in (model_dir, q8_dir):
        set_threads(folder, args.threads)
        build_kernels(folder)  # this checkout's library in both (replacing the link to the build's): LoraBranchQ8
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(prompt_text(tok, SPEED_PROMPT), add_special_tokens=False).input_ids
    models = {"f16": og.Model(str(model_dir)), "q8": og.Model(str(q8_dir))}
    adapters = {kind: og.Adapters(m) for kind, m in models.items()}
    for name in ("rank16", "rank8"):
        adapters["f16"].load(str(files[name]), name)
    adapters["q8"].load(str(files["q8_rank16"]), "q8_rank16")

    def once(variant: str, n: int, tokens: bool = False):
        kind = "q8" if variant.startswith("q8") else "f16"
        adapter = None if variant.endswith("none") else variant
        new, stamps = ort_greedy(models[kind], adapters[kind], ids, adapter, n, exact=True)
        return new if tokens else stamps

    first = {v: once(v, 32, tokens=True) for v in VARIANTS}
    # the adapter's change to the last prompt position's logits, int8 against float16 (random weights' flat logits let
    # greedy tokens part ways on any rounding, so the tokens alone say little)
    logits = {(kind, a): last_logits_ort(models[kind], adapters[kind], ids, a)
              for kind, a in (("f16", None), ("f16", "rank16"), ("q8", None), ("q8", "q8_rank16"))}  # fmt: skip
    delta_f16 = logits[("f16", "rank16")] - logits[("f16", None)]
    delta_q8 = logits[("q8", "q8_rank16")] - logits[("q8", None)]  # also the warm-up: first runs allocate and pre-pack
    speeds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            speeds[variant].append(round(decode_tok_s(once(variant, args.new_tokens)), 2))
        print(f"[{args.size}] round {r + 1}/{args.rounds}: " + "  ".join(f"{v} {speeds[v][-1]}" for v in VARIANTS),
              flush=True)  # fmt: skip
    median = {v: statistics.median(s) for v, s in speeds.items()}
    cost_ms = {v: round(1e3 / median[v] - 1e3 / median["none"], 3) for v in ("rank16", "rank8")}
    cost_ms["q8_rank16"] = round(1e3 / median["q8_rank16"] - 1e3 / median["q8_none"], 3)
    mb = {name: adapter_mb(path) for name, path in files.items()}
    result = {
        "date": str(date.today()),
        "machine": {"cpu": cpu_name(), "isa": cpu_isa()},
        # the LoraBranch kernels' ISA, as the library chose it: the widest the CPU has unless OLIVE_LAB_KERNELS_ISA
        # names one
        "kernel_isa": kernels_isa(model_dir / LIBRARY),
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
        "q8_over_f16_tok_s": {
            "none": round(median["q8_none"] / median["none"], 3),
            "rank16": round(median["q8_rank16"] / median["rank16"], 3),
        },  # fmt: skip
        # greedy tokens of the first 32: int8 must not change what no adapter decodes, and should follow float16's
        "q8_none_same_tokens": first["q8_none"] == first["none"],
        "q8_adapter_delta_cosine_with_f16": round(cosine(delta_q8, delta_f16), 6),
        "q8_adapter_delta_norm_ratio": round(float(np.linalg.norm(delta_q8) / np.linalg.norm(delta_f16)), 6),
        "q8_rank16_tokens_agreeing_with_f16": next(
            (i for i, (p, q) in enumerate(zip(first["q8_rank16"], first["rank16"], strict=True)) if p != q), 32
        ),
        "about": "rank 8 = the rank-16 adapter cut to half its bytes (and FLOPs): an upper bound on what int8 weights "
        "at rank 16 would give",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "decode_tok_s"} | {"median": median}, indent=2))


if __name__ == "__main__":
    main()
