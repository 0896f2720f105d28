#!/usr/bin/env bash
# bench/chat_speed.py on an offline CUDA host: the chat app under Pilot against the engine alone on a CUDA-built
# model of the default model's shape (random weights, two random adapters, the resident layout that device=cuda
# builds). Adds the `cuda` key to bench/results/<date>-chat.json (copy it back and merge with the CPU run's file).
#
# Prepare where there is internet, from the repository root:  make wheelhouse gpu-tokenizer
# (bench/gpu/wheels.txt lists the chat's wheels too: Textual and its dependencies), then copy
# the repository to the GPU host and, from its root:  bash bench/gpu/run_chat_speed.sh [ROUNDS [--compare-in-process] [--compare-flush-hz HZ]]
# About 2 minutes on one H200 with 7 rounds and --compare-in-process, install and build included; WORK=/tmp/cuda_lora
# as for run_cuda_lora.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/env.sh
WORK=${WORK:-/tmp/cuda_lora}
install
python3 -c "import textual" 2>/dev/null || { echo "Textual is not installed: add its wheels to .wheelhouse/" >&2; exit 2; }
python3 -m bench.cuda_lora build --size default --work "$WORK"
python3 -m bench.chat_speed --device cuda --rounds "${1:-7}" --model "$WORK/default/resident" --adapter a "${@:2}"
