"""Quantization: AWQ int4 with llm-compressor, plus plain round-to-nearest (RTN) int4 as the control.

Both are stored "fake-quantized": dense weights that already sit on the int4 grid (asymmetric min/max, one scale and
zero point per `group_size` inputs). Torch, peft and the ONNX exporter read them as an ordinary checkpoint, and
re-quantizing to the same grid at export is exact (tests/test_quantize.py checks it), so the AWQ result survives.

The quantize stage keeps the AWQ model and measures the RTN one in memory (compare_quantizers).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from olive_lab.errors import StageError
from olive_lab.files import atomic_dir, dir_size_mb, read_jsonl, remove_outputs, write_json
from olive_lab.int4_grid import META_FILE, quantized_layers
from olive_lab.lm import encode_example, eval_nll, load_model, load_tokenizer
from olive_lab.memory import require_fits
from olive_lab.scoring import perplexity

log = logging.getLogger(__name__)

# A broken quantization (seen with autoawq on CPU: loss 13 vs 3) is refused rather than passed downstream.
COLLAPSE_RATIO = 2.0


def _cpu_safe_llmcompressor() -> None:
    """llm-compressor pins cached activations for faster host-to-GPU copies; pin_memory crashes without CUDA."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)


def scheme(bits: int, group_size: int, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}


def calibration_rows(splits: Path, tasks: list[str], seed: int) -> list[dict]:
    """Training rows of every task, shuffled and interleaved (our own data, never a hub dataset)."""
    per_task = [read_jsonl(splits / t / "train.jsonl") for t in tasks]
    rng = random.Random(seed)
    for rows in per_task:
        rng.shuffle(rows)
    return [row for group in zip(*per_task, strict=False) for row in group]


def calibration_dataset(tokenizer, rows: list[dict], seq_len: int, samples: int):
    """Chat-formatted rows joined into one token stream and cut into `samples` blocks of `seq_len` tokens.

    Equal-length blocks need no padding, so llm-compressor can run them as one batch: on CPU that is several times
    faster than one sample at a time, and each block sees several examples.
    """
    from datasets import Dataset

    stream = [t for r in rows for t in encode_example(tokenizer, r["prompt"], r["response"], 10**6)[0]]
    blocks = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)][:samples]
    if len(blocks) < samples:
        raise StageError(f"calibration data has {len(stream)} tokens: too few for {samples} blocks of {seq_len}")
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * seq_len for _ in blocks]})


def awq_mappings(model, configured: list[dict] | None):
    """The AWQ smooth/balance mappings: the configured ones (model.awq_mappings: a list of {smooth_layer,
    balance_layers}) or llm-compressor's own for the architecture. Each name or regex must match a module of the
    model, else one line naming it and the model's module names (at run time it would be an error deep in the
    sequential pipeline). Shape-incompatible pairs that do match (v_proj -> o_proj under GQA) llm-compressor skips."""
    from compressed_tensors.utils.match import match_name
    from llmcompressor.modifiers.transform.awq.dynamic_mappings import get_layer_mappings_from_model
    from llmcompressor.modifiers.transform.awq.mappings import AWQMapping

    if configured:
        mappings = [
            AWQMapping(smooth_layer=m["smooth_layer"], balance_layers=list(m["balance_layers"])) for m in configured
        ]
    else:
        mappings = get_layer_mappings_from_model(model)
    names = [n for n, _ in model.named_modules()]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if ".layers.0." in n})
    for m in mappings:
        for target in (m.smooth_layer, *m.balance_layers):
            if not any(match_name(n, target) for n in names):
                raise StageError(
                    f"AWQ mapping {m.smooth_layer} -> {m.balance_layers}: '{target}' matches no module of "
                    f"{type(model).__name__} (its layers have {leaves}); set model.awq_mappings"
                )
    return mappings


def bake(model):
    """Replace each quantized Linear's weight by its fake-quantized value; return a plain state dict."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            qscheme = getattr(module, "quantization_scheme", None)
            if qscheme is None or qscheme.weights is None or not hasattr(module, "weight_scale"):
                continue
            zero = getattr(module, "weight_zero_point", None)
            state[f"{name}.weight"] = fake_quantize(module.weight, module.weight_scale, zero, qscheme.weights).clone()
    if not state:
        raise StageError("llm-compressor quantized no Linear layer (check quantize params and the model type)")
    return state


def quantize(
    model_dir: Path,
    out: Path | None,
    method: str,
    q: dict,
    group_size: int,
    rows: list[dict],
    device: str,
    mappings: list[dict] | None = None,
):
    """Run AWQ or RTN on the model in `model_dir`; save the fake-quantized result to `out` (unless None) and return it
    as a plain model on `device`. `mappings`: AWQ's, from model.awq_mappings (None: llm-compressor's own)."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    _cpu_safe_llmcompressor()
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, device)
    groups = scheme(q["bits"], group_size, q["symmetric"])
    if method == "awq":
        # AWQ searches and folds the scales; the QuantizationModifier after it puts the weights on the grid.
        awq = AWQModifier(n_grid=q["n_grid"], mappings=awq_mappings(model, mappings))
        recipe = [awq, QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
        data = calibration_dataset(tokenizer, rows, q["calib_seq_len"], q["calib_samples"])
        oneshot(
            model=model,
            recipe=recipe,
            dataset=data,
            num_calibration_samples=len(data),
            max_seq_length=q["calib_seq_len"],
            batch_size=len(data),
            shuffle_calibration_samples=False,
            pipeline="sequential",
        )
    elif method == "rtn":
        oneshot(model=model, recipe=QuantizationModifier(config_groups=groups, ignore=["lm_head"]))
    else:
        raise StageError(
            f"params.yaml: quantize.method must be 'awq' (RTN is always written as the control), not '{method}'"
        )
    baked = bake(model)
    # A fresh model (no quantization hooks) with AWQ's smoothed norms and the fake-quantized Linear weights.
    clean = load_model(model_dir, "cpu")
    state = {k: v for k, v in model.state_dict().items() if k in clean.state_dict()}
    state.update(baked)
    missing, unexpected = clean.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and clean.config.tie_word_embeddings)]
    if missing or unexpected:
        raise StageError(f"quantized weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if out is not None:
        with atomic_dir(out) as tmp:
            clean.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(
                tmp / META_FILE,
                {
                    "method": method,
                    "bits": q["bits"],
                    "group_size": group_size,
                    "symmetric": q["symmetric"],
                    "quantized": sorted(baked),
                },
            )
    return clean.to(device).eval()


def int4_size_mb(model_dir: Path, bits: int, group_size: int) -> float:
    """Size the model would have packed: int4 Linear weights + fp16 scale and zero point per group, the rest fp16."""
    from safetensors import safe_open

    meta = quantized_layers(model_dir)
    total = 0.0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            n = f.get_slice(key).get_shape()
            numel = 1
            for d in n:
                numel *= d
            total += numel * bits / 8 + numel / group_size * 4 if key in meta else numel * 2
    return round(total / 1e6, 2)


def compare_quantizers(
    base: Path,
    out: Path,
    splits: Path,
    tasks: list[str],
    q: dict,
    group_size: int,
    seed: int,
    max_len: int,
    device: str,
    mappings: list[dict] | None = None,
) -> tuple[dict, dict]:
    """AWQ into `out`, the RTN control in memory, fp32 as reference, each measured on every task's eval split.

    Returns (metrics, perf): metrics hold only what the weights determine (losses, perplexities, sizes), so an
    identical re-run writes an identical file; perf holds the wall-clock seconds. One model in memory at a time
    (a 3.8B fp32 model is 15 GB). A collapsed AWQ model is deleted and refused.
    """
    if q["bits"] != 4:
        raise StageError("params.yaml: quantize.bits must be 4 (the ONNX int4 export needs it)")
    if not (Path(base) / "config.json").exists():  # else transformers reads the folder name as a hub id
        raise StageError(f"{Path(base) / 'config.json'}: not found (run `dvc repro base` first)")
    require_fits(base, "quantize", device)
    eval_rows = {t: read_jsonl(splits / t / "eval.jsonl") for t in tasks}
    rows = calibration_rows(splits, tasks, seed)
    log.info(
        "calibrating AWQ on %d blocks of %d tokens from the %s training rows",
        q["calib_samples"],
        q["calib_seq_len"],
        "+".join(tasks),
    )
    tok = load_tokenizer(base)
    losses, task_losses = {}, {}

    def measure(name: str, model) -> None:
        """Eval loss per task and pooled over all eval rows (token-weighted); evaluate reports the per-task ones."""
        sums = {t: eval_nll(model, tok, r, max_len) for t, r in eval_rows.items()}
        count = sum(n for _, n in sums.values())
        if count == 0:
            raise StageError("no response tokens to evaluate (empty eval split or evaluate.max_seq_len too small)")
        losses[name] = sum(total for total, _ in sums.values()) / count
        task_losses[name] = {t: round(total / n, 4) for t, (total, n) in sums.items()}
        log.info("%s: eval loss %.4f, perplexity %.3f", name, losses[name], perplexity(losses[name]))

    start = time.time()
    awq = quantize(base, out, "awq", q, group_size, rows, device, mappings)
    awq_seconds = time.time() - start
    log.info("AWQ done in %.0f s", awq_seconds)
    measure("awq", awq)
    del awq
    log.info("now the RTN control (measured here, not kept: evaluate reads its losses)")
    measure("rtn", quantize(base, None, "rtn", q, group_size, rows, device))
    measure("fp32", load_model(base, device))
    ppl = {name: perplexity(loss) for name, loss in losses.items()}
    metrics = {
        "fp32_ppl": ppl["fp32"],
        "rtn_ppl": ppl["rtn"],
        "awq_ppl": ppl["awq"],
        "awq_over_fp32": round(ppl["awq"] / ppl["fp32"], 4),
        "rtn_over_fp32": round(ppl["rtn"] / ppl["fp32"], 4),
        "fp32_eval_loss": round(losses["fp32"], 4),
        "awq_eval_loss": round(losses["awq"], 4),
        "task_eval_loss": task_losses,
        "calib_tokens": q["calib_samples"] * q["calib_seq_len"],
        "base_mb": dir_size_mb(base),
        "int4_packed_mb": int4_size_mb(out, q["bits"], group_size),
    }
    log.info("awq_ppl %.3f vs rtn_ppl %.3f (fp32 %.3f)", ppl["awq"], ppl["rtn"], ppl["fp32"])
    if ppl["awq"] > COLLAPSE_RATIO * ppl["fp32"]:
        remove_outputs(out)
        raise StageError(f"AWQ collapsed the model: perplexity {ppl['awq']} vs fp32 {ppl['fp32']}")
    return metrics, {"awq_seconds": round(awq_seconds, 1), "seconds": round(time.time() - start, 1)}
