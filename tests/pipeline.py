"""Build a throwaway copy of this repository and drive the real DVC pipeline in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import ROOT

BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    """`python` and `dvc` resolve to this venv's, as under `make`."""
    e = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": ""}
    e.pop("STAGE_DEBUG", None)
    return e


def sh(
    cwd: Path, *cmd: str, check: bool = True, timeout: float = 1800, environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=environ or env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def copy_repo(dest: Path, overrides: list[str]) -> Path:
    """Copy the project's files (tracked, plus new untracked ones while developing) into a fresh git repo."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("metrics/", "plots/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "config", "user.email", "test@example.com")
    sh(dest, "git", "config", "user.name", "test")
    sh(dest, sys.executable, "-m", "tools.params", *overrides)
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "copy")
    return dest


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def set_param(repo: Path, dotted: str, value) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    node = params
    *parents, last = dotted.split(".")
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
