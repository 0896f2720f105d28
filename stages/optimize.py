"""Stage optimize: one ORT GenAI int4 model with LoRA slots, plus one .onnx_adapter per task (multi-LoRA).

    models/quantized/ + models/adapters/<task>/  ->  models/onnx/model/ (genai_config.json, model.onnx(+.data),
                                                      tokenizer)  +  models/onnx/adapters/<task>.onnx_adapter

The base graph comes from the onnxruntime-genai model builder (stages/onnx_build.py); LoRA branches and adapter
files are made here (stages/onnx_lora.py) rather than by Olive's ExtractAdapters: the builder's own adapter mode
unpacks the QKV projection and bakes one adapter in, while a branch per packed projection keeps the base graph
byte-for-byte the plain model's. metrics/optimize.json: sizes, build time, int4 grid error, and per task the
agreement of ONNX with torch (quantized base + PEFT) on the task's eval split.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from stages.common import SPLITS, StageError, atomic_dir, dir_size_mb, load_params, main, require, write_json
from stages.onnx_build import export_model, set_cuda_graph
from stages.onnx_lora import add_lora_inputs, peft_to_inputs, read_adapter, write_adapter
from stages.quantize import META_FILE

log = logging.getLogger("stages.optimize")

HF_DIR = Path("models/quantized")
ADAPTERS = Path("models/adapters")
OUT = Path("models/onnx")
METRICS = Path("metrics/optimize.json")


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
) -> dict:
    """Build `out_dir`/model (ORT GenAI) and `out_dir`/adapters/<name>.onnx_adapter for each PEFT folder.

    With no adapters the model has no LoRA inputs (the plain model). Writes atomically; returns size and timing.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    adapters = {name: Path(path) for name, path in adapters.items()}
    config = check_inputs(hf_dir, adapters)
    if execution_provider == "cuda" and cuda_graph and lora_layout == "switch" and adapters:
        raise StageError(
            "params.yaml: optimize.lora_layout=switch adds an If node, which ORT cannot capture in a CUDA graph: "
            "set optimize.cuda_graph=false or optimize.lora_layout=branches"
        )
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
        )
        if execution_provider == "cuda":
            set_cuda_graph(model_dir, cuda_graph)
        slots = add_lora_inputs(model_dir / "model.onnx", config, lora_layout) if adapters else []
        for name, folder in adapters.items():
            values = peft_to_inputs(folder, slots, switch=lora_layout == "switch")
            write_adapter(values, adapter_dir / f"{name}.onnx_adapter")
            log.info("adapter %s -> %s", folder, adapter_dir / f"{name}.onnx_adapter")
    return {
        "model_mb": dir_size_mb(out_dir / "model"),
        "adapter_mb": {
            name: round((out_dir / "adapters" / f"{name}.onnx_adapter").stat().st_size / 1e6, 2) for name in adapters
        },
        "lora_slots": len(slots),
        "build_seconds": round(time.time() - start, 1),
    }


def torch_agreement(
    onnx_dir: Path, hf_dir: Path, adapters: dict[str, Path], rows: dict[str, list[dict]], max_len: int
) -> dict:
    """Per task: ONNX (base + .onnx_adapter) vs torch (base + PEFT) on that task's rows; plus the base alone."""
    from peft import PeftModel

    from stages.lm import load_model, load_tokenizer
    from stages.onnx_check import OnnxLM, agreement, pooled

    tokenizer = load_tokenizer(hf_dir)
    onnx_lm = OnnxLM(onnx_dir / "model")
    base = load_model(hf_dir)
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


def grid_settings(params: dict, hf_dir: Path) -> int:
    """The int4 block size, warned about when it differs from the grid the quantize stage used."""
    block_size = int(require(params, "optimize.block_size"))
    meta_file = hf_dir / META_FILE  # written by the quantize stage: the grid its weights sit on
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("group_size") != block_size or meta.get("symmetric"):
            log.warning(
                "%s: weights sit on a %s int4 grid of group %s; exporting asymmetric blocks of %d is not exact",
                meta_file,
                "symmetric" if meta.get("symmetric") else "asymmetric",
                meta.get("group_size"),
                block_size,
            )
    return block_size


@main
def run(argv: list[str]) -> None:
    from stages.common import check_device
    from stages.lm import read_jsonl
    from stages.onnx_check import int4_grid_error

    params = load_params()
    opt = require(params, "optimize")
    tasks = require(params, "tasks")
    check_device(require(params, "device.name"))
    adapters = {task: ADAPTERS / task for task in tasks}
    check_inputs(HF_DIR, adapters)
    rows = {task: read_jsonl(SPLITS / task / "eval.jsonl")[: opt.get("eval_rows")] for task in tasks}

    info = build_onnx(
        HF_DIR,
        OUT,
        adapters,
        precision=opt["precision"],
        block_size=grid_settings(params, HF_DIR),
        accuracy_level=int(opt["accuracy_level"]),
        execution_provider=require(params, "device.execution_provider"),
        lm_head=opt.get("lm_head", "int8"),
        lora_layout=opt.get("lora_layout", "branches"),
        cuda_graph=bool(opt.get("cuda_graph", False)),
    )
    log.info("built %s in %.0f s (%.1f MB)", OUT, info["build_seconds"], info["model_mb"])
    metrics = {
        **info,
        "precision": opt["precision"],
        "lm_head": opt.get("lm_head", "int8"),
        "lora_layout": opt.get("lora_layout", "branches"),
    }
    if opt["precision"] == "int4":
        metrics["int4_grid_error"] = int4_grid_error(OUT / "model" / "model.onnx", HF_DIR)
        log.info("int4 weights vs %s: %s", HF_DIR, metrics["int4_grid_error"])
    metrics["agreement"] = torch_agreement(OUT, HF_DIR, adapters, rows, int(require(params, "evaluate.max_seq_len")))
    write_json(METRICS, metrics)


if __name__ == "__main__":
    run()
