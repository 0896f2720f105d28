"""Stage finetune: one LoRA adapter for a task on the quantized model.

    python -m stages.finetune <task>

Outputs: models/adapters/<task>/ (PEFT folder), metrics/finetune/<task>.json, plots/finetune/<task>.csv (loss curve).
"""

from __future__ import annotations

import argparse

from olive_lab import distributed, paths
from olive_lab.cli import entry_point
from olive_lab.device import check_device
from olive_lab.distributed import check_gpus
from olive_lab.errors import StageError
from olive_lab.files import read_metrics, write_csv, write_json
from olive_lab.lora import finetune
from olive_lab.params import check_params, load_params, require, task_settings

# finetune.<key>, and finetune.tasks.<task>.<key> where a task overrides it; checked before anything is read.
SETTINGS = {
    "r": "int>0",
    "alpha": "number>0",
    "dropout": "number[0,1)",
    "learning_rate": "number>0",
    "max_steps": "int>0",
    "batch_size": "int>0",
    "max_seq_len": "int>0",
    "seed": "int>=0",
    "eval_batch_size": "int>0",
}


@entry_point
def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.finetune")
    parser.add_argument("task")
    task = parser.parse_args(argv).task
    params = load_params(paths.PARAMS_FILE)
    settings = task_settings(params, task)
    check_params(require(params, "finetune"), SETTINGS, "finetune")
    override = (params["finetune"].get("tasks") or {}).get(task) or {}
    check_params(override, SETTINGS, f"finetune.tasks.{task}", present_only=True)
    check_params(params, {"evaluate.max_seq_len": "int>0"})
    settings["eval_max_seq_len"] = require(params, "evaluate.max_seq_len")
    settings["target_modules"] = require(params, "model.lora_targets")  # model-specific: conf/model/<name>.yaml
    device = check_device(require(params, "device.name"))
    check_params(params, {"device.gpus": "int>0"})
    gpus = int(require(params, "device.gpus"))
    if gpus > 1 and not distributed.launched():  # one torchrun worker per GPU, each running this stage
        check_gpus(gpus, device)
        status = distributed.relaunch("stages.finetune", argv, gpus)
        if status:
            raise StageError(f"finetune {task}: the {gpus} torchrun workers failed (exit {status}); see above")
        return
    # The quantize stage measured the quantized model on the same rows with the same max_seq_len.
    base_loss = read_metrics(paths.QUANTIZE_METRICS).get("task_eval_loss", {}).get("quantized", {}).get(task)
    metrics, curve, seconds = finetune(
        task, settings, device, paths.QUANTIZED, paths.SPLITS, paths.adapter_dir(task), base_loss
    )
    try:
        if not distributed.is_main():
            return
        write_json(paths.finetune_metrics(task), metrics)
        samples = settings["max_steps"] * settings["batch_size"]
        perf = {"seconds": seconds, "gpus": gpus, "samples_per_s": round(samples / max(seconds, 1e-9), 2)}
        write_json(paths.perf_file(f"finetune_{task}"), perf)
        write_csv(paths.finetune_plot(task), ("step", "loss"), curve)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    run()
