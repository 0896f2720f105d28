"""Wall time, peak host RSS and peak GPU memory of a command and all its child processes (for the benches)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and every descendant (read from /proc; a process that just ended counts 0)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            rss = next(line for line in Path(f"/proc/{p}/status").read_text().splitlines() if line.startswith("VmRSS"))
            total += int(rss.split()[1]) * 1024
        except (OSError, StopIteration):
            continue
    return total


def gpu_used_bytes() -> int | None:
    """Memory in use on GPU 0, as nvidia-smi reports it (None without one)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return int(out.stdout.split()[0]) * 1024 * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def run_measured(cmd: list[str], interval_s: float = 0.25, **popen) -> tuple[int, dict]:
    """Run `cmd`, sampling its process tree's RSS and the GPU's memory; (exit code, {seconds, peak_rss_gb,
    peak_gpu_gb}), GPU memory counted above what was in use before the start."""
    gpu_before = gpu_used_bytes()
    peaks = {"rss": 0, "gpu": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, **popen)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks["rss"] = max(peaks["rss"], tree_rss_bytes(proc.pid))
            if gpu_before is not None and (used := gpu_used_bytes()) is not None:
                peaks["gpu"] = max(peaks["gpu"], used - gpu_before)
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    done.set()
    sampler.join()
    return code, {
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gb": round(peaks["rss"] / 1e9, 2),
        "peak_gpu_gb": round(peaks["gpu"] / 1e9, 2) if gpu_before is not None else None,
    }
