"""CPU decode across model sizes: our ORT GenAI int4 model against llama.cpp Q4_0 made from the same weights, with and
without the same adapter, and against the memory-bandwidth bound (the perf-scale issue).

    make bench-setup                    # once: llama-cpp-python (9-45 min on 2 cores)
    python -m bench.scaling [--sizes 135m,360m,1.7b,3.8b] [--threads 2] [--rounds 7] [--new-tokens 128]

Per size, random weights (decode speed does not depend on their values) in Llama's architecture at the published
dimensions of SmolLM2-135M, -360M and -1.7B and of Phi-3.5-mini (3.8B, written as a Llama: same matrices, unfused),
with SmolLM2's tokenizer, and one random rank-16 PEFT adapter on every projection. Then:
  ort        olive_lab.onnx.export.build_onnx with params.yaml's `optimize` values for the CPU (RTN int4 from the
             builder, since the weights are not pre-quantized), the adapter as an .onnx_adapter
  llama_q4_0 olive_lab.gguf_export.model_gguf writes the same weights as an f16 GGUF, llama.cpp's own quantizer makes
             Q4_0 of it (its output matrix at Q6_K/Q8_0, as llama.cpp chooses); the adapter through lora_gguf
A size the host cannot build (the builder's measured memory) is recorded as skipped with the reason. Builds are
cached under --work. Measuring starts only after every build is done, one size at a time, with interleaved rounds
(the order flips each round) and the same 95-token prompt; 128 tokens decoded greedily without stopping.

Per variant: decode tok/s, TTFT and prefill tok/s (prompt tokens / TTFT), peak RSS of a fresh process that loads
the model and decodes, and the share of the bandwidth bound: copy bandwidth (read + write; the best of readings
before, between and after the rounds) / the bytes one decoding
step reads (weights but the embedding table, which is one row unless it is also the output matrix; the adapter; the
KV cache at the mean context length, fp32 in ORT and f16 in llama.cpp). For ORT, also ORT's own per-op profile of a
decode step. That both engines run the same model and the same adapter: the cosine of their last-position logits,
and of the adapter's change to them, with fp32 torch + PEFT's. Writes bench/results/<date>-scaling.json and prints
the README's mermaid chart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.cpu_vs_llama import (
    agreement,
    copy_bandwidth_gb_s,
    llama_model,
    llama_run,
    profile_decode,
    requantize,
    require_llama_cpp,
    summary,
)
from olive_lab.decode import (
    SPEED_PROMPT,
    bytes_per_token,
    cpu_isa,
    cpu_name,
    decode_tok_s,
    linked_copy,
    model_peak_rss_mb,
    ort_greedy,
)
from olive_lab.errors import StageError

ROOT = Path(__file__).resolve().parents[1]
RANK = 16
# Published config.json dimensions (HuggingFaceTB/SmolLM2-*-Instruct, microsoft/Phi-3.5-mini-instruct).
SIZES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, rope_theta=100000.0, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, rope_theta=130000.0, tie_word_embeddings=True),
    "3.8b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, rope_theta=10000.0, tie_word_embeddings=False),
}  # fmt: skip
VARIANTS = ("ort_base", "ort_adapter", "llama_q4_0", "llama_q4_0_adapter")
# the goals: ORT with the adapter over llama.cpp with the same adapter, and ORT's share of the bound
GOALS = {"adapter_ratio_at_1.7b_plus": 1.5, "adapter_ratio_at_135m": 1.3, "share_of_bound_at_1.7b_plus": 0.6}


def model_conf(size: str) -> dict:
    conf = yaml.safe_load((ROOT / "conf/model/smollm2_135m.yaml").read_text())
    arch = {"model_type": "llama", **SIZES[size], "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "dtype": "bfloat16", "seed": 0}  # fmt: skip
    conf.update(name=f"llama_{size}_random", source="random", arch=arch, chat_template=None, tokenizer_dir=None)
    return conf


def fits(conf: dict) -> str | None:
    """Why this host cannot build the size (the base and optimize stages' memory estimates), or None."""
    from olive_lab.memory import require_host_memory

    config = {k: v for k, v in conf["arch"].items() if k not in ("seed", "dtype")} | {"vocab_size": 49152}
    try:
        for stage in ("base", "optimize"):
            require_host_memory(config, stage, source=f"size {conf['name']}")
    except StageError as exc:
        return str(exc)
    return None


def build(size: str, work: Path, block_size: int | None = None, lora_layout: str | None = None,
          adapter_dtype: str = "float16") -> dict:  # fmt: skip
    """The HF folder, the ORT model with its adapter, the Q4_0 GGUF and the LoRA GGUF of one size (cached). With
    `block_size` or `lora_layout`, the ORT model uses that int4 block or LoRA layout instead of params.yaml's (its own
    folder; the rest is shared)."""
    from olive_lab.base_model import gguf_path, materialize
    from olive_lab.gguf_export import lora_gguf, model_gguf
    from olive_lab.lora import random_adapter
    from olive_lab.onnx.export import build_onnx
    from olive_lab.onnx.lora import resolve_layout

    conf = model_conf(size)
    root = work / size
    opt = yaml.safe_load((ROOT / "params.yaml").read_text())["optimize"]
    layout = resolve_layout(lora_layout or opt["lora_layout"], "cpu")
    suffix = ("" if block_size is None else f"-b{block_size}") + ("" if lora_layout is None else f"-{layout}")
    suffix += "" if adapter_dtype == "float16" else f"-{adapter_dtype}"
    state_file = root / f"state{suffix}.json"
    if state_file.exists():
        return json.loads(state_file.read_text())
    base, onnx_dir, peft_dir = root / "base", root / f"onnx{suffix}", root / "peft"
    block = block_size or int(opt["block_size"])
    seconds = {}
    start = time.time()
    if not (base / "config.json").exists():
        print(f"[{size}] random weights", flush=True)
        materialize(conf, base)
    seconds["base"] = round(time.time() - start, 1)
    if not (peft_dir / "adapter_config.json").exists():
        random_adapter(base, peft_dir, seed=0, r=RANK, target_modules=conf["lora_targets"])
    start = time.time()
    if not (onnx_dir / "model" / "genai_config.json").exists():
        print(f"[{size}] ONNX int4, block {block} (the optimize stage's builder call)", flush=True)
        build_onnx(base, onnx_dir, {"adapter": peft_dir}, precision=opt["precision"], block_size=block,
                   accuracy_level=int(opt["accuracy_level"]), execution_provider="cpu", lm_head=opt["lm_head"],
                   lora_layout=layout, adapter_dtype=adapter_dtype)  # fmt: skip
    seconds["onnx"] = round(time.time() - start, 1)
    start = time.time()
    q4_0 = root / "model-q4_0.gguf"
    if not q4_0.exists():
        f16 = model_gguf(base, root / "model-f16.gguf", gguf_path(conf["package"], conf["gguf_file"]), "f16")
        requantize(f16, q4_0, "Q4_0")
        f16.unlink()  # only the quantized file is measured
    hf_config = json.loads((base / "config.json").read_text())
    lora = lora_gguf(peft_dir, hf_config, root / "lora.gguf")
    seconds["gguf"] = round(time.time() - start, 1)
    state = {"size": size, "base": str(base), "onnx": str(onnx_dir), "ort_block_size": block, "lora_layout": layout,
             "adapter_dtype": adapter_dtype,
             "q4_0": str(q4_0), "lora": str(lora), "build_seconds": seconds}  # fmt: skip
    state_file.write_text(json.dumps(state, indent=2))
    return state


def gguf_bytes_per_token(path: Path, lora: Path | None, context: int, config: dict) -> dict:
    """What one llama.cpp decoding step reads: the tensors (token_embd by one row, unless it is also the output
    matrix), the LoRA file, the f16 KV cache."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    weights = 0
    for t in reader.tensors:
        size = int(t.n_bytes)
        if t.name == "token_embd.weight" and "output.weight" in names:
            size //= int(t.shape[-1])  # one row per token (GGUF shape is [in, rows])
        weights += size
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2 * context
    adapter = lora.stat().st_size if lora else 0
    return {"weights": weights, "adapter": adapter, "kv_cache": kv, "total": weights + adapter + kv}


def llama_peak_rss_mb(path: Path, lora: Path | None, threads: int) -> float:
    """Peak RSS of a fresh process that loads the GGUF (and LoRA) in llama.cpp and decodes a few tokens."""
    code = (
        "import sys\nfrom bench.cpu_vs_llama import llama_model, llama_run\n"
        "llm = llama_model(__import__('pathlib').Path(sys.argv[1]), int(sys.argv[2]), "
        "__import__('pathlib').Path(sys.argv[3]) if sys.argv[3] else None)\n"
        "llama_run(llm, [1, 2, 3], 4)\n"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    )
    argv = [sys.executable, "-c", code, str(path), str(threads), str(lora or "")]
    what = f"{path}{f' with {lora}' if lora else ''}"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT)
    except subprocess.CalledProcessError as exc:
        if exc.returncode < 0:  # a signal: llama.cpp itself crashed, which would kill the bench in-process
            raise SystemExit(
                f"llama.cpp crashed (signal {-exc.returncode}) decoding {what}: rebuild it with `make bench-setup` "
                "(the Makefile says which llama.cpp backend crashed before)"
            ) from None
        last = (exc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"llama.cpp could not decode {what}: {last[0]}") from None
    return round(int(out.stdout.split()[-1]) / 1024, 1)


def last_logits_ort(model, adapters, ids: list[int], adapter: str | None):
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    gen = og.Generator(model, params)
    if adapter:
        gen.set_active_adapter(adapters, adapter)
    gen.append_tokens(ids)
    logits = np.asarray(gen.get_output("logits"), np.float32)
    return logits.reshape(-1, logits.shape[-1])[-1]


def last_logits_llama(llm, ids: list[int]):
    """llama.cpp's logits for the prompt's last position (llama-cpp-python keeps them only in the C context
    unless logits_all)."""
    import ctypes

    import numpy as np

    llm.reset()
    llm.eval(ids)
    pointer = llm._ctx.get_logits_ith(-1)  # noqa: SLF001 - the public API offers no logits without logits_all
    return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(llm.n_vocab(),)).copy()


def torch_last_logits(base: Path, peft_dir: Path, ids: list[int]) -> tuple:
    """The fp32 reference: the prompt's last-position logits of the HF model without and with the PEFT adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        plain = model(torch.tensor([ids])).logits[0, -1].numpy()
        adapted = PeftModel.from_pretrained(model, str(peft_dir))(torch.tensor([ids])).logits[0, -1].numpy()
    return plain, adapted


def cosine(a, b) -> float:
    import numpy as np

    return round(float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)), 3)


def same_model_checks(reference: tuple, model, adapters, llamas: dict, ids: list[int]) -> dict:
    """That both engines run the same model and apply the same adapter: the cosine of each engine's last-position
    logits with fp32 torch's, and of the change the adapter makes to them with the change it makes in torch + PEFT.
    Greedy tokens cannot show it on random weights, whose nearly flat logits let int4 and Q4_0 rounding pick
    different tokens within a few steps; both engines should come out alike (an ignored or mis-laid adapter gives
    a cosine near 0)."""
    plain, adapted = reference
    ort = {a: last_logits_ort(model, adapters, ids, a) for a in (None, "adapter")}
    cpp = {v: last_logits_llama(llamas[v], ids) for v in ("llama_q4_0", "llama_q4_0_adapter")}
    return {
        "logits_cosine_with_torch": {"ort": cosine(plain, ort[None]), "llama": cosine(plain, cpp["llama_q4_0"])},
        "adapter_delta_cosine_with_torch_peft": {
            "ort": cosine(adapted - plain, ort["adapter"] - ort[None]),
            "llama": cosine(adapted - plain, cpp["llama_q4_0_adapter"] - cpp["llama_q4_0"]),
        },
    }


def decode_rounds(state: dict, ids: list[int], scratch: Path, threads: int, rounds: int, new_tokens: int,
                  reference: tuple):  # fmt: skip
    """Every variant's token timestamps per round (interleaved, the order flipping each round), and the checks that
    both engines run the same adapter on the same model. The models are freed on return."""
    import onnxruntime_genai as og

    from olive_lab.decode import set_threads

    size, onnx_dir = state["size"], Path(state["onnx"])
    model_dir = linked_copy(onnx_dir / "model", scratch / "model")
    set_threads(model_dir, threads)
    model = og.Model(str(model_dir))
    adapters = og.Adapters(model)
    adapters.load(str(onnx_dir / "adapters" / "adapter.onnx_adapter"), "adapter")
    q4_0, lora = Path(state["q4_0"]), Path(state["lora"])
    # llama.cpp first in child processes (their peak RSS is the size's figure): one that crashes stops the bench in
    # one line instead of killing it here
    llama_rss = {"llama_q4_0": llama_peak_rss_mb(q4_0, None, threads),
                 "llama_q4_0_adapter": llama_peak_rss_mb(q4_0, lora, threads)}  # fmt: skip
    llamas = {"llama_q4_0": llama_model(q4_0, threads), "llama_q4_0_adapter": llama_model(q4_0, threads, lora)}

    def once(variant: str, n: int) -> tuple[list[int], list[float]]:
        if variant.startswith("llama_"):
            return llama_run(llamas[variant], ids, n)
        return ort_greedy(model, adapters, ids, "adapter" if variant == "ort_adapter" else None, n, exact=True)

    tokens = {v: once(v, 32)[0] for v in VARIANTS}  # also the warm-up: first runs allocate and pre-pack
    checks = {
        **same_model_checks(reference, model, adapters, llamas, ids),
        "llama_adapter_changes_tokens": tokens["llama_q4_0_adapter"] != tokens["llama_q4_0"],
        "greedy_agreement_llama_vs_ort_32_tokens": agreement(tokens["llama_q4_0"], tokens["ort_base"]),
        "llama_peak_rss_mb": llama_rss,
    }
    runs: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    # The bound's bandwidth is measured between rounds too and the best reading kept: on a shared host one reading
    # can land in a busy moment (17.6 to 40 GB/s were seen on one host), which would flatter every share of it.
    checks["copy_bandwidth_gb_s_readings"] = [round(copy_bandwidth_gb_s(threads, repeats=3), 1)]
    for r in range(rounds):
        for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            runs[v].append(once(v, new_tokens)[1])
        checks["copy_bandwidth_gb_s_readings"].append(round(copy_bandwidth_gb_s(threads, repeats=3), 1))
        print(
            f"[{size}] round {r + 1}/{rounds}: " + "  ".join(f"{v} {decode_tok_s(runs[v][-1]):.1f}" for v in VARIANTS),
            flush=True,
        )
    return runs, checks


def paired_ratios(ort: list[list[float]], llama: list[list[float]]) -> dict:
    """Round by round decode-speed ratios of two variants' stamps, and their median."""
    ratios = [decode_tok_s(a) / decode_tok_s(b) for a, b in zip(ort, llama, strict=True)]
    return {"median": round(statistics.median(ratios), 3), "rounds": [round(r, 3) for r in ratios]}


def measure(state: dict, threads: int, rounds: int, new_tokens: int, profile: bool) -> dict:
    from transformers import AutoTokenizer

    from olive_lab.lm import prompt_text
    from olive_lab.memory import param_count

    size = state["size"]
    base, onnx_dir = Path(state["base"]), Path(state["onnx"])
    q4_0, lora = Path(state["q4_0"]), Path(state["lora"])
    hf_config = json.loads((base / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(base))
    ids = tok(prompt_text(tok, SPEED_PROMPT), add_special_tokens=False).input_ids
    scratch = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    adapter_file = onnx_dir / "adapters" / "adapter.onnx_adapter"
    reference = torch_last_logits(base, base.parent / "peft", ids)  # before the engines load
    runs, checks = decode_rounds(state, ids, scratch, threads, rounds, new_tokens, reference)
    speed = {v: summary(s) for v, s in runs.items()}
    decode = {v: s["decode_tok_s"]["median"] for v, s in speed.items()}
    ttft = {v: s["ttft_ms"]["median"] for v, s in speed.items()}
    readings = checks.pop("copy_bandwidth_gb_s_readings")
    llama_rss = checks.pop("llama_peak_rss_mb")
    bandwidth = max(copy_bandwidth_gb_s(threads), *readings)
    context = len(ids) + new_tokens // 2
    read = {
        "ort_base": bytes_per_token(onnx_dir / "model", None, context),
        "ort_adapter": bytes_per_token(onnx_dir / "model", adapter_file, context),
        "llama_q4_0": gguf_bytes_per_token(q4_0, None, context, hf_config),
        "llama_q4_0_adapter": gguf_bytes_per_token(q4_0, lora, context, hf_config),
    }
    bound = {v: bandwidth * 1e9 / b["total"] for v, b in read.items()}
    rss = {"ort_base": model_peak_rss_mb(onnx_dir / "model"), **llama_rss}
    result = {
        "params_b": round(param_count({**hf_config}) / 1e9, 3),
        "ort_block_size": state.get("ort_block_size", 32),
        "lora_layout": state.get("lora_layout", "branches"),
        "adapter_dtype": state.get("adapter_dtype", "float16"),
        "dims": SIZES[size],
        "ratio": {
            "no_adapter": round(decode["ort_base"] / decode["llama_q4_0"], 2),
            "adapter_vs_llama_same_adapter": round(decode["ort_adapter"] / decode["llama_q4_0_adapter"], 2),
            "adapter_vs_llama_without": round(decode["ort_adapter"] / decode["llama_q4_0"], 2),
            "prefill": round(ttft["llama_q4_0"] / ttft["ort_base"], 2),
            "prefill_adapter": round(ttft["llama_q4_0_adapter"] / ttft["ort_adapter"], 2),
        },
        # each round's own ratio (the variants ran back to back in it): a shared host's slow stretches move both
        # engines of a round together, so these spread less than the medians' ratio moves from run to run
        "ratio_per_round": {
            "no_adapter": paired_ratios(runs["ort_base"], runs["llama_q4_0"]),
            "adapter_vs_llama_same_adapter": paired_ratios(runs["ort_adapter"], runs["llama_q4_0_adapter"]),
        },
        "share_of_bound": {v: round(decode[v] / bound[v], 3) for v in VARIANTS},
        "decode_tok_s": decode,
        "ttft_ms": ttft,
        "prefill_tok_s": {v: round(len(ids) / (t / 1000), 1) for v, t in ttft.items()},
        "rss_mb": rss,
        "bandwidth_bound_tok_s": {v: round(b, 1) for v, b in bound.items()},
        "bytes_per_token_mb": {v: {k: round(x / 1e6, 1) for k, x in b.items()} for v, b in read.items()},
        "copy_bandwidth_gb_s": round(bandwidth, 1),
        "copy_bandwidth_gb_s_readings": readings,
        "speed": speed,
        "same_adapter_check": checks,
        "files_mb": {
            "onnx_model": round(sum(f.stat().st_size for f in (onnx_dir / "model").iterdir()) / 1e6, 1),
            "onnx_adapter": round(adapter_file.stat().st_size / 1e6, 1),
            "gguf_q4_0": round(q4_0.stat().st_size / 1e6, 1),
            "gguf_lora": round(lora.stat().st_size / 1e6, 1),
        },
        "build_seconds": state["build_seconds"],
    }
    if profile:
        result["decode_step_profile"] = {
            v: profile_decode(onnx_dir / "model", adapter_file if v == "ort_adapter" else None, threads, context)
            for v in ("ort_base", "ort_adapter")
        }
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def add_run_best_bound(sizes: dict) -> None:
    """Each size's share of the bound also against the best copy bandwidth of the whole run. A size's own readings
    can all fall in a busy stretch of a shared host (2026-12-06: 16 GB/s through the 360M rounds, 40-60 around
    them), which makes its own share read near 100 %; the run-wide best is the host's bandwidth."""
    measured = [v for v in sizes.values() if "ratio" in v]
    if not measured:
        return
    best = max(v["copy_bandwidth_gb_s"] for v in measured)
    for v in measured:
        scale = v["copy_bandwidth_gb_s"] / best
        v["share_of_run_best_bound"] = {k: round(x * scale, 3) for k, x in v["share_of_bound"].items()}
        v["run_best_copy_bandwidth_gb_s"] = best


def goals(sizes: dict) -> dict:
    """Each goal of the issue, met or not, from the measured sizes (None where no size was measured)."""
    big = {k: v for k, v in sizes.items() if "ratio" in v and v["params_b"] >= 1.6}

    def every(values: list[bool]) -> bool | None:
        return all(values) if values else None

    def adapter_ratio(v: dict) -> float:
        # the median of the rounds' own ratios where measured: the medians' ratio, rounded to 2 decimals for the
        # table, read 1.30 from 95.9 / 73.8 = 1.2995 on 2026-12-08 while the rounds' median was 1.284
        paired = v.get("ratio_per_round", {}).get("adapter_vs_llama_same_adapter")
        return paired["median"] if paired else v["ratio"]["adapter_vs_llama_same_adapter"]

    small = sizes.get("135m", {})
    return {
        "adapter_ratio_ge_1.5_at_1.7b_plus": every(
            [adapter_ratio(v) >= GOALS["adapter_ratio_at_1.7b_plus"] for v in big.values()]
        ),
        "adapter_ratio_ge_1.3_at_135m": (
            adapter_ratio(small) >= GOALS["adapter_ratio_at_135m"] if "ratio" in small else None
        ),
        "share_of_bound_ge_0.6_at_1.7b_plus": every(
            [
                v.get("share_of_run_best_bound", v["share_of_bound"])[k] >= GOALS["share_of_bound_at_1.7b_plus"]
                for v in big.values()
                for k in ("ort_base", "ort_adapter")
            ]
        ),
        "prefill_at_least_llama_at_1.7b_plus": every([v["ratio"]["prefill"] >= 1.0 for v in big.values()]),
    }


def mermaid(sizes: dict) -> str:
    """The README's chart: ORT over llama.cpp decode speed by model size, with and without the adapter."""
    measured = [k for k, v in sizes.items() if "ratio" in v]
    labels = ", ".join(f'"{k} ({sizes[k]["params_b"]:.2f}B)"' for k in measured)
    plain = ", ".join(str(sizes[k]["ratio"]["no_adapter"]) for k in measured)
    adapter = ", ".join(str(sizes[k]["ratio"]["adapter_vs_llama_same_adapter"]) for k in measured)
    top = max(2.0, *(sizes[k]["ratio"]["adapter_vs_llama_same_adapter"] for k in measured)) + 0.2
    return (
        "```mermaid\nxychart-beta\n"
        '    title "ORT GenAI int4 / llama.cpp Q4_0 decode tok/s (bars: with the same adapter; line: no adapter)"\n'
        f"    x-axis [{labels}]\n"
        f'    y-axis "ratio" 0 --> {top:.1f}\n'
        f"    bar [{adapter}]\n    line [{plain}]\n```"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--work", type=Path, default=ROOT / "bench/work/scaling", help="builds are cached here")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<date>-scaling.json")
    parser.add_argument("--no-profile", action="store_true", help="skip ORT's per-op profile of a decode step")
    parser.add_argument("--block-size", type=int, default=None, help="ORT's int4 block (default: params.yaml's)")
    parser.add_argument("--lora-layout", default=None, help="ORT's LoRA layout (default: params.yaml's, for the CPU)")
    parser.add_argument("--adapter-dtype", default="float16", choices=("float16", "int8"),
                        help="ORT's adapter weights with --lora-layout fused (optimize.adapter_dtype)")  # fmt: skip
    args = parser.parse_args()
    wanted = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SIZES]
    if unknown:
        raise SystemExit(f"--sizes: unknown size '{unknown[0]}' (known: {', '.join(SIZES)})")
    require_llama_cpp()

    sizes: dict[str, dict] = {}
    states = {}
    for size in wanted:  # every build first: nothing heavy runs while measuring
        reason = fits(model_conf(size))
        if reason:
            sizes[size] = {"skipped": reason}
            print(f"[{size}] skipped: {reason}", flush=True)
            continue
        try:
            states[size] = build(size, args.work, args.block_size, args.lora_layout, args.adapter_dtype)
        except StageError as exc:
            raise SystemExit(f"[{size}] {exc}") from None
    for size, state in states.items():
        sizes[size] = measure(state, args.threads, args.rounds, args.new_tokens, not args.no_profile)
        print(
            f"[{size}] {json.dumps({k: sizes[size][k] for k in ('params_b', 'ratio', 'share_of_bound')})}", flush=True
        )
    add_run_best_bound(sizes)
    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{cpu_name()} ({', '.join(cpu_isa()) or 'no AVX'}), {os.cpu_count()} cores",
        "threads": args.threads,
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "rank": RANK,
        "goals": goals(sizes),
        "sizes": sizes,
    }
    out = args.out or ROOT / "bench/results" / f"{result['date']}-scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"goals": result["goals"]}, indent=2))
    print(mermaid(sizes))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
