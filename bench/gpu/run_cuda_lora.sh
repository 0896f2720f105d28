#!/usr/bin/env bash
# bench/cuda_lora.py on an offline CUDA host: ORT GenAI decode with and without adapters per multi-LoRA layout, at the
# default model's size and Phi-3.5-mini's (random weights). Writes bench/results/<date>-cuda-lora.json.
#
# Prepare where there is internet, from the repository root:  make wheelhouse gpu-tokenizer gpu-kernels
# then copy the repository (with .wheelhouse/ and .gpu/) to the GPU host and, from its root:
#     bash bench/gpu/run_cuda_lora.sh [install|build SIZE|measure SIZE|report|env-ab SIZE NAME=VALUE [LAYOUTS]|build-ab SIZE KEY=VALUE...|kernel-check|layouts SIZE|goals|all]
#     SIZE: default | phi35; env-ab: child processes with and without one environment setting, taking turns;
#     env-ab SIZE NAME=VALUE plain also measures the plain model; build-ab SIZE KEY=VALUE...: builds the config's
#     model and one with these builder options, then measures them against each other the same way (plain included);
#     kernel-check: the fused layout's custom op (.gpu/kernels, `make gpu-kernels`) against numpy on this GPU;
#     layouts SIZE: builds plain, branches, resident and fused, then measures each layout in its own process
#     (phi35: int4 block 128 and a dense fp16 lm_head, the best build measured); goals: that phi35 build's plain and
#     fused layouts and torch eager in one process, against the any-model issue's >= 400 tok/s and >= 8x torch eager
# Every step fits in 10 minutes on one H200; the state lives in /tmp/cuda_lora (WORK to change it).
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/env.sh
WORK=${WORK:-/tmp/cuda_lora}
step=${1:-all}; shift || true
case "$step" in
  install) install ;;
  build|measure) python3 -m bench.cuda_lora "$step" --size "${1:?size: default or phi35}" --work "$WORK" ;;
  env-ab) python3 -m bench.cuda_lora env-ab --size "${1:?size: default or phi35}" --env "${2:?NAME=VALUE}" --work "$WORK" \
            ${3:+--layouts "$3"} ;;
  build-ab)
    size=${1:?size: default or phi35}; shift
    [ $# -gt 0 ] || { echo "build-ab: give builder options as KEY=VALUE" >&2; exit 2; }
    opts=(); for o in "$@"; do opts+=(--builder-option "$o"); done
    python3 -m bench.cuda_lora build --size "$size" --work "$WORK" --layouts plain,branches,resident
    python3 -m bench.cuda_lora build --size "$size" --work "$WORK" --layouts plain,branches,resident "${opts[@]}"
    python3 -m bench.cuda_lora build-ab --size "$size" --work "$WORK" --layouts plain "${opts[@]}" ;;
  kernel-check) python3 -m bench.cuda_lora kernel-check --out "bench/results/$(date +%F)-cuda-lora-kernel-check.json" ;;
  layouts)
    size=${1:?size: default or phi35}
    build=(); [ "$size" = phi35 ] && build=(--block-size 128 --lm-head fp32)
    python3 -m bench.cuda_lora build --size "$size" --work "$WORK" --layouts plain,branches,resident,fused "${build[@]}"
    python3 -m bench.cuda_lora layouts --size "$size" --work "$WORK" --layouts fused,resident,branches,plain \
      --repeats "${REPEATS:-3}" "${build[@]}" ;;
  goals)  # the any-model issue's decode goals: the fused layout at the 3.8B shape against plain and torch eager
    build=(--size phi35 --work "$WORK" --block-size 128 --lm-head fp32)
    python3 -m bench.cuda_lora build "${build[@]}" --layouts plain,fused
    python3 -m bench.cuda_lora measure "${build[@]}"
    python3 -m bench.cuda_lora goals "${build[@]}" ;;
  report) python3 -m bench.cuda_lora report --work "$WORK" --out "bench/results/$(date +%F)-cuda-lora.json" ;;
  all)
    install
    for size in default phi35; do
      python3 -m bench.cuda_lora build --size $size --work "$WORK"
      python3 -m bench.cuda_lora measure --size $size --work "$WORK"
    done
    python3 -m bench.cuda_lora report --work "$WORK" --out "bench/results/$(date +%F)-cuda-lora.json" ;;
  *) echo "usage: $0 [install|build SIZE|measure SIZE|report|env-ab SIZE NAME=VALUE [LAYOUTS]|build-ab SIZE KEY=VALUE...|kernel-check|layouts SIZE|goals|all]" >&2; exit 2 ;;
esac
