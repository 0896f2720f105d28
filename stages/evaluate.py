"""Stage evaluate: quality and size of every variant (metrics/eval.json, plots/eval/), ONNX speed (metrics/perf/)."""

from __future__ import annotations

from olive_lab import paths
from olive_lab.cli import entry_point
from olive_lab.device import check_device
from olive_lab.evaluate import Models, Upstream, evaluate_all, read_ood, write_plots
from olive_lab.files import read_jsonl, read_metrics, write_json
from olive_lab.params import check_params, load_params, require
from olive_lab.scoring import JSON_TASK

# Checked before any model or data is read: a bad value stops the stage in one line naming the key.
PARAMS = {
    "evaluate.max_prompts": "int>=0",
    "evaluate.max_new_tokens": "int>0",
    "evaluate.max_seq_len": "int>0",
}


@entry_point
def run(argv: list[str]) -> None:
    params = load_params(paths.PARAMS_FILE)
    check_params(params, PARAMS)
    tasks = require(params, "tasks")
    device = check_device(require(params, "device.name"))
    rows = {task: read_jsonl(paths.SPLITS / task / "eval.jsonl") for task in tasks}
    ood = read_ood(paths.TRIP_JSON_OOD) if JSON_TASK in tasks else []  # tracked in git, never trained on
    models = Models(paths.BASE_MODEL, paths.QUANTIZED, paths.ADAPTERS, paths.ONNX)
    upstream = Upstream(
        quantize=read_metrics(paths.QUANTIZE_METRICS),
        finetune={task: read_metrics(paths.finetune_metrics(task)) for task in tasks},
        optimize=read_metrics(paths.OPTIMIZE_METRICS),
    )
    results, perf = evaluate_all(models, upstream, rows, require(params, "evaluate"), device, tasks, ood)
    write_json(paths.EVAL_METRICS, results)
    write_json(paths.perf_file("evaluate"), perf)
    write_plots(results, tasks, paths.EVAL_PLOTS)


if __name__ == "__main__":
    run()
