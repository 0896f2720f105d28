"""Adapters at full speed on the GPU (the cuda-lora issue): ORT GenAI CUDA decode with no adapter and with each of
two adapters, for every multi-LoRA layout, at the default model's size and at Phi-3.5-mini's, plus torch eager.

    python -m bench.cuda_lora build   --size default|phi35 [--work DIR]   # random weights, 2 random adapters, ONNX
    python -m bench.cuda_lora measure --size default|phi35 [--work DIR]   # ORT GenAI per layout, torch eager
    python -m bench.cuda_lora report  [--work DIR] [--out FILE]           # bench/results/<date>-cuda-lora.json
    python -m bench.cuda_lora build|measure --size phi35 --block-size 128 --layouts plain,resident --no-torch
    python -m bench.cuda_lora profile --size phi35 [--block-size N]        # GPU kernel time per token (CUPTI)
    python -m bench.cuda_lora scale-report [--work DIR]                   # bench/results/<date>-cuda-scale.json
    python -m bench.cuda_lora env-ab --size default --env CUBLAS_WORKSPACE_CONFIG=:0:0 [--repeats 3] [--layouts plain]
    python -m bench.cuda_lora build --size default --builder-option is_symmetric=true   # a build of its own
    python -m bench.cuda_lora build-ab --size default --builder-option is_symmetric=true  # that build against the
                                                                                          # config's, by process
    python -m bench.cuda_lora kernel-check                                 # the fused layout's op against numpy
    python -m bench.cuda_lora goals --size phi35 --block-size 128 --lm-head fp32   # after build --layouts plain,fused
                                                                          # and measure: the any-model issue's goals
    python -m bench.cuda_lora layouts --size phi35 --block-size 128 --lm-head fp32 --layouts fused,resident,branches,plain
                                                                          # each layout in a process of its own

Decode speed does not depend on the weights' values, so the models are random (olive_lab.base_model's `random`
source) in the default model's shape (SmolLM2-135M, Llama) and in Phi-3.5-mini's (conf/model/phi35_mini_shape.yaml),
with SmolLM2's tokenizer (`--tokenizer-dir`, made by `make gpu-tokenizer`). The builder runs once per size; the
layouts are graph edits of that one build, sharing its weights file:
- `branches_if`: the multi-LoRA graph on the builder's output as it is (Phi-3: the LongRoPE If, so no CUDA graph);
- `plain`: no LoRA at all (LongRoPE as a Where, CUDA graph on): the ceiling;
- `branches`: today's layout, adapters in .onnx_adapter files (ORT GenAI copies them to the GPU at every step);
- `resident`: the adapters stacked in the model, the files hold an index (olive_lab.onnx.lora.make_resident);
- `fused`: `resident` with each slot's branch as one olive_lab.LoraResident custom op (olive_lab/kernels, built by
  `make gpu-kernels`): two CUDA launches per slot instead of five; a packed gate/up slot (Phi-3) also applies the
  MLP's SwiGLU (olive_lab.LoraResidentSwiGlu), as optimize builds it;
- `fused_split_mlp`: `fused` with the builder's Split, Sigmoid and Muls after the gate/up slot left in place (the
  layout before that fusion, for A/Bs).
`--block-size` builds with another int4 block than the config's group size (its own folder, <size>-b<N>), for
the perf-scale issue's share of the bandwidth bound by block size (`scale-report`); `--lm-head` likewise with another
optimize.lm_head (<...>-head-<kind>). Per layout and adapter: TTFT and decode tok/s (medians of 5 runs of 128
tokens), the greedy tokens, and whether a
switching order gives the same tokens again (a captured CUDA graph that kept the old adapter would not).
`share_of_bound`: the bytes one decoding step must read (every weight but the embedding table) over the device
bandwidth measured in the same run (a large device-to-device copy), against the measured step time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

from bench.cuda_e2e import NEW_TOKENS, ROUNDS, ort_genai, torch_eager
from olive_lab.decode import SPEED_PROMPT
from olive_lab.kernels import LIBRARY, PREBUILT_ENV
from olive_lab.paths import BENCH_RESULTS

ADAPTERS = ("a", "b")
# The `fused` layout's custom op: the library $OLIVE_LAB_KERNELS names, as for the pipeline's stages (bench/gpu/env.sh
# points it at `make gpu-kernels`' build), so an A/B of a branch's kernels measures those kernels
KERNELS = Path(os.environ.get(PREBUILT_ENV) or ".gpu/kernels/libolive_lab_kernels.so")
RANK = 16


def kernels_digest(library: Path) -> str:
    """The first 16 hex digits of a kernel library's SHA-256: results name the kernels they measured."""
    return hashlib.sha256(library.read_bytes()).hexdigest()[:16]


def check_kernels(variants: dict[str, str]) -> dict[str, str]:
    """The kernel library each built variant carries (`attach` copied it into the model folder at build time), by
    digest; SystemExit if one is not KERNELS, the library this process was told to measure: a folder built before
    $OLIVE_LAB_KERNELS changed would otherwise measure the old kernels under the new name."""
    carried = {n: kernels_digest(Path(f) / LIBRARY) for n, f in variants.items() if (Path(f) / LIBRARY).is_file()}
    if not carried:  # e.g. only `plain`, which needs no library (nor KERNELS to exist)
        return carried
    want = kernels_digest(KERNELS)
    stale = [n for n, digest in carried.items() if digest != want]
    if stale:
        raise SystemExit(
            f"{Path(variants[stale[0]]) / LIBRARY}: built with other kernels ({carried[stale[0]]}) than {KERNELS} "
            f"({want}): build again into a new --work (or remove the old one)"
        )
    return carried


# SmolLM2-135M-Instruct's config.json, as random weights
DEFAULT_ARCH = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "dtype": "bfloat16",
    "seed": 0,
}


def model_conf(size: str, tokenizer_dir: str | None) -> dict:
    if size == "phi35":
        conf = yaml.safe_load(Path("conf/model/phi35_mini_shape.yaml").read_text())
    else:
        conf = yaml.safe_load(Path("conf/model/smollm2_135m.yaml").read_text())
        conf.update(name="smollm2_135m_shape", source="random", arch=DEFAULT_ARCH, chat_template=None)
    conf["tokenizer_dir"] = tokenizer_dir
    return conf


def variant_folder(src: Path, out: Path) -> Path:
    """A copy of the ORT GenAI folder `src` to edit: own model.onnx and genai_config.json, the weights hard-linked
    (ORT 1.31 refuses external data behind a symlink that leads out of the model's folder)."""
    from olive_lab.decode import linked_copy

    model_dir = linked_copy(src, out)
    for name in ("model.onnx", "model.onnx.data"):
        (model_dir / name).unlink()  # an edit must not write through a link into `src`
    shutil.copyfile(src / "model.onnx", model_dir / "model.onnx")
    (model_dir / "model.onnx.data").hardlink_to((src / "model.onnx.data").resolve())
    return model_dir


def lora_variant(plain: Path, out: Path, layout: str, hf_dir: Path, peft: dict[str, Path]) -> Path:
    """`plain`'s model with LoRA branches in `layout`, sharing `plain`'s weights file (`fused`: the resident layout
    with olive_lab.LoraResident nodes and the kernel library, KERNELS, in the model folder)."""
    from olive_lab.kernels import attach
    from olive_lab.onnx.export import weight_names
    from olive_lab.onnx.lora import (
        add_lora_inputs,
        fuse_resident,
        fuse_swiglu,
        make_resident,
        peft_to_inputs,
        write_adapter,
    )

    if out.exists():
        shutil.rmtree(out)
    proto = variant_folder(plain, out / "model") / "model.onnx"
    config = json.loads((hf_dir / "config.json").read_text())
    fused = layout in ("fused", "fused_split_mlp")
    slots = add_lora_inputs(proto, config, "fused" if fused else layout, weight_names(hf_dir))
    values = {name: peft_to_inputs(folder, slots) for name, folder in peft.items()}
    if layout == "resident" or fused:
        values = make_resident(proto, slots, values)
    if fused:
        print(layout, fuse_resident(proto), "slots", flush=True)
        if layout == "fused":
            print("fused", fuse_swiglu(proto), "gate/up slots with the SwiGLU", flush=True)
        attach(proto.parent, KERNELS)
    (out / "adapters").mkdir(exist_ok=True)
    for name in peft:
        write_adapter(values[name], out / "adapters" / f"{name}.onnx_adapter")
    return out


def size_root(
    work: Path, size: str, block_size: int | None, lm_head: str = "int8", builder: dict[str, str] | None = None
) -> Path:
    """A build's folder: the size, then whatever differs from the config's builder call (block, lm_head, options)."""
    name = size if block_size is None else f"{size}-b{block_size}"
    name = name if lm_head == "int8" else f"{name}-head-{lm_head}"
    # an option's value may hold a path or a list (nodes_to_exclude=/lm_head/MatMul,...): one folder level each
    options = (re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{k}-{v}") for k, v in sorted((builder or {}).items()))
    return work / "-".join([name, *options])


def parse_settings(pairs: list[str] | None, what: str) -> dict[str, str]:
    """NAME=VALUE strings (repeatable CLI options) as a dict; one line and exit 2 for a malformed one."""
    settings = {}
    for pair in pairs or []:
        key, equals, value = pair.partition("=")
        if not (key and equals):
            raise SystemExit(f"{what}: expected NAME=VALUE, got {pair!r}")
        settings[key] = value
    return settings


def build(size: str, work: Path, tokenizer_dir: str | None, block_size: int | None = None,
          layouts: tuple[str, ...] = ("branches_if", "plain", "branches", "resident"),
          lm_head: str = "int8", builder_opts: dict[str, str] | None = None) -> None:  # fmt: skip
    from olive_lab.base_model import materialize
    from olive_lab.lora import random_adapter
    from olive_lab.onnx.build import export_model, set_cuda_graph
    from olive_lab.onnx.export import control_flow_nodes
    from olive_lab.onnx.rope import capturable_longrope

    conf = model_conf(size, tokenizer_dir)
    root = size_root(work, size, block_size, lm_head, builder_opts)
    base = work / size / "base"  # one set of random weights per size, whatever the block
    timings = {}
    start = time.time()
    if not (base / "config.json").exists():
        materialize(conf, base)
    timings["base_s"] = round(time.time() - start, 1)
    peft_root = work / size / "peft"  # shared by every block, like the weights
    peft = {
        name: peft_root / name
        if (peft_root / name / "adapter_config.json").exists()
        else random_adapter(base, peft_root / name, seed=i, r=RANK, target_modules=conf["lora_targets"])
        for i, name in enumerate(ADAPTERS)
    }
    start = time.time()
    builder = root / "builder" / "model"
    if not (builder / "genai_config.json").exists():
        export_model(base, builder, precision="int4", block_size=block_size or conf["group_size"], accuracy_level=4,
                     execution_provider="cuda", lm_head=lm_head, extra_options=builder_opts)  # fmt: skip
    timings["builder_s"] = round(time.time() - start, 1)
    hf_config = json.loads((base / "config.json").read_text())
    # the builder's graph as the optimize stage left it before the Where: the If (if any) keeps CUDA graphs off
    variants = {}
    if "branches_if" in layouts:
        variants["branches_if"] = lora_variant(builder, root / "branches_if", "branches", base, peft)
        set_cuda_graph(variants["branches_if"] / "model", not control_flow_nodes(builder / "model.onnx"))
    shutil.rmtree(root / "where", ignore_errors=True)
    where = variant_folder(builder, root / "where" / "model")
    original = hf_config.get("original_max_position_embeddings")
    rope_rewritten = bool(original) and capturable_longrope(where / "model.onnx", int(original))
    set_cuda_graph(where, True)
    variants["plain"] = where.parent
    for layout in ("branches", "resident", "fused", "fused_split_mlp"):
        if layout in layouts:
            variants[layout] = lora_variant(where, root / layout, layout, base, peft)
            set_cuda_graph(variants[layout] / "model", True)
    if not rope_rewritten and "branches_if" in variants:  # nothing to compare: the builder's graph has no If
        shutil.rmtree(variants.pop("branches_if"))
    state = {"conf": conf["name"], "block_size": block_size or conf["group_size"], "lm_head": lm_head,
             "builder_options": builder_opts or {},
             "base": str(base), "peft": {k: str(v) for k, v in peft.items()},
             "variants": {k: str(v) for k, v in variants.items()}, "timings": timings}  # fmt: skip
    (root / "state.json").write_text(json.dumps(state, indent=2))
    print(json.dumps(state, indent=2), flush=True)


def bytes_per_step(model_dir: Path) -> int:
    """The weights one decoding step reads: every initializer but the embedding table (one row of it is read)."""
    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    total = 0
    for t in graph.initializer:
        if "embed_tokens" in t.name:
            continue
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


def device_bandwidth_gbs() -> float:
    """Device memory bandwidth from a 4 GiB device-to-device copy (read + write), best of 5."""
    import torch

    src = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return round(2 * (4 << 30) / best / 1e9, 1)


def built_state(root: Path) -> tuple[dict, list[int]]:
    """A built size's state.json and the speed prompt's token ids in its tokenizer."""
    import torch  # noqa: F401  (first: onnxruntime-gpu finds the CUDA libraries torch brings)
    from transformers import AutoTokenizer

    from olive_lab.lm import prompt_text

    if not (root / "state.json").is_file():
        raise SystemExit(f"{root / 'state.json'}: no build here; run `python -m bench.cuda_lora build` for this size")
    state = json.loads((root / "state.json").read_text())
    tok = AutoTokenizer.from_pretrained(state["base"])
    return state, tok(prompt_text(tok, SPEED_PROMPT), add_special_tokens=False).input_ids


def measure(
    size: str, work: Path, block_size: int | None = None, with_torch: bool = True, lm_head: str = "int8"
) -> None:
    root = size_root(work, size, block_size, lm_head)
    state, ids = built_state(root)
    result = {"prompt_tokens": len(ids), "ort": {}, "torch_eager_bf16": {}}
    result["bytes_per_step"] = bytes_per_step(Path(state["variants"]["plain"]) / "model")
    for name, folder in state["variants"].items():
        names = [None] if name == "plain" else [None, *ADAPTERS]
        result["ort"][name] = ort_genai(Path(folder), ids, names)
        speeds = {k: (v["decode_tok_s"], v["ttft_ms"]) for k, v in result["ort"][name].items() if isinstance(v, dict)}
        print(name, speeds, "switching ok:", result["ort"][name].get("switching_gives_same_tokens"), flush=True)
    # torch's first CUDA work only after ORT's: on an H100 (2026-12-07) ORT decoded at 0.91-0.96x in a process whose
    # torch had already run this copy (bench/results/2026-12-07-cuda-phi35-goals.json, torch_first)
    result["bandwidth_gbs"] = device_bandwidth_gbs()
    result["block_size"], result["lm_head"] = state.get("block_size"), state.get("lm_head", "int8")
    if with_torch:
        result["torch_eager_bf16"]["base"] = torch_eager(state["base"], ids)
        result["torch_eager_bf16"]["a"] = torch_eager(state["base"], ids, Path(state["peft"]["a"]))
    print("torch eager", result["torch_eager_bf16"], flush=True)
    (root / "measured.json").write_text(json.dumps(result, indent=2))


def kernel_profile(model_dir: Path, ids: list[int], adapter: str | None, steps: int = 64) -> dict:
    """Where a decoding step's GPU time goes: CUPTI (through torch.profiler, which records every kernel in the
    process, ORT's included, captured CUDA graphs too) over `steps` tokens after the prompt. Per kernel name: device
    microseconds per token (top 12, the rest summed); all kernels; and the wall time per token, whose excess over
    the kernels is time the GPU sits idle (launches, host work between steps)."""
    from collections import defaultdict

    import onnxruntime_genai as og
    from torch.profiler import ProfilerActivity, profile

    model = og.Model(str(model_dir / "model"))
    adapters = og.Adapters(model)
    if adapter:
        adapters.load(str(model_dir / "adapters" / f"{adapter}.onnx_adapter"), adapter)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + steps + 40, do_sample=False)
    gen = og.Generator(model, params)
    if adapter:
        gen.set_active_adapter(adapters, adapter)
    gen.append_tokens(ids)
    for _ in range(32):  # past graph capture and warm-up
        gen.generate_next_token()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            gen.generate_next_token()
            gen.get_next_tokens()  # the token reaches the host, as in decoding
        wall = time.perf_counter() - start
    trace_file = Path(tempfile.mkdtemp(prefix="kernels-")) / "trace.json"
    prof.export_chrome_trace(str(trace_file))  # the device-side events as CUPTI gave them, whoever launched them
    device_events = [e for e in json.loads(trace_file.read_text())["traceEvents"]
                     if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]  # fmt: skip
    shutil.rmtree(trace_file.parent, ignore_errors=True)
    by_kernel: dict[str, float] = defaultdict(float)
    for event in device_events:
        by_kernel[event["name"][:120]] += event.get("dur", 0) / steps
    ranked = sorted(by_kernel.items(), key=lambda kv: -kv[1])
    top = {name: round(us, 1) for name, us in ranked[:12]}
    top["(other kernels)"] = round(sum(us for _, us in ranked[12:]), 1)
    kernels = sum(by_kernel.values())
    return {
        "wall_us_per_token": round(wall / steps * 1e6, 1),
        "kernel_us_per_token": round(kernels, 1),
        "gpu_idle_share": round(max(0.0, 1 - kernels / (wall / steps * 1e6)), 3),
        "kernels_per_token": round(len(device_events) / steps, 1),
        "kernel_us_by_name": top,
    }


def profile_step(size: str, work: Path, block_size: int | None) -> None:
    root = size_root(work, size, block_size)
    state, ids = built_state(root)
    result = {}
    for name, folder in state["variants"].items():
        for adapter in [None] if name == "plain" else [None, ADAPTERS[0]]:
            key = f"{name}/{adapter or 'base'}"
            result[key] = kernel_profile(Path(folder), ids, adapter)
            print(key, {k: v for k, v in result[key].items() if k != "kernel_us_by_name"}, flush=True)
    (root / "profile.json").write_text(json.dumps(result, indent=2))


def measure_layouts(size: str, work: Path, layouts: list[str], out: Path, with_profile: bool = False,
                    builder: dict | None = None, block_size: int | None = None, lm_head: str = "int8") -> None:  # fmt: skip
    """One process's decode speeds for `layouts` of a built size (no adapter and adapter a; `plain` has no adapters),
    and optionally each layout's kernel profile with no adapter: the child that `ab` starts for each arm."""
    state, ids = built_state(size_root(work, size, block_size, lm_head, builder))
    missing = [name for name in layouts if name not in state["variants"]]
    if missing:
        built = ", ".join(state["variants"])
        raise SystemExit(f"measure-one: {', '.join(missing)} not built for {size} (built: {built})")
    result: dict = {"ort": {}, "profile": {}, "kernels": check_kernels({n: state["variants"][n] for n in layouts})}
    for name in layouts:
        runs = ort_genai(Path(state["variants"][name]), ids, adapter_names(name))
        result["ort"][name] = {k: v for k, v in runs.items() if k != "switching_gives_same_tokens"}
        if with_profile:
            result["profile"][name] = kernel_profile(Path(state["variants"][name]), ids, None)
            if name != "plain":
                result.setdefault("profile_adapter", {})[name] = kernel_profile(
                    Path(state["variants"][name]), ids, ADAPTERS[0]
                )
    out.write_text(json.dumps(result))


def adapter_cost(medians: dict) -> dict:
    """The cuda-lora issue's cost per device-resident layout (fused, resident): 1 - its decode tok/s with an adapter
    over the best no-adapter tok/s of any multi-LoRA graph measured beside it (medians: {layout: {"base", "a"}})."""
    best_idle = max(m["base"] for name, m in medians.items() if name != "plain")
    return {name: round(1 - medians[name]["a"] / best_idle, 3) for name in ("fused", "resident") if name in medians}


def kernel_check(out: Path) -> None:
    """olive_lab.LoraResident on CUDA against numpy at the slot shapes of both sizes (decode and a 71-token prefill):
    one line per shape, and SystemExit if an error exceeds float16 rounding of the sums or the ONNX nodes' error, if a
    second run gives other bits, or if a decoding step's single launch (lora_one) gives other bits than two launches
    (OLIVE_LAB_LORA_TWO_LAUNCHES=1, which each op kernel reads when a session creates it)."""
    import numpy as np
    import torch  # noqa: F401  (first: onnxruntime-gpu finds the CUDA libraries torch brings)

    from olive_lab.kernels import op_error, op_inputs, op_session

    def sessions():
        return {False: op_session(KERNELS, "CUDAExecutionProvider"),
                True: op_session(KERNELS, "CUDAExecutionProvider", swiglu=True)}  # fmt: skip

    shapes = {"135m qkv": (576, 960, 96, (48, 96)), "135m down": (1536, 576, 32, (0, 16)),
              "3.8b qkv": (3072, 9216, 32, (16, 32)), "3.8b down": (8192, 3072, 32, (0, 16)),
              "3.8b gate_up": (3072, 16384, 32, (16, 32)), "3.8b gate_up swiglu": (3072, 16384, 32, (16, 32))}  # fmt: skip

    def decode_outputs(by_swiglu) -> dict:  # each shape's decoding-step output with its adapter
        return {name: by_swiglu[name.endswith("swiglu")].run(["out"], op_inputs(np.float16, 1, *shape, seed=1))[0]
                for name, shape in shapes.items()}  # fmt: skip

    one_launch = sessions()
    result = {}
    for name, (k, n, r, active) in shapes.items():
        for rows in (1, 71):
            check = op_error(one_launch[name.endswith("swiglu")], rows, k, n, r, active)
            result[f"{name} rows={rows}"] = check
            print(name, rows, check, flush=True)
    single = decode_outputs(one_launch)
    os.environ["OLIVE_LAB_LORA_TWO_LAUNCHES"] = "1"
    try:
        two = decode_outputs(sessions())
    finally:
        del os.environ["OLIVE_LAB_LORA_TWO_LAUNCHES"]  # read by each op kernel at its creation: `one_launch` keeps one
    for name in shapes:
        result[f"{name} rows=1"]["one_launch_equals_two"] = bool((single[name] == two[name]).all())
        print(name, "one launch gives the bits of two:", result[f"{name} rows=1"]["one_launch_equals_two"])
    library = {"path": str(KERNELS), "sha256_16": kernels_digest(KERNELS)}
    out.write_text(json.dumps({"library": library, **result}, indent=2))
    # float16 output of a float32 sum: at most half an ulp, 2^-11 of the largest value; allow one ulp, and never more
    # than the ONNX nodes' own error (they round twice on the way)
    bad = [
        k
        for k, v in result.items()
        if v["max_abs_error"] > 2**-10 * v["max_abs"]
        or v["max_abs_error"] > v["onnx_nodes_max_abs_error"]
        or not v.get("no_adapter_returns_y", v.get("no_adapter_is_swiglu_of_y"))
        or not v["same_output_twice"]
        or not v.get("one_launch_equals_two", True)
    ]
    if bad:
        raise SystemExit(f"kernel-check: LoraResident fails its check at {', '.join(bad)} (see {out})")


def layouts_by_process(size: str, work: Path, layouts: list[str], repeats: int, out: Path, block_size: int | None,
                       lm_head: str) -> None:  # fmt: skip
    """Each layout in a process of its own (a process's first session decodes faster than its later ones, which
    biases one process measuring several), `repeats` rounds with the order rotated every round. Per layout and
    adapter: the median decode tok/s; the cuda-lora issue's adapter cost of `fused` and `resident` against the best
    no-adapter speed; and how far each layout's greedy tokens follow the resident layout's (random weights' flat
    logits let float16 rounding part ways: the kernel-check step compares the arithmetic itself)."""
    import statistics
    import subprocess
    import sys

    import torch

    runs: dict[str, list[dict]] = {name: [] for name in layouts}
    for i in range(repeats):
        order = layouts[i % len(layouts) :] + layouts[: i % len(layouts)]
        for name in order:
            child_out = work / f"layouts-{name}-{i}.json"
            cmd = [sys.executable, "-m", "bench.cuda_lora", "measure-one", "--size", size, "--work", str(work),
                   "--layouts", name, "--lm-head", lm_head, "--out", str(child_out)]  # fmt: skip
            cmd += ["--block-size", str(block_size)] if block_size else []
            cmd += ["--with-profile"] if i == 0 else []
            if subprocess.run(cmd).returncode != 0:
                raise SystemExit(f"layouts: the {name} child {i} failed (its error is above): {' '.join(cmd)}")
            reading = json.loads(child_out.read_text())
            runs[name].append(reading)
            print(i, name, {a: r["decode_tok_s"] for a, r in reading["ort"][name].items()}, flush=True)

    def median_of(key: str) -> dict[str, dict[str, float]]:
        return {
            name: {
                a or "base": statistics.median(r["ort"][name][a or "base"][key] for r in readings)
                for a in adapter_names(name)
            }
            for name, readings in runs.items()
        }

    medians = median_of("decode_tok_s")
    # the first token with each adapter, after the previous reading ran another one: the switch stays instant
    ttft = median_of("ttft_ms")

    def agreeing_prefix(name: str, adapter: str) -> int:
        ours, theirs = (
            runs[name][0]["ort"][name][adapter]["tokens"],
            runs["resident"][0]["ort"]["resident"][adapter]["tokens"],
        )
        return next(
            (i for i, (x, y) in enumerate(zip(ours, theirs, strict=False)) if x != y), min(len(ours), len(theirs))
        )

    result = {
        "date": str(date.today()),
        "device": torch.cuda.get_device_name(0),
        "size": size,
        "block_size": block_size,
        "lm_head": lm_head,
        "repeats": repeats,
        "new_tokens": NEW_TOKENS,
        "decode_tok_s": medians,
        "ttft_ms": ttft,
        "adapter_cost_vs_best_no_adapter": adapter_cost(medians),
        "tokens_agreeing_with_resident": {
            name: {a: agreeing_prefix(name, a) for a in medians[name]}
            for name in layouts
            if "resident" in runs and name != "plain"
        },
        "profile": {name: readings[0].get("profile", {}).get(name) for name, readings in runs.items()},
        "profile_adapter": {name: readings[0].get("profile_adapter", {}).get(name) for name, readings in runs.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("profile")}, indent=2))


def adapter_names(layout: str) -> list[str | None]:
    """What an A/B measures per layout: no adapter, and adapter a where the layout has adapters."""
    return [None] if layout == "plain" else [None, ADAPTERS[0]]


# the CUDA default, and the best no-adapter speed it is held against: an A/B always measures these two
AB_LAYOUTS = ("resident", "branches")


def ab(size: str, work: Path, arms: dict[str, dict], repeats: int, out: Path, extra_layouts: tuple[str, ...] = (),
       about: dict | None = None, block_size: int | None = None, lm_head: str = "int8") -> None:  # fmt: skip
    """A/B of two arms, each a child process per reading (an environment setting is read when a session is created,
    and a process's first session decodes faster than later ones): `arms` maps "without"/"with" to {"env": the
    variables to set (None: unset), "builder": the build's options}. The arms take turns, `repeats` times each, and
    neither always goes first. Per layout (resident, branches and `extra_layouts`, e.g. plain) and adapter: each arm's
    median decode tok/s and their ratio, and whether the greedy tokens are the same; the first child of each arm
    also profiles every layout's kernels, with no adapter and with adapter a. `block_size` / `lm_head`: the build
    to measure, as for `build`."""
    import os
    import statistics
    import subprocess
    import sys

    layouts = (*AB_LAYOUTS, *(x for x in extra_layouts if x not in AB_LAYOUTS))
    runs_of: dict[str, list[dict]] = {arm: [] for arm in arms}
    order = list(arms)
    for i in range(repeats):
        for arm in order if i % 2 == 0 else order[::-1]:
            env = dict(os.environ)
            for key, value in arms[arm].get("env", {}).items():
                env.pop(key, None)
                if value is not None:
                    env[key] = value
            child_out = work / f"ab-{arm}-{i}.json"
            cmd = [sys.executable, "-m", "bench.cuda_lora", "measure-one", "--size", size, "--work", str(work),
                   "--layouts", ",".join(layouts), "--lm-head", lm_head, "--out", str(child_out)]  # fmt: skip
            cmd += ["--block-size", str(block_size)] if block_size else []
            for key, value in arms[arm].get("builder", {}).items():
                cmd += ["--builder-option", f"{key}={value}"]
            if i == 0:
                cmd.append("--with-profile")
            if subprocess.run(cmd, env=env).returncode != 0:
                raise SystemExit(f"ab: the {arm} child {i} failed (its error is above): {' '.join(cmd)}")
            runs_of[arm].append(json.loads(child_out.read_text()))
            speeds = {k: {a: r["decode_tok_s"] for a, r in v.items()} for k, v in runs_of[arm][-1]["ort"].items()}
            print(arm, i, speeds, flush=True)
    medians = {
        arm: {
            layout: {
                a or "base": statistics.median(run["ort"][layout][a or "base"]["decode_tok_s"] for run in runs)
                for a in adapter_names(layout)
            }
            for layout in layouts
        }
        for arm, runs in runs_of.items()
    }
    first = runs_of[order[0]][0]["ort"]
    result = {
        "date": str(date.today()),
        "size": size,
        **(about or {}),
        "arms": arms,
        "repeats": repeats,
        "decode_tok_s": medians,
        "with_over_without": {
            layout: {a: round(medians["with"][layout][a] / medians["without"][layout][a], 3) for a in speeds}
            for layout, speeds in medians["without"].items()
        },
        "adapter_cost_vs_best_no_adapter": {arm: adapter_cost(m) for arm, m in medians.items()},
        # per arm: every reading gives the first reading's tokens; across arms: the same tokens as the first arm
        "same_greedy_tokens_within_arm": {  # per layout, so a reading that parts names where
            arm: {
                layout: all(
                    run["ort"][layout][a]["tokens"] == runs[0]["ort"][layout][a]["tokens"]
                    for run in runs
                    for a in medians[arm][layout]
                )
                for layout in layouts
            }
            for arm, runs in runs_of.items()
        },
        "same_greedy_tokens": {
            layout: {
                a: all(runs[0]["ort"][layout][a]["tokens"] == first[layout][a]["tokens"] for runs in runs_of.values())
                for a in medians[order[0]][layout]
            }
            for layout in layouts
        },
        "kernels": {arm: runs[0].get("kernels") for arm, runs in runs_of.items()},
        "profile": {arm: runs[0].get("profile") for arm, runs in runs_of.items()},
        "profile_adapter": {arm: runs[0].get("profile_adapter") for arm, runs in runs_of.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("profile")}, indent=2))


def summarize(size: str, measured: dict) -> dict:
    ort = measured["ort"]
    summary: dict = {"decode_tok_s": {}, "ttft_ms": {}, "adapter_cost": {}}
    for layout, runs in ort.items():
        summary["decode_tok_s"][layout] = {k: v["decode_tok_s"] for k, v in runs.items() if isinstance(v, dict)}
        summary["ttft_ms"][layout] = {k: v["ttft_ms"] for k, v in runs.items() if isinstance(v, dict)}
        if "a" in runs:
            adapter = min(runs[n]["decode_tok_s"] for n in ADAPTERS)
            summary["adapter_cost"][layout] = round(1 - adapter / runs["base"]["decode_tok_s"], 3)
    bound = measured["bandwidth_gbs"] * 1e9 / measured["bytes_per_step"]
    summary["bound_tok_s"] = round(bound, 1)
    summary["share_of_bound"] = {layout: round(ort[layout]["base"]["decode_tok_s"] / bound, 3) for layout in ort}
    if measured["torch_eager_bf16"]:
        torch_base = measured["torch_eager_bf16"]["base"]["decode_tok_s"]
        summary["torch_eager_bf16"] = measured["torch_eager_bf16"]
        summary["ort_over_torch"] = {k: round(ort[k]["base"]["decode_tok_s"] / torch_base, 2) for k in ort}
    branches, resident = ort.get("branches", {}), ort.get("resident", {})
    summary["same_greedy_tokens"] = {
        name: branches[name]["tokens"] == resident[name]["tokens"]
        for name in branches
        if isinstance(branches[name], dict)
    }
    summary["adapters_change_tokens"] = all(
        resident[n]["tokens"] != resident["base"]["tokens"] for n in ADAPTERS if n in resident
    )
    summary["switching_gives_same_tokens"] = {
        layout: runs["switching_gives_same_tokens"]
        for layout, runs in ort.items()
        if "switching_gives_same_tokens" in runs
    }
    summary["bytes_per_step_gb"] = round(measured["bytes_per_step"] / 1e9, 3)
    summary["bandwidth_gbs"] = measured["bandwidth_gbs"]
    summary["prompt_tokens"] = measured["prompt_tokens"]
    return summary


def report(work: Path, out: Path) -> None:
    sizes = {}
    for size in ("default", "phi35"):
        path = work / size / "measured.json"
        if path.exists():
            sizes[size] = summarize(size, json.loads(path.read_text()))
    if not sizes:
        raise SystemExit(f"{work}: nothing measured yet (run `measure` first)")
    import torch

    result = {
        "date": str(date.today()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "new_tokens": NEW_TOKENS,
        "rounds": ROUNDS,
        "rank": RANK,
        # the keys: cost of the active adapter per model (the fix: resident), share of bound at 3.8B
        "adapter_cost": {size: s["adapter_cost"] for size, s in sizes.items()},
        "share_of_bound": sizes.get("phi35", {}).get("share_of_bound"),
        "sizes": sizes,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "sizes"}, indent=2))


GOAL_TOK_S, GOAL_OVER_TORCH = 400.0, 8.0  # the any-model issue: the multi-LoRA graph at the 3.8B shape, no adapter


def goals_report(work: Path, size: str, block_size: int | None, lm_head: str, out: Path) -> None:
    """The any-model issue's decode goals from one `measure` of one build: the fused layout (the pipeline's model
    with optimize.lora_layout=fused) against the plain model and torch eager, all measured in the same process."""
    import torch

    root = size_root(work, size, block_size, lm_head)
    path = root / "measured.json"
    if not path.exists():
        raise SystemExit(f"{path}: not measured yet (run `measure` with the same --size/--block-size/--lm-head)")
    measured = json.loads(path.read_text())
    s = summarize(size, measured)
    if "fused" not in s["decode_tok_s"] or "torch_eager_bf16" not in s:
        raise SystemExit(f"{path}: needs the fused layout and torch eager (build --layouts plain,fused; no --no-torch)")
    fused = s["decode_tok_s"]["fused"]
    fused_runs = measured["ort"]["fused"]
    result = {
        "date": str(date.today()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "model": f"{model_conf(size, None)['name']} (random weights, int4 block {measured['block_size']}, "
        f"lm_head {measured['lm_head']}, CUDA graphs, rank-{RANK} adapters)",
        "decode_tok_s": {
            "fused_base": fused["base"],
            "fused_adapter": {n: fused[n] for n in ADAPTERS},
            "plain": s["decode_tok_s"]["plain"]["base"],
            "torch_base": s["torch_eager_bf16"]["base"]["decode_tok_s"],
            "torch_adapter": s["torch_eager_bf16"]["a"]["decode_tok_s"],
        },
        "ttft_ms": {
            "fused_base": s["ttft_ms"]["fused"]["base"],
            "plain": s["ttft_ms"]["plain"]["base"],
            "torch_base": s["torch_eager_bf16"]["base"]["ttft_ms"],
        },
        "fused_over_plain": round(fused["base"] / s["decode_tok_s"]["plain"]["base"], 3),
        "fused_over_torch": s["ort_over_torch"]["fused"],
        "adapter_cost": s["adapter_cost"]["fused"],
        "share_of_bound": s["share_of_bound"],
        "bound_tok_s": s["bound_tok_s"],
        "greedy_tokens_same_every_round": all(
            v["same_tokens_every_round"] for v in fused_runs.values() if isinstance(v, dict)
        ),
        "switching_gives_same_tokens": fused_runs["switching_gives_same_tokens"],
        "goals": {
            f"fused_base >= {GOAL_TOK_S:g} tok/s": fused["base"] >= GOAL_TOK_S,
            f"fused_base >= {GOAL_OVER_TORCH:g}x torch eager": s["ort_over_torch"]["fused"] >= GOAL_OVER_TORCH,
        },
        "measured": measured,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "measured"}, indent=2))


def scale_report(work: Path, out: Path) -> None:
    """bench/results/<date>-cuda-scale.json: at the 3.8B shape, decode speed and share of the bandwidth bound per
    int4 block size (every `phi35*` folder measured), no adapter and with one."""
    import torch

    blocks = {}
    for path in sorted(work.glob("phi35*/measured.json")):
        measured = json.loads(path.read_text())
        s = summarize("phi35", measured)
        block = measured.get("block_size") or json.loads((path.parent / "state.json").read_text()).get("block_size", 32)
        profile_file = path.parent / "profile.json"
        head = measured.get("lm_head", "int8")
        blocks[str(block) if head == "int8" else f"{block}-head-{head}"] = {
            "share_of_bound": s["share_of_bound"],
            "decode_tok_s": s["decode_tok_s"],
            "ttft_ms": s["ttft_ms"],
            "adapter_cost": s["adapter_cost"],
            "bound_tok_s": s["bound_tok_s"],
            "bytes_per_step_gb": s["bytes_per_step_gb"],
            "bandwidth_gbs": s["bandwidth_gbs"],
            **({"profile": json.loads(profile_file.read_text())} if profile_file.exists() else {}),
        }
    if not blocks:
        raise SystemExit(f"{work}: no phi35 size measured yet (run `measure --size phi35` first)")
    int8_head = {b: v for b, v in blocks.items() if "-head-" not in b}  # the sweep: the default lm_head
    best = max(int8_head, key=lambda b: blocks[b]["share_of_bound"]["plain"])
    result = {
        "date": str(date.today()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "model": "phi35_mini_shape (random weights, int4, CUDA graphs)",
        "new_tokens": NEW_TOKENS,
        "rounds": ROUNDS,
        # the key: the best block's share, no adapter, for the plain model and for the pipeline's layout
        "share_of_bound": {"block_size": int(best), **blocks[best]["share_of_bound"]},
        "fastest_block": max(int8_head, key=lambda b: blocks[b]["decode_tok_s"]["plain"]["base"]),
        "goal_share_of_bound": 0.30,
        "blocks": blocks,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "step",
        choices=(
            "build",
            "measure",
            "profile",
            "report",
            "scale-report",
            "env-ab",
            "build-ab",
            "measure-one",
            "kernel-check",
            "layouts",
            "goals",
        ),
    )
    parser.add_argument("--size", choices=("default", "phi35"), default="default")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cuda_lora"))
    parser.add_argument("--tokenizer-dir", default=".gpu/tokenizer", help="borrowed tokenizer folder ('' for the GGUF)")
    parser.add_argument("--block-size", type=int, default=None, help="int4 block (default: the config's group size)")
    parser.add_argument("--layouts", default=None, help="build: variants to build (default "
                        "branches_if,plain,branches,resident); env-ab: layouts to measure besides resident,branches")  # fmt: skip
    parser.add_argument("--no-torch", action="store_true", help="measure: skip torch eager")
    parser.add_argument("--lm-head", default="int8", help="build/measure: optimize.lm_head (int8, int4, fp32)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<date>-cuda-lora.json "
                        "(scale-report: <date>-cuda-scale.json)")  # fmt: skip
    parser.add_argument("--env", default="CUBLAS_WORKSPACE_CONFIG=:0:0", help="env-ab: the NAME=VALUE to compare")
    parser.add_argument("--repeats", type=int, default=3, help="env-ab: processes per arm")
    parser.add_argument("--with-profile", action="store_true", help="measure-one: also profile each layout's kernels")
    parser.add_argument("--builder-option", action="append", metavar="KEY=VALUE", help="build/measure-one: a builder "
                        "option, with its own folder (repeatable); build-ab: the 'with' arm's build")  # fmt: skip
    args = parser.parse_args()
    layouts = (args.layouts or "branches_if,plain,branches,resident").split(",")
    extra_layouts = tuple(layouts) if args.layouts else ()  # env-ab/build-ab: only the layouts asked for
    builder_opts = parse_settings(args.builder_option, "--builder-option")
    if args.step == "build-ab" and not builder_opts:
        parser.error("build-ab: give the 'with' arm's build with --builder-option KEY=VALUE")
    if args.step == "measure-one" and args.out is None:
        parser.error("measure-one: --out is required (the child's JSON for env-ab)")
    if args.step == "build":
        build(args.size, args.work, args.tokenizer_dir or None, args.block_size, tuple(layouts), args.lm_head,
              builder_opts)  # fmt: skip
    elif args.step == "measure":
        measure(args.size, args.work, args.block_size, not args.no_torch, args.lm_head)
    elif args.step == "profile":
        profile_step(args.size, args.work, args.block_size)
    elif args.step == "report":
        report(args.work, args.out or Path(f"bench/results/{date.today()}-cuda-lora.json"))
    elif args.step == "env-ab":
        env_setting = parse_settings([args.env], "--env")
        arms = {"without": {"env": dict.fromkeys(env_setting)}, "with": {"env": env_setting}}
        ab(args.size, args.work, arms, args.repeats,
           args.out or Path(f"bench/results/{date.today()}-cuda-lora-env-ab-{args.size}.json"), extra_layouts,
           {"setting": args.env, "block_size": args.block_size, "lm_head": args.lm_head}, args.block_size,
           args.lm_head)  # fmt: skip
    elif args.step == "build-ab":
        arms = {"without": {"builder": {}}, "with": {"builder": builder_opts}}
        ab(args.size, args.work, arms, args.repeats,
           args.out or Path(f"bench/results/{date.today()}-cuda-lora-build-ab-{args.size}.json"),
           extra_layouts)  # fmt: skip
    elif args.step == "measure-one":
        measure_layouts(args.size, args.work, layouts, args.out, args.with_profile, builder_opts, args.block_size,
                        args.lm_head)  # fmt: skip
    elif args.step == "layouts":
        name = f"{date.today()}-cuda-lora-layouts-{size_root(Path(), args.size, args.block_size, args.lm_head)}.json"
        layouts_by_process(args.size, args.work, layouts, args.repeats, args.out or BENCH_RESULTS / name,
                           args.block_size, args.lm_head)  # fmt: skip
    elif args.step == "kernel-check":
        kernel_check(args.out or args.work / "kernel-check.json")
    elif args.step == "goals":
        name = f"{date.today()}-cuda-{args.size}-goals.json"
        goals_report(args.work, args.size, args.block_size, args.lm_head, args.out or BENCH_RESULTS / name)
    else:
        scale_report(args.work, args.out or Path(f"bench/results/{date.today()}-cuda-scale.json"))


if __name__ == "__main__":
    main()
