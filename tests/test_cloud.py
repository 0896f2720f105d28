"""`make cloud` offline: the Azure ML command job built from azure-ai-ml's own entities, checked by its schema (dump,
load_job) against a golden spec, and every refusal as one line within seconds. Only the service is missing here:
the live submission is an opt-in test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, default_params, write_params

GOLDEN = ROOT / "tests/golden/cloud_job.yml"
PIP_PLACEHOLDER = "<requirements.lock, ONNX Runtime as CUDA builds>"
FILES = ("dvc.yaml", ".amlignore", "requirements.lock", "bench/gpu/wheels.txt")
AZURE_ENV = ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE", "AZURE_TENANT_ID",
             "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_STORAGE_CONNECTION_STRING")  # fmt: skip


def spec_of(job, tmp_path: Path) -> dict:
    path = tmp_path / "job.yml"
    job.dump(str(path))
    spec = yaml.safe_load(path.read_text())
    spec["code"] = "."  # the repository, wherever it is checked out
    return spec


def build(cloud: dict):
    from olive_lab.azure.jobs import build_job, check_cloud

    check_cloud(cloud, {"base", "data", "quantize", "finetune", "optimize", "evaluate", "upload"})
    return build_job(cloud, (ROOT / "requirements.lock").read_text(), (ROOT / "bench/gpu/wheels.txt").read_text(),
                     code=ROOT, tags={"git": "0" * 40})  # fmt: skip


def test_job_spec_matches_the_golden_one_and_the_sdk_loads_it(tmp_path):
    from azure.ai.ml import load_job

    job = build(default_params()["cloud"])
    spec = spec_of(job, tmp_path)
    pip = spec["environment"]["conda_file"]["dependencies"][2]["pip"]
    spec["environment"]["conda_file"]["dependencies"][2]["pip"] = PIP_PLACEHOLDER
    spec["environment"].pop("version", None)  # a hash of the conda file: follows requirements.lock
    assert spec == yaml.safe_load(GOLDEN.read_text()), f"job spec changed: review it, then update {GOLDEN.name}"
    loaded = load_job(str(tmp_path / "job.yml"))
    assert loaded.type == "command"
    assert loaded.compute == job.compute and loaded.command == job.command
    assert loaded.environment.image == job.environment.image
    # every pin of requirements.lock, with ONNX Runtime swapped for the CUDA builds bench/gpu/wheels.txt pins
    lock = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line and not line.startswith("#")]
    assert len(pip) == len(lock)
    assert "onnxruntime-gpu==1.31.1" in pip and "onnxruntime-genai-cuda==0.18.0" in pip
    assert not any(p.startswith(("onnxruntime==", "onnxruntime-genai==")) for p in pip)


def test_several_gpus_run_the_stages_own_torchrun_in_one_process(tmp_path):
    cloud = {**default_params()["cloud"], "overrides": ["device=cuda", "device.gpus=4"]}
    spec = spec_of(build(cloud), tmp_path)
    assert "python -m tools.params device=cuda device.gpus=4" in spec["command"]
    assert "distribution" not in spec and spec["resources"]["instance_count"] == 1


def repo_copy(tmp_path: Path, params: dict | None = None) -> Path:
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".dvc").mkdir()
    write_params(tmp_path, params or default_params())
    return tmp_path


def cloud_cli(cwd: Path, *args: str, env_extra: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in AZURE_ENV}
    env.update(PYTHONPATH=str(ROOT), **(env_extra or {}))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tools.cloud", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    return done, time.monotonic() - start


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0, done.stdout
    lines = [line for line in done.stderr.splitlines() if ": error: " in line]  # progress logs may precede it
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_dry_run_writes_a_checked_spec_without_secrets(tmp_path):
    repo = repo_copy(tmp_path)
    # a real account's key in the local DVC config must not travel (it is in .amlignore, and never in the spec)
    (repo / ".dvc/config.local").write_text(
        "['remote \"azure\"']\n    connection_string = AccountName=a;AccountKey=c2VjcmV0\n"
    )
    done, _ = cloud_cli(repo, "--dry-run", env_extra={"AZURE_STORAGE_CONNECTION_STRING": "AccountKey=c2VjcmV0"})
    assert done.returncode == 0, done.stderr
    text = (repo / ".cloud/job.yml").read_text()
    assert "c2VjcmV0" not in text and "AccountKey" not in text
    assert ".dvc/config.local" in (ROOT / ".amlignore").read_text().splitlines()


def test_no_workspace_is_one_line_within_seconds(tmp_path):
    done, seconds = cloud_cli(repo_copy(tmp_path))
    assert "no Azure ML workspace configured" in one_error_line(done)
    assert seconds < 30  # fail-fast bound (README: timed tests); measured ~5 s, mostly importing azure-ai-ml


def test_sign_in_without_credentials_is_one_line_within_the_timeout(tmp_path):
    env = {"AZURE_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000000", "AZURE_RESOURCE_GROUP": "rg",
           "AZUREML_WORKSPACE": "ws", "AZURE_CONFIG_DIR": str(tmp_path / "no-az-login")}  # fmt: skip
    done, seconds = cloud_cli(repo_copy(tmp_path), env_extra=env)
    assert "cloud: error: Azure sign-in failed" in one_error_line(done)
    assert seconds < 45  # cloud.timeout_s 10 + imports and exit on a busy host


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["cloud"].update(stages=["finetune", "train"]), "cloud.stages names 'train'"),
        (lambda p: p["cloud"].update(compute=""), "cloud.compute must be set"),
        (lambda p: p["cloud"].update(overrides=["device.gpus=two"]), "device.gpus='two'"),
        (lambda p: p["cloud"].update(nodes=2), "cloud.nodes is 2"),
        (lambda p: p.pop("cloud"), "'cloud' section missing"),
    ],
)
def test_bad_cloud_params_are_one_line(tmp_path, change, message):
    params = default_params()
    change(params)
    done, _ = cloud_cli(repo_copy(tmp_path, params), "--dry-run")
    assert message in one_error_line(done)
    assert not (tmp_path / ".cloud").exists() or not (tmp_path / ".cloud/job.yml").exists()


def test_local_azurite_remote_and_a_leaky_snapshot_are_refused(tmp_path):
    repo = repo_copy(tmp_path)
    (repo / ".dvc/config.local").write_text(
        "['remote \"azure\"']\n    connection_string = DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;\n"
    )
    done, _ = cloud_cli(repo, "--dry-run")
    assert "points at a local Azurite" in one_error_line(done)
    (repo / ".dvc/config.local").unlink()
    (repo / ".amlignore").write_text(".venv/\nmodels/\n")
    done, _ = cloud_cli(repo, "--dry-run")
    assert ".amlignore: must list .dvc/config.local" in one_error_line(done)


LIVE = all(os.environ.get(k) for k in AZURE_ENV[:3]) and os.environ.get("CLOUD_LIVE_TEST") == "1"


@pytest.mark.skipif(not LIVE, reason="needs CLOUD_LIVE_TEST=1, a workspace in env and `az login` (submits a real job)")
def test_live_submit():  # pragma: no cover - needs Azure
    done = subprocess.run([sys.executable, "-m", "tools.cloud"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "submitted " in done.stdout
