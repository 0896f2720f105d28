"""The DVC remote on Azure Blob, against a real Azurite server on a free loopback port (no other traffic).

A teammate's fresh clone pulls exactly what was pushed and has nothing to re-run; a chat-only user pulls just the
ONNX model; a misconfigured remote fails in one line within seconds instead of DVC's ~85 s of retries.
"""

from __future__ import annotations

import hashlib
import json
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


# ---------------------------------------------------------------- the remote dying mid-transfer

FILES = 600  # 64 KB each: a transfer that lasts long enough (seconds) to kill the server in the middle of it
STALLED_S = 8 + 22  # STALL_S, plus headroom for a busy host (DVC alone retries for ~4 minutes)


def error_lines(stderr: str) -> list[str]:
    """Everything but the check's own progress log line (`HH:MM:SS olive_lab...`): DVC's output and our error."""
    return [line for line in stderr.splitlines() if line.strip() and not re.match(r"\d\d:\d\d:\d\d olive_lab", line)]


def killable_azurite(data: Path, port: int):
    return start_azurite(ROOT / AZURITE_BIN, port, data)


def saved_restart(server, data: Path, port: int):
    """Azurite keeps its metadata (LokiJS) in memory and writes it to disk every 5 s; a SIGKILL loses what it has not
    written yet (on a quiet host the push reached 20 blobs before the container itself was saved, and the restarted
    server had no container). A graceful stop writes it, so what the test set up survives the kill that follows."""
    stop(server.pid)
    return killable_azurite(data, port)


def count_blobs(conn_str: str) -> int:
    from azure.storage.blob import BlobServiceClient

    with BlobServiceClient.from_connection_string(conn_str, retry_total=0) as client:
        return sum(1 for _ in client.get_container_client("olive-lab").list_blobs())


def transfer_env() -> dict[str, str]:
    from tests.pipeline import env

    return {**env(), "PYTHONPATH": str(ROOT)}


def data_repo(path: Path, conn_str: str) -> Path:
    """A git + DVC repo with FILES tracked files and the project's remote (azure://olive-lab/dvc) at `conn_str`."""
    import os

    path.mkdir()
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "t"], ["dvc", "init", "-q"],
                ["dvc", "remote", "add", "-d", REMOTE, "azure://olive-lab/dvc"]):  # fmt: skip
        sh(path, *cmd)
    point_at(path, conn_str)
    (path / "blobs").mkdir()
    for i in range(FILES):
        (path / "blobs" / f"{i:04d}.bin").write_bytes(os.urandom(64 * 1024))
    sh(path, "dvc", "add", "blobs")
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-qm", "data")
    return path


def kill_when(server, condition, what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.05)
    import os
    import signal

    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def stalled_transfer(repo: Path, command: str, server, condition, what: str):
    """`python -m tools.remote <command>` with the server killed once `condition` holds: (proc, seconds from the
    kill to the end)."""
    import subprocess
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "tools.remote", command], cwd=repo, env=transfer_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    killed_at: list[float] = []

    def killer() -> None:
        kill_when(server, lambda: proc.poll() is not None or condition(), what)
        killed_at.append(time.monotonic())

    thread = threading.Thread(target=killer)
    thread.start()
    out, err = proc.communicate(timeout=300)
    thread.join()
    assert killed_at, "the transfer ended before the server was killed"
    proc.stdout, proc.stderr = out, err
    return proc, time.monotonic() - killed_at[0]


def test_push_and_pull_stop_in_one_line_when_the_remote_dies_and_a_rerun_completes(tmp_path):
    port = free_port()
    conn = connection_string(port)
    server = killable_azurite(tmp_path / "azurite", port)
    try:
        create_container(conn, "olive-lab")
        server = saved_restart(server, tmp_path / "azurite", port)
        repo = data_repo(tmp_path / "repo", conn)

        # push: killed after some files arrived
        proc, after_kill = stalled_transfer(repo, "push", server, lambda: count_blobs(conn) >= 20, "20 blobs pushed")
        assert proc.returncode == 1, proc.stderr
        lines = error_lines(proc.stderr)
        assert len(lines) == 1, proc.stderr
        sent = int(re.search(r"stopped it after at least (\d+) files were sent", lines[0]).group(1))
        assert lines[0].startswith("remote: error: remote 'azure' (azure://olive-lab/dvc at http://127.0.0.1:")
        assert "no answer for 8 s during `dvc push`" in lines[0] and "run `make push` again" in lines[0]
        assert 0 <= sent < FILES + 1, lines[0]
        assert after_kill < STALLED_S, f"{after_kill:.1f} s after the remote died"

        server = killable_azurite(tmp_path / "azurite", port)  # same data: what was sent is still there
        proc = sh(repo, sys.executable, "-m", "tools.remote", "push", check=False, environ=transfer_env())
        assert proc.returncode == 0, proc.stderr
        assert count_blobs(conn) == FILES + 1  # each file, and the folder's .dir listing
        assert json.loads(sh(repo, "dvc", "status", "--cloud", "--json").stdout) == {}
        server = saved_restart(server, tmp_path / "azurite", port)  # the complete remote, on disk before the next kill

        # pull into a fresh clone: killed after some files arrived
        mine = clone(repo, tmp_path / "mine")
        point_at(mine, conn)
        cache = mine / ".dvc" / "cache"
        proc, after_kill = stalled_transfer(
            mine, "pull", server, lambda: cache.exists() and sum(1 for p in cache.rglob("*") if p.is_file()) >= 20,
            "20 files pulled",
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        lines = error_lines(proc.stderr)
        assert len(lines) == 1, proc.stderr
        assert "no answer for 8 s during `dvc pull`" in lines[0] and "run `make pull` again" in lines[0]
        received = int(re.search(r"stopped it after (\d+) files were received", lines[0]).group(1))
        assert 20 <= received < FILES + 1, lines[0]
        assert after_kill < STALLED_S, f"{after_kill:.1f} s after the remote died"

        server = killable_azurite(tmp_path / "azurite", port)
        proc = sh(mine, sys.executable, "-m", "tools.remote", "pull", check=False, environ=transfer_env())
        assert proc.returncode == 0, proc.stderr
        assert file_hashes(mine, ["blobs"]) == file_hashes(repo, ["blobs"])
        assert "up to date" in sh(mine, "dvc", "status").stdout
    finally:
        stop(server.pid)
