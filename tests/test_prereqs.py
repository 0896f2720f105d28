"""`make setup` checks its prerequisites first: a missing one stops it in one line that says how to install it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

TOOLS = ("make", "git", "node", "npm", "g++", "tmux")


def bin_dir(tmp_path: Path, leave_out: str = "", fakes: dict[str, str] | None = None) -> Path:
    """A PATH folder with links to the real tools (python3.11 is this venv's base interpreter), minus `leave_out`."""
    folder = tmp_path / "bin"
    folder.mkdir(parents=True)
    real = {tool: shutil.which(tool) for tool in TOOLS}
    real["python3.11"] = str(Path(sys.executable).resolve())
    for name, target in real.items():
        if name != leave_out:
            assert target, f"{name} is needed on this machine to run the test"
            (folder / name).symlink_to(target)
    for name, script in (fakes or {}).items():
        (folder / name).unlink(missing_ok=True)
        (folder / name).write_text("#!/bin/sh\n" + script)
        (folder / name).chmod(0o755)
    return folder


def make_setup(tmp_path: Path, path: Path, *args: str) -> subprocess.CompletedProcess:
    venv = tmp_path / "venv"  # never the repository's .venv, should the check wrongly pass
    return subprocess.run(
        [
            "/usr/bin/make" if Path("/usr/bin/make").exists() else shutil.which("make"),
            "-n",  # the check runs while make reads the Makefile; -n: were it to pass, nothing gets installed
            "setup",
            f"VENV={venv}",
            *args,
        ],
        cwd=ROOT,
        env={"PATH": str(path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_all_present_passes(tmp_path):
    proc = subprocess.run(
        ["/bin/bash", "tools/prereqs.sh"],
        cwd=ROOT,
        env={"PATH": str(bin_dir(tmp_path))},
        capture_output=True,
        text=True,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


@pytest.mark.parametrize(
    "missing, named, says",
    [
        ("python3.11", "python3.11 (Python 3.11)", "sudo apt-get install python3.11 python3.11-venv"),
        ("git", "git", "sudo apt-get install git"),
        ("node", "Node.js (>= 18", "https://nodejs.org"),
        ("npm", "npm (ships with Node.js)", "https://nodejs.org"),
        ("g++", "g++ (builds olive_lab/kernels", "sudo apt-get install g++"),
        ("tmux", "tmux", "sudo apt-get install tmux"),
    ],
)
def test_missing_tool_stops_setup_in_one_line(tmp_path, missing, named, says):
    proc = make_setup(tmp_path, bin_dir(tmp_path, leave_out=missing))
    assert proc.returncode != 0
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    assert len(lines) == 1, lines
    assert f"make setup: {named}" in lines[0] and "not found" in lines[0] and says in lines[0], lines[0]
    assert not (tmp_path / "venv").exists()


def test_old_node_and_wrong_python_are_named(tmp_path):
    old_node = 'case "$1" in --version) echo v16.20.2;; *) exit 1;; esac\n'
    proc = make_setup(tmp_path, bin_dir(tmp_path, fakes={"node": old_node}))
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "Node.js >= 18 (found v16.20.2)" in proc.stderr, proc.stderr
    wrong_python = "exit 1\n"
    proc = make_setup(tmp_path, bin_dir(tmp_path / "py", fakes={"python3.11": wrong_python}))
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "is not 3.11" in proc.stderr, proc.stderr
