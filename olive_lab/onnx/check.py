"""Checks of an exported ONNX model against its Hugging Face source: int4 weights, logits, eval loss."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from olive_lab.errors import StageError
from olive_lab.int4_grid import read_grid
from olive_lab.kernels import register_for
from olive_lab.lm import IGNORE, encode_example
from olive_lab.onnx.grid import QUANTIZED_NODE, matmul_parts

log = logging.getLogger(__name__)

FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unsigned `bits`-wide values stored little-end-first in bytes, last axis unpacked to `count`."""
    if bits == 8:
        return packed[..., :count].astype(np.float32)
    low, high = packed & 0x0F, packed >> 4
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)[..., :count].astype(np.float32)


def dequantize_matmulnbits(node, initializers: dict[str, np.ndarray]) -> np.ndarray:
    """The [N, K] float weight a MatMulNBits node computes with (scale * (q - zero_point), blockwise along K)."""
    attrs = {a.name: a.i for a in node.attribute}
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    blocks = -(-k // block)
    q = _unpack(initializers[node.input[1]].reshape(n, blocks, -1), bits, block)
    scales = initializers[node.input[2]].reshape(n, blocks, 1).astype(np.float32)
    if len(node.input) > 3 and node.input[3]:
        zp = _unpack(initializers[node.input[3]].reshape(n, -1), bits, blocks).reshape(n, blocks, 1)
    else:
        zp = np.full((n, blocks, 1), 2 ** (bits - 1), np.float32)
    return ((q - zp) * scales).reshape(n, blocks * block)[:, :k]


def int4_grid_error(onnx_path: Path, hf_dir: Path) -> dict[str, float]:
    """Largest |ONNX weight - HF weight| over the decoder projections (absolute, and relative to the matrix's
    largest weight), the share of weights that moved at all, and how many MatMuls are int8.

    Zero (to float rounding) when the export wrote the quantize stage's own grid (olive_lab.onnx.grid). A MatMul
    whose bits differ from what the quantize stage chose for its weights (int8_layers) is an error whatever its
    values.
    """
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    model = onnx.load(str(onnx_path), load_external_data=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    hf = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        hf.update(load_file(str(f)))
    int8 = set(read_grid(hf_dir).get("int8", []))
    packs = matmul_parts(set(hf))  # the export's own node -> weights map (olive_lab.onnx.grid), so both agree
    worst_abs, worst_rel, checked, moved, total, eight = 0.0, 0.0, 0, 0, 0, 0
    for node in model.graph.node:
        match = QUANTIZED_NODE.match(node.name)
        if node.op_type != "MatMulNBits" or not match:
            continue
        names = packs.get(match[1])
        if not names:
            raise StageError(f"{onnx_path}: {node.name} holds none of {hf_dir}'s decoder projection weights")
        ref = np.concatenate([hf[name] for name in names]).astype(np.float32)
        bits = next(a.i for a in node.attribute if a.name == "bits")
        if {8 if name in int8 else 4 for name in names} != {bits}:
            raise StageError(
                f"{onnx_path}: {node.name} is {bits}-bit, but the quantize stage put {names[0]} on a "
                f"{8 if names[0] in int8 else 4}-bit grid"
            )
        eight += bits == 8
        got = dequantize_matmulnbits(node, inits)
        if got.shape != ref.shape:
            raise StageError(f"{onnx_path}: {node.name} weight shape {got.shape} != Hugging Face {ref.shape}")
        diff, top = np.abs(got - ref), max(float(np.abs(ref).max()), 1e-12)
        worst_abs = max(worst_abs, float(diff.max()))
        worst_rel = max(worst_rel, float(diff.max()) / top)
        moved += int((diff > 1e-6 * top).sum())
        total += diff.size
        checked += 1
    if not checked:
        raise StageError(f"{onnx_path}: no int4 decoder projections found")
    return {
        "max_abs": worst_abs,
        "max_rel": worst_rel,
        "moved_share": moved / total,
        "matmuls": checked,
        "int8_matmuls": eight,
    }


class OnnxLM:
    """Full-sequence logits from the exported decoder through a plain ORT session (one forward, empty KV cache).

    ORT GenAI only hands back the last position's logits; this runs the same graph and kernels for all of them.
    A graph built for CUDA (fp16 inputs and outputs) runs on onnxruntime-gpu's CUDA provider when it is installed,
    else on the CPU; float feeds are cast to whatever the graph declares and logits come back as float32.
    """

    def __init__(self, model_dir: Path | str, threads: int = 0):
        import onnxruntime as ort

        model_dir = Path(model_dir)
        config = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # LoRA defaults are overridable initializers by design; ORT warns about each
        register_for(opts, model_dir)  # layout "fused"'s kernels
        providers = ["CPUExecutionProvider"]
        built_for = {name for p in config.get("session_options", {}).get("provider_options", []) for name in p}
        if "cuda" in built_for and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(model_dir / config["filename"]), opts, providers=providers)
        self.names = config["inputs"]
        self.layers, self.kv_heads, self.head = (
            config["num_hidden_layers"],
            config["num_key_value_heads"],
            config["head_size"],
        )
        self.float_types = {i.name: FLOAT_TYPES.get(i.type) for i in self.session.get_inputs()}

    def logits(self, ids: list[int], adapter: dict[str, np.ndarray] | None = None) -> np.ndarray:
        feeds = {
            self.names["input_ids"]: np.asarray([ids], np.int64),
            self.names["attention_mask"]: np.ones((1, len(ids)), np.int64),
        }
        empty = np.zeros((1, self.kv_heads, 0, self.head), np.float32)
        for i in range(self.layers):
            feeds[self.names["past_key_names"] % i] = empty
            feeds[self.names["past_value_names"] % i] = empty
        feeds = {k: v for k, v in feeds.items() if k in self.float_types}  # attention_mask may be absent
        feeds.update(adapter or {})  # an adapter name the graph lacks is an error in session.run
        # copy=False: fp32 feeds into an fp32 graph (the adapter's 29 MB too) are passed as they are, not copied
        feeds = {k: v.astype(t, copy=False) if (t := self.float_types.get(k)) else v for k, v in feeds.items()}
        (logits,) = self.session.run(["logits"], feeds)
        return logits[0].astype(np.float32)


def response_nll(logits: np.ndarray, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-position NLL and argmax for the positions that predict a labelled token."""
    targets = np.asarray(labels[1:])
    keep = targets != IGNORE
    rows = logits[:-1][keep].astype(np.float64)
    rows -= rows.max(-1, keepdims=True)
    logp = rows - np.log(np.exp(rows).sum(-1, keepdims=True))
    return -logp[np.arange(len(rows)), targets[keep]], rows.argmax(-1)


def agreement(onnx_lm: OnnxLM, torch_model, tokenizer, rows: list[dict], max_len: int, adapter=None) -> dict:
    """ONNX vs torch on `rows`: share of scored positions with the same argmax, both mean losses, and the worst
    row's logit difference (RMS and max) relative to the spread of torch's logits."""
    import torch

    same = total = 0
    nll_onnx = nll_torch = rms_rel = max_rel = 0.0
    device = next(torch_model.parameters()).device
    for row in rows:
        ids, labels = encode_example(tokenizer, row["prompt"], row["response"], max_len)
        with torch.inference_mode():
            ref = torch_model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu().numpy()
        got = onnx_lm.logits(ids, adapter)
        diff, spread = got - ref, float(ref.std())
        rms_rel = max(rms_rel, float(np.sqrt((diff**2).mean())) / spread)
        max_rel = max(max_rel, float(np.abs(diff).max()) / spread)
        loss_o, arg_o = response_nll(got, labels)
        loss_t, arg_t = response_nll(ref, labels)
        same += int((arg_o == arg_t).sum())
        total += len(arg_t)
        nll_onnx += float(loss_o.sum())
        nll_torch += float(loss_t.sum())
    if total == 0:
        raise StageError("no response tokens to compare (empty eval rows?)")
    loss_onnx, loss_torch = nll_onnx / total, nll_torch / total
    return {
        "argmax_agreement": round(same / total, 4),
        "loss_onnx": round(loss_onnx, 4),
        "loss_torch": round(loss_torch, 4),
        "loss_ratio": round(loss_onnx / loss_torch, 4),
        "loss_diff": round(loss_onnx - loss_torch, 4),  # the ratio of two tiny losses (a learnt format) says little
        "tokens": total,
        "rows": len(rows),
        "logit_rms_rel": round(rms_rel, 5),
        "logit_max_rel": round(max_rel, 5),
    }


def onnx_loss(lm: OnnxLM, tokenizer, rows: list[dict], max_len: int, adapter: dict | None = None) -> float:
    """Mean response-token loss of `rows` under an OnnxLM (with an adapter's input values, or none)."""
    total, count = 0.0, 0
    for row in rows:
        ids, labels = encode_example(tokenizer, row["prompt"], row["response"], max_len)
        nll, _ = response_nll(lm.logits(ids, adapter), labels)
        total, count = total + float(nll.sum()), count + len(nll)
    return round(total / count, 4)


def pooled(parts: dict[str, dict]) -> dict:
    """agreement() over the union of the row sets behind `parts` (token-weighted means, worst logit deviations),
    keeping each part's ONNX loss and row count under by_task."""
    tokens = sum(p["tokens"] for p in parts.values())
    mean = {
        k: sum(p[k] * p["tokens"] for p in parts.values()) / tokens
        for k in ("argmax_agreement", "loss_onnx", "loss_torch")
    }
    return {
        "argmax_agreement": round(mean["argmax_agreement"], 4),
        "loss_onnx": round(mean["loss_onnx"], 4),
        "loss_torch": round(mean["loss_torch"], 4),
        "loss_ratio": round(mean["loss_onnx"] / mean["loss_torch"], 4),
        "loss_diff": round(mean["loss_onnx"] - mean["loss_torch"], 4),
        "tokens": tokens,
        "rows": sum(p["rows"] for p in parts.values()),
        "logit_rms_rel": max(p["logit_rms_rel"] for p in parts.values()),
        "logit_max_rel": max(p["logit_max_rel"] for p in parts.values()),
        "by_task": {task: {"loss_onnx": p["loss_onnx"], "rows": p["rows"]} for task, p in parts.items()},
    }


# What the optimize stage accepts, derived from what a correct export gives and what a wrong one does:
# - int4 grid: re-quantizing a weight onto any asymmetric 4-bit grid moves it by at most half a step, and a step is at
#   most 2/15 of the matrix's largest |weight|: so up to 1/15 of it. More means the export changed the weights
#   themselves. Measured: 0.019 (CPU, 5e-5 of them moved), 0.036 (CUDA, its own grid), 0.057 (a tiny model that was
#   not on any grid).
# - argmax agreement: int8 activations (accuracy_level 4) flip the top token where the two best are within ~3 % of the
#   logits' spread: 97.1-99.9 % agreement on every real run (SmolLM2 on CPU, Phi-3.5's shape on CUDA), >= 95 % on the
#   tiny test models. A wrong export falls far below: ONNX int4 against an unquantized torch model gives 75-83 % with
#   adapters, and an adapter lost in export answers like the base (trip_json's loss 1.78 instead of 0.04).
# - loss: ONNX within 5 % of torch's loss (+0.01 nats, for near-zero losses whose ratio says little). Measured: 0.14 %
#   (CPU), 0.01 % (CUDA), 2 % on tiny random models; an adapter lost in export costs 25 % (travel) to 48x (trip_json).
MAX_GRID_REL = 1 / 15
MIN_ARGMAX_AGREEMENT = 0.90
MAX_LOSS_REL, MAX_LOSS_ABS = 0.05, 0.01


def require_agreement(checks: dict, where: Path | str) -> None:
    """Stop (one line naming the metric, its value and the bound) when the export does not compute what torch does."""
    grid = checks.get("int4_grid_error")
    if grid and grid["max_rel"] > MAX_GRID_REL:
        raise StageError(
            f"{where}: int4_grid_error.max_rel {grid['max_rel']:.4f} is over {MAX_GRID_REL:.4f} (1/15): the exported "
            "weights are not the quantized model's; the model was removed"
        )
    for variant, m in checks.get("agreement", {}).items():
        if m["argmax_agreement"] < MIN_ARGMAX_AGREEMENT:
            raise StageError(
                f"{where}: agreement.{variant}.argmax_agreement {m['argmax_agreement']:.4f} is under "
                f"{MIN_ARGMAX_AGREEMENT}: ONNX does not predict what torch does; the model was removed"
            )
        bound = MAX_LOSS_REL * m["loss_torch"] + MAX_LOSS_ABS
        if abs(m["loss_onnx"] - m["loss_torch"]) > bound:
            raise StageError(
                f"{where}: agreement.{variant}.loss_onnx {m['loss_onnx']:.4f} is more than {bound:.4f} from torch's "
                f"{m['loss_torch']:.4f} (5 % + 0.01): ONNX does not compute what torch does; the model was removed"
            )
