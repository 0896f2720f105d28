"""Every path of the repository layout, in one place (the stages, tools and benches import them from here).

Library functions never use these directly: they take their inputs and outputs as arguments.
"""

from __future__ import annotations

from pathlib import Path

PARAMS_FILE = Path("params.yaml")
CONF_DIR = Path("conf")

DATA_DIR = Path("data")  # data/<task>.jsonl, hand-written or generated (data/README.md)
SPLITS = DATA_DIR / "split"  # <task>/{train,eval}.jsonl, written by the data stage
# Hand-written out-of-distribution trip_json requests (data/README.md), tracked in git: never produced by a stage,
# read by evaluate only (never by data or finetune: tests/test_ood.py)
TRIP_JSON_OOD = DATA_DIR / "ood" / "trip_json_ood.jsonl"

MODELS = Path("models")
BASE_MODEL = MODELS / "base"  # Hugging Face folder, fp32 (base stage)
QUANTIZED = MODELS / "quantized"  # fake-quantized int4 Hugging Face folder (quantize stage, quantize.method)
ADAPTERS = MODELS / "adapters"  # <task>/: PEFT LoRA folders (finetune stage)
ONNX = MODELS / "onnx"  # model/ (ORT GenAI) + adapters/<task>.onnx_adapter (optimize stage)
UPLOAD = MODELS / "upload"  # model.yml + receipt.json (upload stage)

METRICS = Path("metrics")
BASE_METRICS = METRICS / "base.json"
DATA_METRICS = METRICS / "data.json"
QUANTIZE_METRICS = METRICS / "quantize.json"
FINETUNE_METRICS = METRICS / "finetune"  # <task>.json
OPTIMIZE_METRICS = METRICS / "optimize.json"
EVAL_METRICS = METRICS / "eval.json"
# Wall-clock figures (stage seconds, tok/s, TTFT, RSS) live apart from quality metrics: no stage depends on them,
# so re-running a stage with identical outputs never re-runs the stages after it.
PERF = METRICS / "perf"  # <stage>.json, finetune_<task>.json

PLOTS = Path("plots")
FINETUNE_PLOTS = PLOTS / "finetune"  # <task>.csv: the loss curve
EVAL_PLOTS = PLOTS / "eval"

AZURITE_STATE = Path(".azurite")  # gitignored: blob data, pid and log of the server `make remote-up` starts
AZURITE_BIN = Path("node_modules/.bin/azurite-blob")  # installed by `npm ci` (package.json pins azurite)
DVC_LOCAL_CONFIG = Path(".dvc/config.local")
DVC_CACHE = Path(".dvc/cache")  # DVC's default local cache (what `make pull` fills)

BENCH_RESULTS = Path("bench/results")

# `make cloud` (tools/cloud.py)
DVC_YAML = Path("dvc.yaml")
REQUIREMENTS_LOCK = Path("requirements.lock")
GPU_WHEELS = Path("bench/gpu/wheels.txt")  # the CUDA builds' pins
AMLIGNORE = Path(".amlignore")  # what the job's code snapshot leaves out
CLOUD_DIR = Path(".cloud")  # gitignored: the last job spec, .cloud/job.yml


def adapter_dir(task: str) -> Path:
    return ADAPTERS / task


def finetune_metrics(task: str) -> Path:
    return FINETUNE_METRICS / f"{task}.json"


def finetune_plot(task: str) -> Path:
    return FINETUNE_PLOTS / f"{task}.csv"


def perf_file(name: str) -> Path:
    return PERF / f"{name}.json"
