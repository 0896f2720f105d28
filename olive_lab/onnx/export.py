"""One ORT GenAI int4 model with LoRA slots, plus one .onnx_adapter per task (multi-LoRA), checked against torch.

    <quantized HF folder> + <PEFT folders>  ->  <out>/model/ (genai_config.json, model.onnx(+.data), tokenizer)
                                                + <out>/adapters/<task>.onnx_adapter

The base graph comes from the onnxruntime-genai model builder (olive_lab.onnx.build); LoRA branches and adapter
files are made by olive_lab.onnx.lora rather than by Olive's ExtractAdapters: the builder's own adapter mode
unpacks the QKV projection and bakes one adapter in, while a branch per packed projection keeps the base graph
byte-for-byte the plain model's.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from olive_lab.errors import StageError
from olive_lab.files import atomic_dir, dir_size_mb, remove_outputs
from olive_lab.int4_grid import META_FILE, read_grid
from olive_lab.memory import require_fits
from olive_lab.onnx.build import export_model, set_cuda_graph
from olive_lab.onnx.grid import int8_matmuls, write_torch_grid
from olive_lab.onnx.lora import (
    add_lora_inputs,
    fuse_branches,
    fuse_resident,
    fuse_swiglu,
    make_resident,
    peft_to_inputs,
    read_adapter,
    resolve_layout,
    write_adapter,
)
from olive_lab.onnx.rope import capturable_longrope
from olive_lab.tokenizer import canonicalize

log = logging.getLogger(__name__)


def check_inputs(hf_dir: Path, adapters: dict[str, Path]) -> dict:
    """Fail in one line before any work when an input is missing; return the model's config.json."""
    config_file = hf_dir / "config.json"
    if not config_file.exists():
        raise StageError(f"{config_file}: not found (run `dvc repro quantize` first)")
    if not list(hf_dir.glob("*.safetensors")):
        raise StageError(f"{hf_dir}: no *.safetensors weights")
    for name, folder in adapters.items():
        if not (folder / "adapter_config.json").exists():
            raise StageError(
                f"{folder / 'adapter_config.json'}: not found (adapter '{name}'; run `dvc repro finetune`)"
            )
    return json.loads(config_file.read_text())


def control_flow_nodes(model_path: Path) -> list[str]:
    """Names of the If/Loop/Scan nodes in the main graph (the weights stay on disk)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [f"{n.op_type} {n.name}" for n in graph.node if n.op_type in ("If", "Loop", "Scan")]


def weight_names(hf_dir: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(str(f), "np") as handle:
            names |= set(handle.keys())
    return names


def build_onnx(
    hf_dir: Path | str,
    out_dir: Path | str,
    adapters: dict[str, Path],
    *,
    precision: str = "int4",
    block_size: int = 32,
    accuracy_level: int = 4,
    execution_provider: str = "cpu",
    lm_head: str = "int8",
    lora_layout: str = "branches",
    cuda_graph: bool = False,
    builder_extra: dict | None = None,
    adapter_dtype: str = "float16",
) -> dict:
    """Build `out_dir`/model (ORT GenAI) and `out_dir`/adapters/<name>.onnx_adapter for each PEFT folder.

    With no adapters the model has no LoRA inputs (the plain model). Writes atomically; returns size and timing.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    adapters = {name: Path(path) for name, path in adapters.items()}
    config = check_inputs(hf_dir, adapters)
    if adapter_dtype == "int8" and (lora_layout != "fused" or execution_provider == "cuda"):
        raise StageError(
            f"params.yaml: optimize.adapter_dtype=int8 is for optimize.lora_layout=fused on the CPU (LoraBranchQ8), "
            f"not lora_layout={lora_layout} on {execution_provider}: set optimize.adapter_dtype=float16"
        )
    if execution_provider == "cuda" and cuda_graph and lora_layout == "switch" and adapters:
        raise StageError(
            "params.yaml: optimize.lora_layout=switch adds an If node, which ORT cannot capture in a CUDA graph: "
            "set optimize.cuda_graph=false or optimize.lora_layout=branches"
        )
    int8_nodes = int8_matmuls(hf_dir, weight_names(hf_dir)) if precision == "int4" else []
    start = time.time()
    with atomic_dir(out_dir) as tmp:
        model_dir, adapter_dir = tmp / "model", tmp / "adapters"
        adapter_dir.mkdir()
        export_model(
            hf_dir,
            model_dir,
            precision=precision,
            block_size=block_size,
            accuracy_level=accuracy_level,
            execution_provider=execution_provider,
            lm_head=lm_head,
            extra_options=builder_extra,
            int8_nodes=int8_nodes,
        )
        if precision == "int4" and (rewritten := write_torch_grid(model_dir / "model.onnx", hf_dir)):
            log.info("int4/int8 weights: the quantize stage's own grid in %d MatMuls", rewritten)
        canonicalize(model_dir)  # the builder re-saves the tokenizer with transformers: keep the canonical form
        original = config.get("original_max_position_embeddings")
        # Phi-3's LongRoPE picks its cos/sin cache with an If, which ORT cannot capture: a Where does the same
        if (
            execution_provider == "cuda"
            and cuda_graph
            and original
            and capturable_longrope(model_dir / "model.onnx", int(original))
        ):
            log.info("LongRoPE cache switch: If -> Where on seqlens_k (CUDA graphs stay on)")
        if execution_provider == "cuda" and cuda_graph and (flow := control_flow_nodes(model_dir / "model.onnx")):
            log.warning("CUDA graph off: the model has control flow (%s), which ORT cannot capture", flow[0])
            cuda_graph = False
        if execution_provider == "cuda":
            set_cuda_graph(model_dir, cuda_graph)
        slots = add_lora_inputs(model_dir / "model.onnx", config, lora_layout, weight_names(hf_dir)) if adapters else []
        # layout "fused": on CUDA the adapters are resident (ORT GenAI re-copies adapter files to the device at every
        # step), on the CPU they stay files, as float16 with packed B matrices
        files_fused = lora_layout == "fused" and execution_provider != "cuda"
        values = {
            name: peft_to_inputs(
                folder, slots, switch=lora_layout == "switch", packed=files_fused, int8=adapter_dtype == "int8"
            )  # fmt: skip
            for name, folder in adapters.items()
        }
        if lora_layout in ("resident", "fused") and not files_fused and adapters:
            values = make_resident(model_dir / "model.onnx", slots, values)
        if lora_layout == "fused" and adapters:
            import tempfile

            from olive_lab.kernels import attach, library_for

            if files_fused:
                fused = fuse_branches(model_dir / "model.onnx", slots, int8=adapter_dtype == "int8")
                log.info(
                    "fused LoRA: %d slots as olive_lab.%s",
                    fused,
                    "LoraBranchQ8" if adapter_dtype == "int8" else "LoraBranch",
                )
            else:
                log.info("fused LoRA: %d slots as olive_lab.LoraResident", fuse_resident(model_dir / "model.onnx"))
                swiglu = fuse_swiglu(model_dir / "model.onnx")
                if swiglu:
                    log.info("fused LoRA: %d gate/up slots apply the MLP's SwiGLU themselves", swiglu)
            with tempfile.TemporaryDirectory(prefix="olive-lab-kernels-") as build_dir:
                attach(model_dir, library_for(execution_provider, Path(build_dir)))
        for name, folder in adapters.items():
            write_adapter(values[name], adapter_dir / f"{name}.onnx_adapter")
            log.info("adapter %s -> %s", folder, adapter_dir / f"{name}.onnx_adapter")
    return {
        "model_mb": dir_size_mb(out_dir / "model"),
        "adapter_mb": {
            name: round((out_dir / "adapters" / f"{name}.onnx_adapter").stat().st_size / 1e6, 2) for name in adapters
        },
        "lora_slots": len(slots),
        **({"cuda_graph": cuda_graph} if execution_provider == "cuda" else {}),
        "build_seconds": round(time.time() - start, 1),
    }


def torch_agreement(
    onnx_dir: Path,
    hf_dir: Path,
    adapters: dict[str, Path],
    rows: dict[str, list[dict]],
    max_len: int,
    device: str = "cpu",
) -> dict:
    """Per task: ONNX (base + .onnx_adapter) vs torch (base + PEFT) on that task's rows; plus the base alone."""
    from peft import PeftModel

    from olive_lab.lm import load_model, load_tokenizer
    from olive_lab.onnx.check import OnnxLM, agreement, pooled

    tokenizer = load_tokenizer(hf_dir)
    onnx_lm = OnnxLM(onnx_dir / "model")
    base = load_model(hf_dir, device)
    result = {"base": pooled({t: agreement(onnx_lm, base, tokenizer, r, max_len) for t, r in rows.items()})}
    log.info("base: %s", result["base"])
    model = None
    for name, folder in adapters.items():
        if model is None:
            model = PeftModel.from_pretrained(base, str(folder), adapter_name=name)
        else:
            model.load_adapter(str(folder), adapter_name=name)
        model.set_adapter(name)
        model.eval()
        weights = read_adapter(onnx_dir / "adapters" / f"{name}.onnx_adapter")
        result[name] = agreement(onnx_lm, model, tokenizer, rows[name], max_len, adapter=weights)
        log.info("%s: %s", name, result[name])
    return result


def grid_block_size(block_size: int, hf_dir: Path) -> int:
    """The int4 block size, warned about when it differs from the grid the quantize stage used."""
    meta = read_grid(hf_dir)  # written by the quantize stage: the grid its weights sit on ({} without one)
    if meta and (meta.get("group_size") != block_size or meta.get("symmetric")):
        log.warning(
            "%s: weights sit on a %s int4 grid of group %s; exporting asymmetric blocks of %d is not exact",
            hf_dir / META_FILE,
            "symmetric" if meta.get("symmetric") else "asymmetric",
            meta.get("group_size"),
            block_size,
        )
    return block_size


def export_and_check(
    hf_dir: Path,
    adapters: dict[str, Path],
    out: Path,
    rows: dict[str, list[dict]],
    opt: dict,
    execution_provider: str,
    max_len: int,
    builder_extra: dict | None = None,
    device: str = "cpu",
) -> tuple[dict, dict]:
    """build_onnx with the `optimize` params, then the int4 grid check and the agreement with torch on `rows`.

    Returns (metrics, perf): perf holds the wall-clock seconds, which nothing downstream depends on.
    """
    check_inputs(hf_dir, adapters)
    layout = resolve_layout(opt.get("lora_layout", "branches"), execution_provider)
    require_fits(hf_dir, "optimize", "cpu")  # the builder works on the host whatever the target
    info = build_onnx(
        hf_dir,
        out,
        adapters,
        precision=opt["precision"],
        block_size=grid_block_size(int(opt["block_size"]), hf_dir),
        accuracy_level=int(opt["accuracy_level"]),
        execution_provider=execution_provider,
        lm_head=opt.get("lm_head", "int8"),
        lora_layout=layout,
        cuda_graph=bool(opt.get("cuda_graph", False)),
        builder_extra=builder_extra,
        adapter_dtype=opt.get("adapter_dtype", "float16"),
    )
    perf = {"build_seconds": info.pop("build_seconds")}
    log.info("built %s in %.0f s (%.1f MB)", out, perf["build_seconds"], info["model_mb"])
    metrics = {
        **info,
        "precision": opt["precision"],
        "lm_head": opt.get("lm_head", "int8"),
        "lora_layout": layout,
    }
    start = time.time()
    try:  # a model that fails a check is removed: nothing half-right is left for DVC to cache
        metrics.update(check_export(out, hf_dir, adapters, rows, max_len, opt["precision"], device))
    except BaseException:
        remove_outputs(out)
        raise
    perf["check_seconds"] = round(time.time() - start, 1)
    return metrics, perf


def check_export(out: Path, hf_dir: Path, adapters: dict[str, Path], rows: dict[str, list[dict]], max_len: int,
                 precision: str, device: str = "cpu") -> dict:  # fmt: skip
    """The built model against its source: ORT GenAI's tokenizer vs transformers' (a mismatch stops here), the
    int4 weights vs the quantize stage's grid, and ONNX vs torch logits on every row (with each adapter)."""
    from olive_lab.lm import load_tokenizer, prompt_text
    from olive_lab.onnx.check import int4_grid_error, require_agreement
    from olive_lab.tokenizer import MULTILINGUAL_SAMPLE, roundtrip_mismatches

    tok = load_tokenizer(hf_dir)
    texts = [
        text
        for task_rows in rows.values()
        for r in task_rows
        for text in (prompt_text(tok, r["prompt"]), r["response"])
    ]
    texts += MULTILINGUAL_SAMPLE
    problems = roundtrip_mismatches(out / "model", hf_dir, texts)
    if problems:
        raise StageError(
            f"{out / 'model'}: ORT GenAI's tokenizer disagrees with transformers on {len(problems)} of {len(texts)} "
            f"texts; first: {problems[0]}"
        )
    log.info("tokenizer: ORT GenAI equals transformers on %d texts (ids, decode, stream)", len(texts))
    checks: dict = {"tokenizer_texts_checked": len(texts)}
    if precision == "int4":
        checks["int4_grid_error"] = int4_grid_error(out / "model" / "model.onnx", hf_dir)
        log.info("int4 weights vs %s: %s", hf_dir, checks["int4_grid_error"])
    checks["agreement"] = torch_agreement(out, hf_dir, adapters, rows, max_len, device)
    require_agreement(checks, out)  # thresholds and why: olive_lab/onnx/check.py
    return checks
