"""The DVC remote on Azure Blob, against a real Azurite server on a free loopback port (no other traffic).

A teammate's fresh clone pulls exactly what was pushed and has nothing to re-run; a chat-only user pulls just the
ONNX model; a misconfigured remote fails in one line within seconds instead of DVC's ~85 s of retries.
"""

from __future__ import annotations

import hashlib
import re
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

from olive_lab.azure.azurite import alive, connection_string, create_container, free_port, start_azurite, stop
from olive_lab.paths import AZURITE_BIN
from tests.helpers import ROOT
from tests.pipeline import copy_repo, ran_stages, sh

REMOTE = "azure"
# A fail-fast bound, not a benchmark: the check itself waits at most CONNECT_S + READ_S (13 s); the rest is headroom
# for starting Python and importing DVC on a busy 2-core host. DVC alone takes ~85 s to give up on the same endpoints.
FAIL_FAST_S = 30


def container(repo: Path) -> str:
    return re.search(r"url = azure://([^/\s]+)", (repo / ".dvc/config").read_text()).group(1)


def point_at(repo: Path, conn_str: str) -> None:
    sh(repo, "dvc", "remote", "modify", "--local", REMOTE, "connection_string", conn_str)


def remote(repo: Path, *args: str) -> tuple[object, float]:
    start = time.monotonic()
    proc = sh(repo, sys.executable, "-m", "tools.remote", *args, check=False, timeout=120)
    return proc, time.monotonic() - start


def clone(src: Path, dest: Path) -> Path:
    sh(dest.parent, "git", "clone", "-q", str(src), str(dest))
    return dest


def cached_outs(repo: Path) -> list[str]:
    """Every output DVC caches (and so pushes), per dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return sorted({out["path"] for stage in lock.values() for out in stage.get("outs", [])})


def file_hashes(repo: Path, outs: list[str]) -> dict[str, str]:
    hashes = {}
    for out in outs:
        path = repo / out
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            hashes[str(f.relative_to(repo))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def azurite():
    port = free_port()
    proc = start_azurite(ROOT / AZURITE_BIN, port, None)  # in memory
    try:
        conn = connection_string(port)
        create_container(conn, container(ROOT))
        yield conn
    finally:
        stop(proc.pid)


@pytest.fixture(scope="module")
def bare_repo(tmp_path_factory):
    """The project with the remote configured in .dvc/config, nothing run."""
    return copy_repo(tmp_path_factory.mktemp("bare"), ["experiment=tiny"])


@pytest.fixture(scope="module")
def origin(tmp_path_factory, azurite):
    """Someone ran the tiny pipeline, committed, and pushed."""
    repo = copy_repo(tmp_path_factory.mktemp("origin"), ["experiment=tiny"])
    sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny run")
    point_at(repo, azurite)
    proc, _ = remote(repo, "push")
    assert proc.returncode == 0, proc.stderr
    return repo


def test_the_committed_config_has_a_default_azure_remote_and_no_secret():
    config = (ROOT / ".dvc/config").read_text()
    assert re.search(rf"remote = {REMOTE}\b", config)
    assert re.search(r"url = azure://[^/\s]+/\S+", config)
    assert not re.search(r"(?i)account_?key|connection_string|sas_token|client_secret", config)


@pytest.mark.slow
def test_a_fresh_clone_pulls_everything_and_has_nothing_to_rerun(origin, azurite, tmp_path):
    mine = clone(origin, tmp_path / "mine")
    point_at(mine, azurite)
    proc, _ = remote(mine, "pull")
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in sh(mine, "dvc", "status").stdout
    assert ran_stages(sh(mine, "dvc", "repro").stdout) == set()
    outs = cached_outs(origin)
    assert {"models/base", "models/quantized", "data/split"} <= set(outs)
    theirs = file_hashes(origin, outs)
    assert len(theirs) > 10
    assert file_hashes(mine, outs) == theirs


@pytest.mark.slow
def test_pulling_one_stage_brings_only_its_outputs(origin, azurite, tmp_path):
    chat_only = clone(origin, tmp_path / "chat-only")
    point_at(chat_only, azurite)
    proc, _ = remote(chat_only, "pull", "optimize")
    assert proc.returncode == 0, proc.stderr
    assert file_hashes(chat_only, ["models/onnx"]) == file_hashes(origin, ["models/onnx"])
    assert sorted(p.name for p in (chat_only / "models").iterdir()) == ["onnx"]
    assert not (chat_only / "data/split").exists()


def misconfigured(conn_str: str, case: str, closed_port: int, silent_port: int) -> str:
    if case == "wrong key":
        key = re.search(r"AccountKey=([^;]+)", conn_str).group(1)
        return conn_str.replace(key, "A" + key[1:])
    if case == "https against http":
        return conn_str.replace("http", "https")
    port = re.search(r":(\d+)/", conn_str).group(1)
    return conn_str.replace(f":{port}/", f":{closed_port if case == 'nothing listens' else silent_port}/")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong key", "credentials rejected (AuthorizationFailure)"),
        ("https against http", "TLS handshake failed"),
        ("nothing listens", "cannot connect (connection refused"),
        ("never answers", "no answer"),  # a firewall that drops, a proxy that hangs
    ],
)
def test_a_misconfigured_remote_fails_fast_in_one_line(azurite, bare_repo, tmp_path, case, expected):
    repo = clone(bare_repo, tmp_path / "repo")
    closed = free_port()
    with socket.socket() as silent:  # listens (the kernel completes the handshake) but never reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        point_at(repo, misconfigured(azurite, case, closed, silent.getsockname()[1]))
        proc, elapsed = remote(repo, "pull")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1
    assert len(lines) == 1 and lines[0].startswith("remote: error: remote 'azure' (azure://"), proc.stderr
    assert expected in lines[0]
    assert "AccountKey" not in lines[0]
    assert elapsed < FAIL_FAST_S, f"{case}: {elapsed:.1f} s"


def test_remote_up_and_down_run_a_local_azurite_and_point_dvc_at_it(bare_repo, tmp_path):
    repo = clone(bare_repo, tmp_path / "repo")
    (repo / "node_modules").symlink_to(ROOT / "node_modules")
    proc, _ = remote(repo, "up")
    try:
        assert proc.returncode == 0, proc.stderr
        pid, port = map(int, (repo / ".azurite/azurite.pid").read_text().split())
        assert f"BlobEndpoint=http://127.0.0.1:{port}/" in (repo / ".dvc/config.local").read_text()
        assert remote(repo, "check")[0].returncode == 0
        again, _ = remote(repo, "up")  # reuses the running server
        assert again.returncode == 0 and "already runs" in again.stderr
        # Secrets and server state stay out of git (the node_modules link is ours, not the user's).
        assert sh(repo, "git", "status", "--porcelain", "--", ".", ":!node_modules").stdout == ""
    finally:
        down, _ = remote(repo, "down")
    assert down.returncode == 0, down.stderr
    assert not alive(pid)
    assert "connection_string" not in (repo / ".dvc/config.local").read_text()
    failed, _ = remote(repo, "check")
    assert failed.returncode == 1 and "requires either account_name or connection_string" in failed.stderr
