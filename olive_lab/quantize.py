"""Quantization with llm-compressor: AWQ, GPTQ or both int4, plus plain round-to-nearest (RTN) int4 as the control;
optionally with the quantization-sensitive projections at int8 (mixed precision).

  awq       AWQModifier (searches per-channel scales and folds them into the norms) + QuantizationModifier (RTN)
  gptq      GPTQModifier: each Linear's columns rounded in turn, the error compensated on the columns left
  awq+gptq  one recipe: AWQ's scales, then GPTQ rounds the rescaled weights (llm-compressor's own examples do this)
  rtn       QuantizationModifier alone: min/max round-to-nearest

All are stored "fake-quantized": dense weights that already sit on their grid (asymmetric min/max, one scale and
zero point per `group_size` inputs; 4 bits, or 8 for the int8 modules). Torch, peft and the ONNX exporter read them
as an ordinary checkpoint, and the export re-quantizes each weight to the same grid exactly (tests/test_quantize.py
and the optimize stage's grid check), so what was quantized here is what ONNX runs.

The quantize stage keeps the configured method's model and measures the RTN one in memory (compare_quantizers).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from olive_lab.errors import StageError
from olive_lab.files import atomic_dir, dir_size_mb, read_jsonl, remove_outputs, write_json
from olive_lab.int4_grid import GRID_FILE, META_FILE, read_grid
from olive_lab.lm import encode_example, eval_nll, load_model, load_tokenizer
from olive_lab.memory import require_fits
from olive_lab.scoring import perplexity

log = logging.getLogger(__name__)

# A broken quantization (seen with autoawq on CPU: loss 13 vs 3) is refused rather than passed downstream.
COLLAPSE_RATIO = 2.0
METHODS = ("awq", "gptq", "awq+gptq", "rtn")
# projections the ONNX export packs into one MatMul, which has one precision; Phi-3 checkpoints hold them fused
PACKED_TOGETHER = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})
FUSED_IN = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
            "up_proj": "gate_up_proj"}  # fmt: skip


def sensitive_layers(num_layers: int) -> list[int]:
    """llama.cpp's choice of the layers to keep at higher precision (its Q4_K_M `use_more_bits`, which the ORT GenAI
    builder's `mixed_layers` preset copies): the first and last eighth, then every third layer."""
    eighth = num_layers / 8
    return [i for i in range(num_layers) if i < eighth or i >= 7 * eighth or (i - round(eighth)) % 3 == 2]


def int8_module_names(model, layers, modules: list[str]) -> list[str]:
    """Full names of the Linear modules to keep at int8: `modules` (leaf names such as v_proj) in `layers`, which
    is "sensitive" (sensitive_layers), a list of layer indices, or empty/None for none. One line naming the problem
    when a layer or module does not exist."""
    import torch

    if not layers or not modules:
        return []
    for pack in PACKED_TOGETHER:
        if pack & set(modules) and not pack <= set(modules):
            raise StageError(
                f"params.yaml: quantize.int8_modules lists {sorted(pack & set(modules))} but not "
                f"{sorted(pack - set(modules))}: the export packs {', '.join(sorted(pack))} into one MatMul, of one "
                "precision (list all or none)"
            )
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    n_layers = int(model.config.num_hidden_layers)
    if layers == "sensitive":
        layers = sensitive_layers(n_layers)
    elif isinstance(layers, str) or not all(isinstance(i, int) and 0 <= i < n_layers for i in layers):
        raise StageError(
            f"params.yaml: quantize.int8_layers must be 'sensitive', a list of layer indices in 0..{n_layers - 1} "
            f"or null, not {layers!r}"
        )
    names: list[str] = []
    for i in layers:
        for leaf in modules:
            found = [n for n in linear if n.startswith(f"model.layers.{i}.") and n.rsplit(".", 1)[-1] == leaf]
            if not found and leaf in FUSED_IN:
                fused = FUSED_IN[leaf]
                found = [n for n in linear if n.startswith(f"model.layers.{i}.") and n.rsplit(".", 1)[-1] == fused]
            if len(found) != 1:
                leaves = sorted({n.rsplit(".", 1)[-1] for n in linear if n.startswith(f"model.layers.{i}.")})
                raise StageError(
                    f"params.yaml: quantize.int8_modules: '{leaf}' is not a Linear of layer {i} "
                    f"(its Linear layers are {leaves})"
                )
            names += [n for n in found if n not in names]
    return names


def _cpu_safe_llmcompressor() -> None:
    """llm-compressor pins cached activations for faster host-to-GPU copies; pin_memory crashes without CUDA."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)


def scheme(bits: int, group_size: int, symmetric: bool, int8_names: list[str] | tuple = ()):
    """Config groups: every Linear at `bits`, and the `int8_names` modules at 8 bits (an exact module name takes
    precedence over a class name in compressed-tensors' matching)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    def args(n_bits: int):
        return QuantizationArgs(
            num_bits=n_bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size
        )

    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args(bits))}
    if int8_names:
        groups["group_1"] = QuantizationScheme(targets=list(int8_names), weights=args(8))
    return groups


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


def bake(model) -> tuple[dict, dict[str, int], dict]:
    """Replace each quantized Linear's weight by its fake-quantized value; return a plain state dict, the bits of
    each weight in it and each one's grid ("<weight>.scale" / ".zero_point", for GRID_FILE)."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state, bits, grid = {}, {}, {}
    with torch.no_grad():
        for name, module in model.named_modules():
            qscheme = getattr(module, "quantization_scheme", None)
            if qscheme is None or qscheme.weights is None or not hasattr(module, "weight_scale"):
                continue
            if getattr(module, "weight_g_idx", None) is not None:  # columns regrouped: not the export's plain blocks
                raise StageError(f"{name}: quantized with activation-ordered groups, which the ONNX export cannot hold")
            zero = getattr(module, "weight_zero_point", None)
            state[f"{name}.weight"] = fake_quantize(module.weight, module.weight_scale, zero, qscheme.weights).clone()
            bits[f"{name}.weight"] = int(qscheme.weights.num_bits)
            grid[f"{name}.weight.scale"] = module.weight_scale.detach().float().cpu().contiguous()
            grid[f"{name}.weight.zero_point"] = (
                zero.detach().to(torch.int8).cpu().contiguous()
                if zero is not None
                else torch.zeros_like(module.weight_scale, dtype=torch.int8).cpu()
            )
    if not state:
        raise StageError("llm-compressor quantized no Linear layer (check quantize params and the model type)")
    return state, bits, grid


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
    """Quantize the model in `model_dir` with `method` (METHODS); save the fake-quantized result to `out` (unless None)
    and return it as a plain model on `device`. `mappings`: AWQ's, from model.awq_mappings (None: llm-compressor's
    own). q["int8_layers"] / q["int8_modules"] keep those projections at int8 (int8_module_names)."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier
    from safetensors.torch import save_file

    if method not in METHODS:
        raise StageError(f"params.yaml: quantize.method must be one of {', '.join(METHODS)}, not '{method}'")
    _cpu_safe_llmcompressor()
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, device)
    int8_names = int8_module_names(model, q.get("int8_layers"), list(q.get("int8_modules") or []))
    groups = scheme(q["bits"], group_size, q["symmetric"], int8_names)
    if method != "rtn":
        recipe = []
        if method.startswith("awq"):
            # AWQ searches and folds the scales; the modifier after it (RTN or GPTQ) puts the weights on the grid
            recipe.append(AWQModifier(n_grid=q["n_grid"], mappings=awq_mappings(model, mappings)))
        if method.endswith("gptq"):
            # contiguous groups (no activation-order g_idx): the export's MatMulNBits blocks
            recipe.append(GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder=None))
        else:
            recipe.append(QuantizationModifier(config_groups=groups, ignore=["lm_head"]))
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
    else:
        oneshot(model=model, recipe=QuantizationModifier(config_groups=groups, ignore=["lm_head"]))
    baked, bits, grid = bake(model)
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
            save_file(grid, str(tmp / GRID_FILE))
            write_json(
                tmp / META_FILE,
                {
                    "method": method,
                    "bits": q["bits"],
                    "group_size": group_size,
                    "symmetric": q["symmetric"],
                    "quantized": sorted(baked),
                    "int8": sorted(name for name, b in bits.items() if b == 8),
                },
            )
    return clean.to(device).eval()


def int4_size_mb(model_dir: Path, bits: int, group_size: int) -> float:
    """Size the model would have packed: int4 (or int8) Linear weights + fp16 scale and zero point per group, the
    rest fp16."""
    from safetensors import safe_open

    grid = read_grid(model_dir)
    meta, int8 = set(grid.get("quantized", [])), set(grid.get("int8", []))
    total = 0.0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            n = f.get_slice(key).get_shape()
            numel = 1
            for d in n:
                numel *= d
            width = 8 if key in int8 else bits
            total += numel * width / 8 + numel / group_size * 4 if key in meta else numel * 2
    return round(total / 1e6, 2)


def pooled_loss(model, tokenizer, eval_rows: dict[str, list[dict]], max_len: int) -> tuple[float, dict[str, float]]:
    """Eval loss pooled over every task's eval rows (token-weighted), and per task (rounded: evaluate reports them)."""
    sums = {t: eval_nll(model, tokenizer, r, max_len) for t, r in eval_rows.items()}
    count = sum(n for _, n in sums.values())
    if count == 0:
        raise StageError("no response tokens to evaluate (empty eval split or evaluate.max_seq_len too small)")
    return sum(total for total, _ in sums.values()) / count, {t: round(total / n, 4) for t, (total, n) in sums.items()}


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
    """The configured method (q["method"]) into `out`, the RTN control in memory, fp32 as reference, each measured
    on every task's eval split. Metrics name the kept model "quantized" whatever its method, so experiments with
    different methods compare under the same keys.

    Returns (metrics, perf): metrics hold only what the weights determine (losses, perplexities, sizes), so an
    identical re-run writes an identical file; perf holds the wall-clock seconds. One model in memory at a time
    (a 3.8B fp32 model is 15 GB). A collapsed model is deleted and refused.
    """
    if q["bits"] != 4:
        raise StageError("params.yaml: quantize.bits must be 4 (the ONNX int4 export needs it)")
    if not (Path(base) / "config.json").exists():  # else transformers reads the folder name as a hub id
        raise StageError(f"{Path(base) / 'config.json'}: not found (run `dvc repro base` first)")
    method = q["method"]
    require_fits(base, "quantize", device)
    eval_rows = {t: read_jsonl(splits / t / "eval.jsonl") for t in tasks}
    rows = calibration_rows(splits, tasks, seed)
    log.info(
        "%s: calibrating on %d blocks of %d tokens from the %s training rows",
        method,
        q["calib_samples"],
        q["calib_seq_len"],
        "+".join(tasks),
    )
    tok = load_tokenizer(base)
    losses, task_losses = {}, {}

    def measure(name: str, model) -> None:
        losses[name], task_losses[name] = pooled_loss(model, tok, eval_rows, max_len)
        log.info("%s: eval loss %.4f, perplexity %.3f", name, losses[name], perplexity(losses[name]))

    start = time.time()
    quantized = quantize(base, out, method, q, group_size, rows, device, mappings)
    quantize_seconds = time.time() - start
    log.info("%s done in %.0f s", method, quantize_seconds)
    measure("quantized", quantized)
    del quantized
    log.info("now the RTN control (measured here, not kept: evaluate reads its losses)")
    plain = {**q, "int8_layers": None}  # the control is plain int4 everywhere
    measure("rtn", quantize(base, None, "rtn", plain, group_size, rows, device))
    measure("fp32", load_model(base, device))
    ppl = {name: perplexity(loss) for name, loss in losses.items()}
    grid = read_grid(out)
    metrics = {
        "method": method,
        "int8_weights": len(grid.get("int8", [])),
        "ppl": ppl["quantized"],
        "fp32_ppl": ppl["fp32"],
        "rtn_ppl": ppl["rtn"],
        "ppl_over_fp32": round(ppl["quantized"] / ppl["fp32"], 4),
        "rtn_over_fp32": round(ppl["rtn"] / ppl["fp32"], 4),
        "eval_loss": round(losses["quantized"], 4),
        "fp32_eval_loss": round(losses["fp32"], 4),
        "task_eval_loss": task_losses,
        "calib_tokens": q["calib_samples"] * q["calib_seq_len"],
        "base_mb": dir_size_mb(base),
        "packed_mb": int4_size_mb(out, q["bits"], group_size),
    }
    log.info("%s ppl %.3f vs rtn_ppl %.3f (fp32 %.3f)", method, ppl["quantized"], ppl["rtn"], ppl["fp32"])
    if ppl["quantized"] > COLLAPSE_RATIO * ppl["fp32"]:
        remove_outputs(out)
        raise StageError(f"{method} collapsed the model: perplexity {ppl['quantized']} vs fp32 {ppl['fp32']}")
    return metrics, {"quantize_seconds": round(quantize_seconds, 1), "seconds": round(time.time() - start, 1)}
