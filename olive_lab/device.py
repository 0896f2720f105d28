"""Which torch device and dtype a stage runs on, checked up front."""

from __future__ import annotations

from olive_lab.errors import StageError


def check_device(name: str) -> str:
    """Fail at once, in one line, when the configured device does not exist here."""
    if name == "cpu":
        return name
    if name != "cuda":
        raise StageError(f"params.yaml: device.name must be 'cpu' or 'cuda', not '{name}'")
    import torch

    if not torch.cuda.is_available():
        raise StageError("device=cuda but no CUDA GPU is visible to torch here; use device=cpu")
    return name


def torch_dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise StageError(f"params.yaml: device.dtype '{name}' is not one of float32, bfloat16, float16") from None
