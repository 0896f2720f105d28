#!/usr/bin/env bash
# bench/ddp.py on a host with several GPUs: the finetune stage on 1 GPU against N (torchrun), same seed.
# Needs python3 with torch (CUDA), transformers and peft (no ONNX Runtime), the borrowed tokenizer (.gpu/, from
# `make gpu-tokenizer`) and data/split/ (from `dvc repro data`). Writes bench/results/<date>-ddp.json.
#     bash bench/gpu/run_ddp.sh [--gpus 2] [--size phi35|default] [--batch-size 8] [--steps 20]
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m bench.ddp "$@"
