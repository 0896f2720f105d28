"""Stage optimize: the ORT GenAI int4 model with one .onnx_adapter per task (models/onnx/), checked against torch.

metrics/optimize.json: sizes, int4 grid error, and per task the agreement of ONNX with torch (quantized base +
PEFT) on the task's eval split.
"""

from __future__ import annotations

from olive_lab import paths
from olive_lab.cli import entry_point
from olive_lab.device import check_device
from olive_lab.files import read_jsonl, write_json
from olive_lab.onnx.build import LM_HEADS, PRECISIONS
from olive_lab.onnx.export import check_inputs, export_and_check
from olive_lab.onnx.lora import ADAPTER_DTYPES, PARAM_LAYOUTS
from olive_lab.params import check_params, load_params, require

# Checked before any model is read: a bad value stops the stage in one line naming the key.
PARAMS = {
    "optimize.precision": PRECISIONS,
    "optimize.block_size": "int>0",
    "optimize.accuracy_level": (0, 1, 2, 3, 4),
    "optimize.lm_head": LM_HEADS,
    "optimize.lora_layout": PARAM_LAYOUTS,
    "optimize.adapter_dtype": ADAPTER_DTYPES,
    "optimize.cuda_graph": "bool",
    "optimize.eval_rows": "int>0|null",
    "evaluate.max_seq_len": "int>0",
}


@entry_point
def run(argv: list[str]) -> None:
    params = load_params(paths.PARAMS_FILE)
    check_params(params, PARAMS)
    opt = require(params, "optimize")
    tasks = require(params, "tasks")
    device = check_device(require(params, "device.name"))
    adapters = {task: paths.adapter_dir(task) for task in tasks}
    check_inputs(paths.QUANTIZED, adapters)  # before reading anything else
    rows = {task: read_jsonl(paths.SPLITS / task / "eval.jsonl")[: opt.get("eval_rows")] for task in tasks}
    metrics, perf = export_and_check(
        paths.QUANTIZED,
        adapters,
        paths.ONNX,
        rows,
        opt,
        execution_provider=require(params, "device.execution_provider"),
        max_len=int(require(params, "evaluate.max_seq_len")),
        builder_extra=require(params, "model.builder_options"),
        device=device,  # torch's side of the agreement check
    )
    write_json(paths.OPTIMIZE_METRICS, metrics)
    write_json(paths.perf_file("optimize"), perf)


if __name__ == "__main__":
    run()
