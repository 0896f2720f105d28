"""Will a stage fit in memory? Estimated from the model's config before anything is loaded.

The parameter count comes from instantiating the architecture on PyTorch's `meta` device (no memory, exact for any
transformers model); each stage's peak is a multiple of it, in bytes per parameter:

  base      random init in fp32 plus the cast copy being saved; a GGUF is loaded and dequantized (two copies)
  quantize  the model being calibrated (fp32), the clean copy the result is written into, the baked weights
  finetune  the fp32 model, LoRA gradients and optimizer state (small), activations
  optimize  the model builder holds the fp32 weights and the quantized graph (24.5 GB measured for 3.8B: 6.4
            bytes/param), then the agreement check loads the fp32 model again
  evaluate  one fp32 model (and its PEFT wrapper) at a time, plus the ONNX model in a child process

A stage that cannot fit stops in one line that says how much it needs and how much the host has.
"""

from __future__ import annotations

import json
from pathlib import Path

from olive_lab.errors import StageError

# Measured peak RSS (VmHWM) at 16M-132M parameters was about 0.55 GB + 14.5 B/param (quantize), 9.5 (finetune) and
# 14.5 (optimize, dominated there by the builder on large embeddings); the builder alone took 6.4 B/param at 3.8B.
BYTES_PER_PARAM = {"base": 8.0, "quantize": 14.5, "finetune": 9.5, "optimize": 8.0, "evaluate": 6.0}
GPU_BYTES_PER_PARAM = {"quantize": 8.0, "finetune": 6.0, "evaluate": 6.0}  # fp32 on the device (model + work)
NOT_CONFIG_FIELDS = ("architectures", "transformers_version", "auto_map", "_name_or_path")


def meta_model(config: dict):
    """The architecture `config` (a config.json dict) describes, on the meta device: shapes and names, no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in NOT_CONFIG_FIELDS and k != "model_type"}
    cfg = AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def param_count(config: dict) -> int:
    """Parameters of the architecture `config` describes, without allocating them."""
    return sum(p.numel() for p in meta_model(config).parameters())


def available_host_gb() -> float:
    """Memory this process can still take: MemAvailable, capped by the cgroup's limit where one is set."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    free = int(meminfo["MemAvailable"].split()[0]) * 1024
    limit_file, usage_file = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    if limit_file.exists() and usage_file.exists() and limit_file.read_text().strip() != "max":
        free = min(free, int(limit_file.read_text()) - int(usage_file.read_text()))
    return free / 1e9


def need_gb(config: dict, stage: str, table: dict[str, float] = BYTES_PER_PARAM) -> float:
    return param_count(config) * table[stage] / 1e9


def require_host_memory(config: dict, stage: str, source: str = "params.yaml: model.arch") -> None:
    """StageError when `stage` would need more host memory than is available for the model of `config`."""
    need, have = need_gb(config, stage), available_host_gb()
    if need > have:
        raise StageError(
            f"{source}: the {stage} stage needs about {need:.1f} GB of memory for this {param_count(config) / 1e9:.2f}B "
            f"model ({BYTES_PER_PARAM[stage]:g} bytes/parameter), this host has {have:.1f} GB available; "
            "use a bigger host or device=cuda"
        )


def require_fits(model_dir: Path, stage: str, device: str) -> None:
    """The host (and on CUDA, the GPU) check for a stage whose input model is the folder `model_dir`."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.exists():
        return  # the stage's own input check says what is missing
    config = json.loads(config_file.read_text())
    if device == "cuda" and stage in GPU_BYTES_PER_PARAM:
        import torch

        free = torch.cuda.mem_get_info()[0] / 1e9
        need = need_gb(config, stage, GPU_BYTES_PER_PARAM)
        if need > free:
            raise StageError(
                f"{config_file}: the {stage} stage needs about {need:.1f} GB of GPU memory, the GPU has {free:.1f} GB free"
            )
        return  # the weights live on the GPU; the host holds far less
    require_host_memory(config, stage, source=str(config_file))
