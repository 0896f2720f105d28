"""A stage that fails or is interrupted mid-write, under the real `dvc repro`: nothing half-written stays in the
workspace or the cache, `dvc status` says what is missing, and the re-run (or the README's recovery) is clean.

The stage here is a small one written for the test, so that the signal lands while it writes, every time; it runs
under the same olive_lab.cli.entry_point and writes through the same olive_lab.files.atomic_dir as every pipeline
stage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.pipeline import env, sh

STAGE = """
import os
import time
from pathlib import Path

from olive_lab.cli import entry_point
from olive_lab.errors import StageError
from olive_lab.files import atomic_dir, write_json


@entry_point
def run(argv):
    mode = os.environ.get("FAULT", "none")
    Path("stage.pid").write_text(str(os.getpid()))
    with atomic_dir(Path("out")) as tmp:
        (tmp / "part-0").write_text("the first part\\n")
        if mode == "fail":
            raise StageError("out: failed after writing started")
        if mode == "wait":
            Path("writing").touch()
            for i in range(1, 600):  # a minute of writing, unless stopped or told to finish
                (tmp / f"part-{i}").write_text("more\\n")
                if Path("finish").exists():
                    break
                time.sleep(0.1)
        (tmp / "done").write_text(mode + "\\n")  # parts vary with timing; this one does not
    write_json("metrics.json", {"mode": mode})


if __name__ == "__main__":
    run()
"""
# a stage's own stop after its launcher died is bounded by WATCH_S (0.5 s) plus Python's cleanup; generous for a
# busy 2-core host, far below the minute the orphan would otherwise write for
ORPHAN_STOPS_S = 30


def dvc_yaml(cmd: str) -> str:
    return f"""stages:
  write:
    cmd: {cmd}
    deps: [stage.py]
    outs: [out]
    metrics:
      - metrics.json:
          cache: false
"""


@pytest.fixture()
def repo(request, tmp_path) -> Path:
    """A git + DVC repo whose one stage has run once and been committed. Parameter `shell` (indirect): a cmd the
    shell cannot exec, so a `sh -c` stays between DVC and the stage."""
    cmd = "python -m stage && true" if getattr(request, "param", "exec") == "shell" else "python -m stage"
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "dvc.yaml").write_text(dvc_yaml(cmd))
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "git", "config", "user.email", "test@example.com")
    sh(tmp_path, "git", "config", "user.name", "test")
    sh(tmp_path, "dvc", "init", "-q")
    sh(tmp_path, "dvc", "repro", environ=stage_env())
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "first run")
    return tmp_path


def default_sigint() -> None:
    """A shell starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt: give the
    child the default handling a terminal's foreground job has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def started_writing(cmd: list[str], repo: Path, environ: dict[str, str]) -> subprocess.Popen:
    """`cmd` in its own process group, as a terminal's foreground job (default SIGINT handling included), returned
    once its stage has started writing."""
    proc = subprocess.Popen(
        cmd,
        cwd=repo,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,  # even when pytest itself runs in the background (SIGINT ignored)
    )
    deadline = time.monotonic() + 120
    while not (repo / "writing").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
            raise AssertionError(f"the stage did not start writing: {proc.communicate()}")
        time.sleep(0.1)
    return proc


def stage_env(fault: str = "none", shell: str | None = "/bin/bash") -> dict[str, str]:
    """The stage's environment; `shell` is the SHELL that DVC runs a stage's cmd through (None: unset, so /bin/sh)."""
    environ = {**env(), "PYTHONPATH": str(ROOT), "FAULT": fault}
    environ.pop("SHELL", None)
    return {**environ, "SHELL": shell} if shell else environ


def cache_files(repo: Path) -> set[str]:
    cache = repo / ".dvc" / "cache"
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()} if cache.exists() else set()


def leftovers(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*.partial"))


def status(repo: Path) -> dict:
    return json.loads(sh(repo, "dvc", "status", "--json").stdout)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def recovers(repo: Path, first_out: dict[str, str]) -> None:
    """The README's recovery brings back the last committed run; then the re-run is clean."""
    sh(repo, "git", "checkout", "metrics.json", "dvc.lock")
    sh(repo, "dvc", "checkout")
    assert status(repo) == {}
    assert contents(repo / "out") == first_out
    again = sh(repo, "dvc", "repro", "-f", environ=stage_env())
    assert "Running stage 'write'" in again.stdout and status(repo) == {}
    assert contents(repo / "out") == first_out and not leftovers(repo)


def contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_a_stage_failing_after_it_started_writing(repo):
    first_out, cached = contents(repo / "out"), cache_files(repo)
    proc = sh(repo, "dvc", "repro", "-f", check=False, environ=stage_env("fail"))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("stage: ")]
    assert lines == ["stage: error: out: failed after writing started"], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (repo / "out").exists() and not leftovers(repo)
    assert cache_files(repo) == cached
    assert status(repo) == {"write": [{"changed outs": {"out": "deleted", "metrics.json": "deleted"}}]}
    recovers(repo, first_out)


@pytest.mark.parametrize(
    "sig, target, repo, shell",
    [
        (signal.SIGINT, "group", "exec", "/bin/bash"),  # Ctrl+C in a terminal: the whole foreground process group
        # the same where SHELL is unset (CI runners, cron): DVC runs the stage through /bin/sh, which on Debian is a
        # dash that does not exec the command and dies of the same Ctrl+C while the stage cleans up
        (signal.SIGINT, "group", "exec", None),
        (signal.SIGTERM, "group", "exec", "/bin/bash"),  # e.g. a CI runner cancelling the job, `kill -- -<pgid>`
        (signal.SIGTERM, "dvc", "exec", "/bin/bash"),  # `kill <dvc pid>`: the stage would be left running as an orphan
        (signal.SIGTERM, "dvc", "shell", "/bin/bash"),  # the same with a shell between DVC and the stage
        (signal.SIGINT, "dvc", "exec", "/bin/bash"),  # `kill -INT <dvc pid>`: DVC ignores SIGINT while a stage runs
    ],
    ids=[
        "sigint-group",
        "sigint-group-no-SHELL",
        "sigterm-group",
        "sigterm-dvc",
        "sigterm-dvc-via-shell",
        "sigint-dvc",
    ],
    indirect=["repo"],
)
def test_dvc_repro_interrupted_mid_stage(repo, sig, target, shell):
    first_out, cached = contents(repo / "out"), cache_files(repo)
    proc = started_writing(["dvc", "repro", "-f"], repo, stage_env("wait", shell=shell))
    try:
        stage_pid = int((repo / "stage.pid").read_text())
        time.sleep(0.5)  # a few more parts written
        os.killpg(proc.pid, sig) if target == "group" else os.kill(proc.pid, sig)
        time.sleep(3)  # the stage stops well within this (WATCH_S 0.5 s), even on a busy host
        (repo / "finish").touch()  # a stage still running now finishes (and is then checked for what it wrote)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + ORPHAN_STOPS_S
    while alive(stage_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(stage_pid), "the stage kept running after DVC was gone"
    assert not leftovers(repo), "a half-written output is left in the workspace"

    if (sig, target) == (signal.SIGINT, "dvc"):
        # DVC ignores SIGINT while its stage runs (a terminal's Ctrl+C reaches the stage itself): the run completes
        assert proc.returncode == 0, err
        assert contents(repo / "out")["done"] == "wait\n" and status(repo) == {}
        sh(repo, "git", "checkout", "dvc.lock", "metrics.json")
        sh(repo, "dvc", "checkout")
        assert contents(repo / "out") == first_out
        return

    stage_lines = [line for line in err.splitlines() if line.startswith("stage: ")]
    assert stage_lines, f"the stage said nothing: it ran to its end ({err})"
    if sig == signal.SIGINT:
        # the stage stops with 130; DVC, which ignores SIGINT during a stage, reports it and fails the run (bash execs
        # a lone command, so DVC sees the stage's 130; a dash in between dies of the signal itself: -2)
        assert stage_lines == ["stage: interrupted"], err
        codes = ["130"] if shell else ["130", "-2"]
        assert "failed to run: python -m stage" in err, err
        assert any(f"exited with {code}\n" in err for code in codes), err
        assert proc.returncode == 255
    elif target == "group":
        assert stage_lines == ["stage: terminated (SIGTERM)"], err
        assert proc.returncode == -signal.SIGTERM  # DVC itself dies of it
    else:
        assert stage_lines[-1] == "stage: terminated (SIGTERM)", err
        assert len(stage_lines) == 2 and "has exited: stopping" in stage_lines[0], err
        assert proc.returncode == -signal.SIGTERM
    assert not (repo / "out").exists(), "DVC removes a stage's outputs before running it"
    assert cache_files(repo) == cached, "nothing of the interrupted run reached the cache"
    assert status(repo) == {"write": [{"changed outs": {"out": "deleted", "metrics.json": "deleted"}}]}
    recovers(repo, first_out)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("repo", ["exec"], indirect=True)
def test_make_repro_exits_with_the_interrupts_status(repo, sig, code):
    """`make repro` (tools/repro.py): Ctrl+C to the foreground group ends it with 130, SIGTERM with 143, and the
    interrupted stage leaves nothing half-written; plain `dvc repro` exits 255 after Ctrl+C (test above)."""
    proc = started_writing([sys.executable, "-m", "tools.repro", "-f"], repo, stage_env("wait"))
    try:
        time.sleep(0.5)
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err
    assert not leftovers(repo)
