"""Stage upload: register models/onnx as an Azure ML model asset (models/upload/model.yml + receipt.json).

With no workspace configured (params upload.subscription_id / resource_group / workspace, or env
AZURE_SUBSCRIPTION_ID / AZURE_RESOURCE_GROUP / AZUREML_WORKSPACE) nothing is sent: the receipt says why, so
`dvc repro` stays green offline.
"""

from __future__ import annotations

import time

from olive_lab import paths
from olive_lab.azure.registry import INTERPRETER_START_S, upload
from olive_lab.cli import entry_point
from olive_lab.params import load_params


@entry_point
def run(argv: list[str]) -> None:
    # upload.timeout_s bounds the whole process: the interpreter's start is counted in.
    started = time.monotonic() - INTERPRETER_START_S
    upload(load_params(paths.PARAMS_FILE), paths.ONNX, paths.EVAL_METRICS, paths.UPLOAD, started)


if __name__ == "__main__":
    run()
