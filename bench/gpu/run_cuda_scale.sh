#!/usr/bin/env bash
# The perf-scale issue's GPU figure on an offline CUDA host: ORT GenAI decode at Phi-3.5-mini's shape (random weights)
# per int4 block size, against the device's bandwidth bound. Writes bench/results/<date>-cuda-scale.json.
#
# Prepare where there is internet, from the repository root:  make wheelhouse gpu-tokenizer
# then copy the repository (with .wheelhouse/ and .gpu/) to the GPU host and, from its root:
#     bash bench/gpu/run_cuda_scale.sh [install|block N...|report|all]
# `block N` builds the plain model and the pipeline's CUDA layout (resident) with int4 blocks of N and measures them
# (about 2.5 minutes each on one H200, the first one 1 more for the random weights); the state lives in
# /tmp/cuda_lora (WORK to change it), shared with run_cuda_lora.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/env.sh
WORK=${WORK:-/tmp/cuda_lora}
step=${1:-all}; shift || true
block() {
  for n in "$@"; do
    python3 -m bench.cuda_lora build --size phi35 --block-size "$n" --layouts plain,resident --work "$WORK"
    python3 -m bench.cuda_lora measure --size phi35 --block-size "$n" --no-torch --work "$WORK"
  done
}
case "$step" in
  install) install ;;
  block) block "$@" ;;
  report) python3 -m bench.cuda_lora scale-report --work "$WORK" --out "bench/results/$(date +%F)-cuda-scale.json" ;;
  all)
    install
    block 32 64 128
    python3 -m bench.cuda_lora scale-report --work "$WORK" --out "bench/results/$(date +%F)-cuda-scale.json" ;;
  *) echo "usage: $0 [install|block N...|report|all]" >&2; exit 2 ;;
esac
