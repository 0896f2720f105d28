"""Data-parallel fine-tuning on several GPUs of one host (device.gpus > 1): torchrun launches one process per GPU.

The training step stays the single-process step: every rank draws the same global batch of `batch_size` examples
from the same seeded order and computes its own share; the loss is the summed token NLL over the global token count,
and one all-reduce per step sums the LoRA gradients, so the update equals the 1-GPU update up to summation order.
(The gradients are all-reduced by hand, not by a DistributedDataParallel wrapper: the loss skips the logits of prompt
tokens by calling the decoder directly, which would bypass the wrapper's forward.) Rank 0 evaluates and writes.

On CPU, device.gpus > 1 runs that many gloo processes: no speed-up on a shared CPU, but the same code path, which is
how the test suite checks it.
"""

from __future__ import annotations

import os
import subprocess
import sys

from olive_lab.errors import StageError


def launched() -> bool:
    """True inside a torchrun worker."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def check_gpus(gpus: int, device: str) -> None:
    """One line, before anything is loaded, when device.gpus asks for GPUs that are not here."""
    if device != "cuda" or gpus <= 1:
        return
    import torch

    if torch.cuda.device_count() < gpus:
        raise StageError(f"params.yaml: device.gpus is {gpus}, but torch sees {torch.cuda.device_count()} GPU(s) here")


def relaunch(module: str, args: list[str], gpus: int) -> int:
    """Run `python -m module args` under torchrun with `gpus` processes; returns its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    cmd += ["--tee", "0", "-m", module, *args]
    return subprocess.run(cmd, check=False).returncode


def init(device: str) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) and pin this rank's GPU."""
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values):
    """Sum a tensor or a list of tensors over the ranks in place (one collective for a list)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return values
    if isinstance(values, torch.Tensor):
        dist.all_reduce(values)
        return values
    flat = torch.cat([v.reshape(-1) for v in values])
    dist.all_reduce(flat)
    offset = 0
    for v in values:
        v.copy_(flat[offset : offset + v.numel()].view_as(v))
        offset += v.numel()
    return values


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
