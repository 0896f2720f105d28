#!/usr/bin/env bash
# The pipeline at Phi-3.5-mini's size (random weights, model=phi35_mini_shape) on an offline CUDA host, then
# ORT GenAI against torch eager and the chat engine: writes bench/results/<date>-cuda-phi35-shape.json.
#
# Prepare on a machine with internet, from the repository root:  make wheelhouse gpu-tokenizer gpu-kernels
# then copy the repository (with .wheelhouse/ and .gpu/) to the GPU host and, from its root:
#     bash bench/gpu/run_phi35_shape.sh [install|stages STAGE...|measure|report|all]
# Each step fits in 10 minutes on one H200, so a time-limited session can run them one by one; the state lives in
# /tmp/cuda_e2e (STATE to change it). Needs python3 with torch (CUDA), transformers and peft.
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/env.sh
STATE=${STATE:-/tmp/cuda_e2e/state.json}
install_phi35() {
  install
  cp bench/gpu/params-phi35-shape.yaml params.yaml   # composed with: python -m tools.params model=phi35_mini_shape device=cuda experiment=scale model.tokenizer_dir=.gpu/tokenizer
  python3 -c "import llmcompressor"
}

step=${1:-all}; shift || true
case "$step" in
  install) install_phi35 ;;
  stages) python3 -m bench.cuda_e2e stages "$@" --state "$STATE" ;;
  measure) python3 -m bench.cuda_e2e measure --layouts plain --state "$STATE" ;;
  report) python3 -m bench.cuda_e2e report --state "$STATE" --out "bench/results/$(date +%F)-cuda-phi35-shape.json" ;;
  all)
    install_phi35
    python3 -m bench.cuda_e2e stages base data quantize finetune@travel finetune@trip_json optimize evaluate --state "$STATE"
    python3 -m bench.cuda_e2e measure --layouts plain --state "$STATE"
    python3 -m bench.cuda_e2e report --state "$STATE" --out "bench/results/$(date +%F)-cuda-phi35-shape.json" ;;
  *) echo "usage: $0 [install|stages STAGE...|measure|report|all]" >&2; exit 2 ;;
esac
