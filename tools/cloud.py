"""`make cloud`: reproduce cloud.stages as an Azure ML command job (olive_lab/azure/jobs.py, README "Scaling out").

    python -m tools.cloud             # build, check and submit; prints the job's name and studio URL
    python -m tools.cloud --dry-run   # build and check only: .cloud/job.yml (`az ml job create --file` takes it)

Every problem is one line before anything is sent: cloud.* params, the snapshot's .amlignore, a DVC remote that is
the local Azurite, no workspace, a sign-in that does not answer within cloud.timeout_s.
"""

from __future__ import annotations

import argparse
import time

import yaml

from olive_lab import paths
from olive_lab.azure.jobs import build_job, check_cloud, check_remote, check_snapshot
from olive_lab.azure.registry import azure_errors, git_revision, open_workspace, quiet_azure_logs, workspace_config
from olive_lab.cli import entry_point
from olive_lab.errors import StageError
from olive_lab.params import load_params


def dvc_stages() -> set[str]:
    return set((yaml.safe_load(paths.DVC_YAML.read_text()) or {}).get("stages", {}))


def write_spec(job, out_dir) -> None:
    """Dump the job and load it back with the SDK's schema: what `az ml job create --file` would read."""
    from azure.ai.ml import load_job

    out_dir.mkdir(parents=True, exist_ok=True)
    spec = out_dir / "job.yml"
    job.dump(str(spec))
    try:
        load_job(str(spec))
    except Exception as exc:  # the SDK's schema errors run over many lines
        raise StageError(f"{spec}: Azure ML rejects the job spec: {str(exc).strip().splitlines()[0]}") from exc


@entry_point
def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.cloud")
    parser.add_argument("--dry-run", action="store_true", help="build and check .cloud/job.yml, send nothing")
    args = parser.parse_args(argv)
    started = time.monotonic()
    quiet_azure_logs()
    params = load_params(paths.PARAMS_FILE)
    cloud = check_cloud(params.get("cloud"), dvc_stages())
    check_snapshot(paths.AMLIGNORE)
    check_remote(paths.DVC_LOCAL_CONFIG)
    job = build_job(
        cloud,
        paths.REQUIREMENTS_LOCK.read_text(),
        paths.GPU_WHEELS.read_text(),
        code=paths.PARAMS_FILE.resolve().parent,
        tags={"git": git_revision()},
    )
    write_spec(job, paths.CLOUD_DIR)
    if args.dry_run:
        print(f"{paths.CLOUD_DIR / 'job.yml'}: job spec written and checked; nothing sent (--dry-run)")
        return
    workspace = workspace_config(params)
    if workspace is None:
        raise StageError(
            "no Azure ML workspace configured: set upload.subscription_id, upload.resource_group and upload.workspace "
            "(or env AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, AZUREML_WORKSPACE)"
        )
    timeout_s = float(cloud.get("timeout_s") or 10)
    client = open_workspace(workspace, timeout_s, started + timeout_s)
    with azure_errors("submit the job"):
        created = client.jobs.create_or_update(job)
    print(f"submitted {created.name}: {created.studio_url}")
    print(
        f"afterwards: az ml job download -n {created.name} --all, copy its dvc.lock, metrics/ and plots/ here, `make pull`"
    )


if __name__ == "__main__":
    run()
