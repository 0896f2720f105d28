"""An Azure ML command job that reproduces chosen pipeline stages on cloud GPUs (`make cloud`, tools/cloud.py).

The job is built from azure-ai-ml's own entities (CommandJob, Environment), so its YAML is what
the SDK and `az ml job create --file` accept; it is checked offline by a dump/load round trip. What goes in:
- environment: a CUDA base image (cloud.image) plus a conda file made from requirements.lock, with onnxruntime and
  onnxruntime-genai swapped for their CUDA builds at the versions bench/gpu/wheels.txt pins;
- code: a snapshot of the repository minus what .amlignore lists (venv, models, caches, .dvc/config.local);
- command: compose params.yaml from conf/ with cloud.overrides, `dvc pull` what the chosen stages need, `dvc repro`
  them, `dvc push` the results, and keep dvc.lock, params.yaml, metrics/ and plots/ as the job's outputs (download
  them, then `make pull` brings the models home);
- credentials: none in the job. The compute's managed identity signs DVC in to the storage account named by
  cloud.storage_account (env AZURE_STORAGE_ACCOUNT, not a secret); a connection string or key in .dvc/config.local
  never travels (.amlignore) and a remote that is the local Azurite is refused in one line.
- several GPUs (device.gpus > 1 in cloud.overrides): the finetune stage starts one torchrun worker per GPU itself,
  under `dvc repro`, so the job runs one process on one node and sets no PyTorchDistribution: Azure ML's would start
  one copy of the whole command (`dvc repro` included) per GPU in the same folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from olive_lab.errors import StageError

PARAMS_FILE = "params.yaml"
CONDA_NAME = "olive-lab"
PYTHON = "3.11"
# .amlignore must keep these out of the code snapshot: secrets (a connection string in .dvc/config.local) and gigabytes
MUST_IGNORE = (".dvc/config.local", ".venv/", "models/", ".dvc/cache/")
GPU_WHEELS = {"onnxruntime": "onnxruntime-gpu", "onnxruntime-genai": "onnxruntime-genai-cuda"}
STAGE_NAME = re.compile(r"[A-Za-z0-9_@.-]+")


def gpu_pins(wheels_txt: str) -> dict[str, str]:
    """The CUDA builds' pins ('onnxruntime-gpu==1.31.1', ...) from bench/gpu/wheels.txt."""
    pins = {}
    for line in wheels_txt.splitlines():
        name, _, version = line.split("#")[0].strip().partition("==")
        if name in GPU_WHEELS.values() and version:
            pins[name] = f"{name}=={version}"
    missing = set(GPU_WHEELS.values()) - set(pins)
    if missing:
        raise StageError(f"bench/gpu/wheels.txt: no pin for {', '.join(sorted(missing))}")
    return pins


def conda_spec(lock_text: str, wheels_txt: str) -> dict[str, Any]:
    """A conda environment: Python and every pin of requirements.lock, the ONNX Runtime packages as CUDA builds."""
    cuda = gpu_pins(wheels_txt)
    pins = []
    for line in lock_text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = re.split(r"[=<>!~ ;]", line, maxsplit=1)[0].lower()
        pins.append(cuda[GPU_WHEELS[name]] if name in GPU_WHEELS else line)
    return {"name": CONDA_NAME, "channels": ["conda-forge"], "dependencies": [f"python={PYTHON}", "pip", {"pip": pins}]}


def check_cloud(cloud: Any, dvc_stages: set[str]) -> dict[str, Any]:
    """cloud.* from params.yaml, each problem as one line naming the field."""
    if not isinstance(cloud, dict):
        raise StageError(f"{PARAMS_FILE}: 'cloud' section missing (run `make params`)")
    for key in ("compute", "image", "storage_account", "experiment_name"):
        if not isinstance(cloud.get(key), str) or not cloud[key].strip():
            raise StageError(f"{PARAMS_FILE}: cloud.{key} must be set (a non-empty string)")
    stages = cloud.get("stages")
    if not isinstance(stages, list) or not stages:
        raise StageError(f"{PARAMS_FILE}: cloud.stages must list the stages to reproduce, e.g. [finetune]")
    for stage in stages:
        base = str(stage).split("@")[0]
        if not isinstance(stage, str) or not STAGE_NAME.fullmatch(stage) or base not in dvc_stages:
            raise StageError(
                f"{PARAMS_FILE}: cloud.stages names '{stage}', not a stage of dvc.yaml ({sorted(dvc_stages)})"
            )
    overrides = cloud.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise StageError(f"{PARAMS_FILE}: cloud.overrides must be a list of KEY=VALUE Hydra overrides")
    nodes = cloud.get("nodes", 1)
    if nodes != 1:
        raise StageError(f"{PARAMS_FILE}: cloud.nodes is {nodes}: jobs run on one node (several GPUs via device.gpus)")
    return cloud


def check_snapshot(amlignore: Path) -> None:
    lines = {line.strip() for line in amlignore.read_text().splitlines()} if amlignore.exists() else set()
    missing = [entry for entry in MUST_IGNORE if entry not in lines]
    if missing:
        raise StageError(f"{amlignore}: must list {', '.join(missing)} (kept out of the job's code snapshot)")


def check_remote(local_config: Path) -> None:
    """A cloud job cannot reach the local Azurite: refuse before anything is sent."""
    if local_config.exists() and re.search(r"127\.0\.0\.1|localhost|devstoreaccount1", local_config.read_text()):
        raise StageError(
            f"{local_config}: the DVC remote points at a local Azurite, which a cloud job cannot reach; "
            "run `make remote-down` and name a storage account in cloud.storage_account"
        )


def gpus_of(overrides: list[str]) -> int:
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip().lstrip("+") == "device.gpus":
            try:
                return int(value)
            except ValueError:
                raise StageError(f"{PARAMS_FILE}: cloud.overrides has device.gpus={value!r}, not a number") from None
    return 1


def job_command(stages: list[str], overrides: list[str]) -> str:
    steps = [
        "dvc config --local core.no_scm true",  # the snapshot has no .git
        # the storage account, signed in with the compute's managed identity (DVC's default credential)
        'dvc remote modify --local "$(dvc remote default)" account_name "$AZURE_STORAGE_ACCOUNT"',
        f"python -m tools.params {' '.join(overrides)}".strip(),
        "dvc pull --allow-missing",
        f"dvc repro {' '.join(stages)}",
        "dvc push",
        "mkdir -p outputs && cp -r dvc.lock params.yaml metrics plots outputs/",
    ]
    return " && ".join(steps)


def build_job(cloud: dict[str, Any], lock_text: str, wheels_txt: str, code: Path, tags: dict[str, str]):
    """The CommandJob entity for `cloud` (checked with check_cloud)."""
    from azure.ai.ml.entities import CommandJob, Environment, JobResourceConfiguration, ManagedIdentityConfiguration

    overrides = list(cloud.get("overrides") or [])
    gpus_of(overrides)  # a bad device.gpus is one line here rather than a failed job
    environment = Environment(image=cloud["image"], conda_file=conda_spec(lock_text, wheels_txt))
    return CommandJob(
        code=str(code),
        command=job_command(list(cloud["stages"]), overrides),
        environment=environment,
        compute=cloud["compute"],
        resources=JobResourceConfiguration(instance_count=1),
        identity=ManagedIdentityConfiguration(),
        experiment_name=cloud["experiment_name"],
        display_name=f"olive-lab {' '.join(cloud['stages'])}",
        environment_variables={
            "AZURE_STORAGE_ACCOUNT": cloud["storage_account"],
            "DVC_NO_ANALYTICS": "1",
        },
        tags=tags,
    )
