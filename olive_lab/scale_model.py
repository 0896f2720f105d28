"""A model for speed benches at any size: random weights from a conf/model config, one random LoRA adapter, the
ONNX export. Decode speed does not depend on the weights' values, so this skips quantize and finetune."""

from __future__ import annotations

from pathlib import Path


def build_random_onnx(
    model_conf: dict, work: Path, ep: str, adapter: str = "a", rank: int = 16, cuda_graph: bool = True
) -> tuple[Path, Path]:
    """(Hugging Face folder, optimize-style ONNX folder with `adapter`) under `work`, each reused when present."""
    from olive_lab.base_model import materialize
    from olive_lab.lora import random_adapter
    from olive_lab.onnx.export import build_onnx

    base, onnx_dir = work / "base", work / "onnx"
    if not (base / "config.json").exists():
        materialize(model_conf, base)
    if not (onnx_dir / "model" / "genai_config.json").exists():
        peft = random_adapter(base, work / "peft", seed=0, r=rank, target_modules=model_conf["lora_targets"])
        build_onnx(base, onnx_dir, {adapter: peft}, precision="int4", block_size=model_conf["group_size"],
                   accuracy_level=4, execution_provider=ep, lm_head="int8", cuda_graph=cuda_graph)  # fmt: skip
    return base, onnx_dir
