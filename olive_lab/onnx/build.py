"""Export a Hugging Face folder to an ORT GenAI model with the onnxruntime-genai model builder (Python API).

The builder's own CLI is not used: its --help crashes, and it returns 0 after some failures. Called in-process,
a failure raises and we turn it into one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path

from olive_lab.errors import StageError

log = logging.getLogger(__name__)

PRECISIONS = ("int4", "fp32")
PROVIDERS = ("cpu", "cuda")
LM_HEADS = ("fp32", "int8", "int4")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits accepts


def builder_options(
    precision: str, block_size: int, accuracy_level: int, lm_head: str, extra: dict | None = None
) -> list[str]:
    """KEY=VALUE options for the builder.

    int4 is asymmetric min/max round-to-nearest per `block_size` inputs, the grid the quantize stage left the
    weights on, so re-quantizing them changes nothing. The tied embedding/lm_head matrix is not on that grid.
    SmolLM2 (grid-snapped, accuracy_level 4, 24 travel rows, loss vs torch / best decode tok/s on 2 busy cores):
      fp32  dense, shared by Gather and lm_head: 180 MB, loss x1.0016, 66 tok/s (113 MB read per token)
      int8  lm_head 8-bit MatMulNBits, embeddings dense: 210 MB, loss x1.0016, 116 tok/s   <- default
      int4  lm_head int4, embeddings dense: 196 MB, loss x1.044, 140 tok/s
    The builder's own tied int4 matrix (asymmetric) and a shared int8 one write graphs ORT rejects, hence unshared.
    """
    if precision not in PRECISIONS:
        raise StageError(f"params.yaml: optimize.precision must be one of {PRECISIONS}, not '{precision}'")
    overrides = [
        f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in (extra or {}).items()
    ]
    if precision == "fp32":
        return overrides
    if block_size not in BLOCK_SIZES:
        raise StageError(f"params.yaml: optimize.block_size must be one of {BLOCK_SIZES}, not {block_size}")
    if lm_head not in LM_HEADS:
        raise StageError(f"params.yaml: optimize.lm_head must be one of {LM_HEADS}, not '{lm_head}'")
    opts = [
        f"block_size={block_size}",
        f"accuracy_level={accuracy_level}",
        "is_symmetric=false",
        # one MatMulNBits for gate+up (then Split): fewer nodes per token, and one LoRA branch for both
        "fuse_mlp_gate_up=true",
    ]
    if lm_head == "fp32":
        opts.append("nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather")
    elif lm_head == "int8":
        opts += ["matmul_mixed_precision=last_matmul:int8", "shared_embeddings=false"]
    else:
        opts.append("shared_embeddings=false")
    # model.builder_options: the model's own (e.g. an int4 algorithm); a key given twice keeps the model's value
    given = {o.split("=", 1)[0] for o in overrides}
    return [o for o in opts if o.split("=", 1)[0] not in given] + overrides


def weight_overrides(lm_head: str, int8_nodes: list[str]) -> dict | None:
    """The builder's structured per-node quantization (target_options) that keeps `int8_nodes` (MatMul node names
    such as /model/layers.0/attn/qkv_proj/MatMul) at int8. A structured override list replaces the one the KEY=VALUE
    options make, so the lm_head's precision is restated here."""
    if not int8_nodes:
        return None
    overrides = [{"match": {"name": node}, "type": "int8"} for node in int8_nodes]
    if lm_head == "int8":
        overrides.append({"match": {"name": "/lm_head/MatMul"}, "type": "int8"})
    elif lm_head == "fp32":
        overrides += [
            {"match": {"name": n}, "exclude": True} for n in ("/lm_head/MatMul", "/model/embed_tokens/Gather")
        ]
    return {"quant_config": {"weights": {"overrides": overrides}}}


def export_model(
    hf_dir: Path,
    out_dir: Path,
    *,
    precision: str,
    block_size: int,
    accuracy_level: int,
    execution_provider: str,
    lm_head: str,
    extra_options: dict | None = None,
    int8_nodes: list[str] | None = None,
) -> None:
    """Run the builder on `hf_dir`, writing model.onnx(+.data), genai_config.json and tokenizer files to `out_dir`.
    `int8_nodes`: MatMuls to keep at 8 bits (the quantize stage's mixed precision) in an int4 model."""
    if execution_provider not in PROVIDERS:
        raise StageError(
            f"params.yaml: device.execution_provider must be one of {PROVIDERS}, not '{execution_provider}'"
        )
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's own modules on sys.path)
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    extra = builder_options(precision, block_size, accuracy_level, lm_head, extra_options)
    log.info("exporting %s -> %s (%s, %s, %s)", hf_dir, out_dir, precision, execution_provider, " ".join(extra))
    cache = Path(tempfile.mkdtemp(prefix="builder-cache-"))
    quiet = logging.getLogger("onnxruntime.quantization")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # one INFO line per MatMul otherwise
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            target = weight_overrides(lm_head, int8_nodes or []) if precision == "int4" else None
            opts = parse_extra_options(
                None, str(hf_dir), str(out_dir), precision, execution_provider, str(cache), extra, target_options=target
            )
            create_model(None, str(hf_dir), str(out_dir), precision, execution_provider, str(cache), **opts)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StageError(f"onnxruntime-genai model builder failed on {hf_dir}: {type(exc).__name__}: {first}") from exc
    finally:
        quiet.setLevel(level)
        shutil.rmtree(cache, ignore_errors=True)
    for name in ("model.onnx", "genai_config.json"):
        if not (out_dir / name).exists():
            raise StageError(
                f"onnxruntime-genai model builder wrote no {name} in {out_dir}: {chatter.getvalue()[-300:]}"
            )


def set_cuda_graph(model_dir: Path, on: bool) -> None:
    """Turn ORT's CUDA graph capture on or off in a CUDA model's genai_config.json (no-op for other providers).

    With it on, ORT GenAI replays each decode step as one captured CUDA graph instead of launching every kernel
    from the CPU; for a 135M model the launches are most of the step (bench/cuda_e2e.py measures both).
    """
    path = Path(model_dir) / "genai_config.json"
    config = json.loads(path.read_text())
    for options in config["model"]["decoder"]["session_options"].get("provider_options", []):
        if "cuda" in options:
            options["cuda"]["enable_cuda_graph"] = "1" if on else "0"
    path.write_text(json.dumps(config, indent=4) + "\n")
