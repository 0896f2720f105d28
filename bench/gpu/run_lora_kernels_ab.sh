#!/usr/bin/env bash
# Variants of the fused layout's CUDA kernels (olive_lab/kernels/lora_resident_cuda.cu, picked by environment
# settings the library reads when a session creates the op) on an offline CUDA host. Prepare as for run_cuda_lora.sh
# (`make gpu-kernels gpu-tokenizer`, the wheels installed into $SITE), then, from the repository root:
#     bash bench/gpu/run_lora_kernels_ab.sh check [NAME=VALUE...]      # kernel-check with these settings
#     bash bench/gpu/run_lora_kernels_ab.sh screen SIZE VARIANT...     # one process per variant, the LAYOUTS given
#     bash bench/gpu/run_lora_kernels_ab.sh ab SIZE NAME=VALUE         # env-ab: the library's default against it
#     SIZE: default | phi35; VARIANT: `default` or settings joined by '+', e.g.
#     OLIVE_LAB_LORA_TWO_LAUNCHES=1 (decoding steps in two launches instead of lora_one's one). A
#     library that reads no setting runs one `default` variant. Settings exported before `ab` hold in both arms.
#     LAYOUTS (environment, default fused) are the layouts `screen` measures in each variant's process, e.g.
#     LAYOUTS=fused,fused_split_mlp,plain (bench.cuda_lora's names).
#     BLOCK=128 LM_HEAD=fp32 (environment) pick the build, as bench.cuda_lora's --block-size / --lm-head do: the
#     any-model issue's 3.8B figures come from `BLOCK=128 LM_HEAD=fp32 ... phi35`.
# Another kernel library (a branch's `make gpu-kernels` build): OLIVE_LAB_KERNELS=<its .so> with a WORK of its own,
# since each built model carries the library it was built with (bench.cuda_lora refuses to measure a mismatch).
# Writes under OUT_DIR (default bench/results): <date>-cuda-lora-kernel-check[-<settings>].json,
# <date>-cuda-lora-kernel-screen-<size>.json (a first look: one reading per variant, for picking what to A/B) and
# <date>-cuda-lora-env-ab-<size>.json. A kernel that fails its check stops the script before anything is measured.
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/env.sh
WORK=${WORK:-/tmp/cuda_lora}
OUT_DIR=${OUT_DIR:-bench/results}
day=$(date +%F)
mkdir -p "$OUT_DIR"
build=(--lm-head "${LM_HEAD:-int8}"); [ -n "${BLOCK:-}" ] && build+=(--block-size "$BLOCK")
root() {  # SIZE's build folder, as bench.cuda_lora names it
  python3 -c "import sys; from pathlib import Path; from bench.cuda_lora import size_root
print(size_root(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if sys.argv[3] else None, sys.argv[4]))" \
    "$WORK" "$1" "${BLOCK:-}" "${LM_HEAD:-int8}"
}
built() {  # build SIZE's layouts once per WORK and build
  grep -qs '"fused_split_mlp"' "$(root "$1")/state.json" ||
    python3 -m bench.cuda_lora build --size "$1" --work "$WORK" --layouts plain,branches,resident,fused,fused_split_mlp \
      "${build[@]}"
}
step=${1:?step: check, screen or ab}; shift
case "$step" in
  check)
    tag=$(echo "$*" | tr -c 'A-Za-z0-9\n' '-' | tr 'A-Z' 'a-z')
    env "$@" python3 -m bench.cuda_lora kernel-check --out "$OUT_DIR/$day-cuda-lora-kernel-check${tag:+-$tag}.json" ;;
  screen)
    size=${1:?size}; shift
    built "$size"
    mkdir -p "$OUT_DIR/screen"
    readings=()  # variant, its child's JSON, ...
    for variant in "$@"; do
      settings=(); [ "$variant" = default ] || IFS=+ read -r -a settings <<< "$variant"
      reading="$OUT_DIR/screen/$day-$size-$(echo "$variant" | tr -c 'A-Za-z0-9\n' '-').json"
      env "${settings[@]}" python3 -m bench.cuda_lora measure-one --size "$size" --work "$WORK" --layouts "${LAYOUTS:-fused}" \
        "${build[@]}" --with-profile --out "$reading"
      readings+=("$variant" "$reading")
    done
    python3 - "$size" "$OUT_DIR/$day-cuda-lora-kernel-screen-$size.json" "${readings[@]}" <<'PY'
import json, sys
from pathlib import Path
import torch
size, out, pairs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
speeds, lora_us, per_token = {}, {}, {}
for v, reading in zip(pairs[::2], pairs[1::2]):
    child = json.loads(Path(reading).read_text())
    speeds[v] = {layout: {a: r["decode_tok_s"] for a, r in runs.items()} for layout, runs in child["ort"].items()}
    lora_us[v], per_token[v] = {}, {}
    for layout in child["ort"]:
        for mode, key in (("none", "profile"), ("a", "profile_adapter")):
            profile = (child.get(key) or {}).get(layout)
            if not profile:
                continue
            lora_us[v].setdefault(layout, {})[mode] = {
                k.split("::")[-1].split("(")[0]: us for k, us in profile["kernel_us_by_name"].items() if "lora" in k}
            per_token[v].setdefault(layout, {})[mode] = {
                k: profile[k] for k in ("kernels_per_token", "kernel_us_per_token", "wall_us_per_token")}
# greedy tokens: how many of each run's agree with the first variant's first layout (with the same adapter)
first = json.loads(Path(pairs[1]).read_text())["ort"]
ref = next(iter(first.values()))
agree = {}
for v, reading in zip(pairs[::2], pairs[1::2]):
    for layout, runs in json.loads(Path(reading).read_text())["ort"].items():
        for a, r in runs.items():
            if a in ref:
                want = ref[a]["tokens"]
                agree.setdefault(v, {}).setdefault(layout, {})[a] = next(
                    (i for i, (x, y) in enumerate(zip(r["tokens"], want)) if x != y), min(len(r["tokens"]), len(want)))
result = {"device": torch.cuda.get_device_name(0), "size": size, "decode_tok_s": speeds,
          "tokens_agreeing_with_first": agree,
          "lora_kernel_us_per_token": lora_us, "profile_per_token": per_token,
          "about": "one child process per variant, in this order: a first look for picking an A/B, not a result"}
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
PY
    ;;
  ab)
    size=${1:?size}; setting=${2:?NAME=VALUE}
    built "$size"
    python3 -m bench.cuda_lora env-ab --size "$size" --work "$WORK" --env "$setting" --layouts fused,plain "${build[@]}" \
      --out "$OUT_DIR/$day-cuda-lora-env-ab-$size.json" ;;
  *) echo "usage: $0 check [NAME=VALUE...] | screen SIZE VARIANT... | ab SIZE NAME=VALUE" >&2; exit 2 ;;
esac
