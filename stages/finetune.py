"""Stage finetune: one LoRA adapter per task on the quantized model (peft, a plain torch training loop).

    python -m stages.finetune <task>

Each example is formatted with the model's own chat template and only the response tokens are trained on.
Outputs: models/adapters/<task>/ (PEFT folder), metrics/finetune/<task>.json, plots/finetune/<task>.csv (loss curve).
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import time
from pathlib import Path

from stages.common import (
    SPLITS,
    atomic_dir,
    check_device,
    load_params,
    main,
    read_metrics,
    require,
    task_settings,
    write_json,
)
from stages.lm import batches, encode_example, eval_loss, load_model, load_tokenizer, read_jsonl

log = logging.getLogger("stages.finetune")

BASE = Path("models/quantized")
QUANTIZE_METRICS = Path("metrics/quantize.json")


def lora_model(model, s: dict):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=s["r"],
        lora_alpha=s["alpha"],
        lora_dropout=s["dropout"],
        target_modules=list(s["target_modules"]),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def train(model, tokenizer, rows: list[dict], s: dict) -> list[tuple[int, float]]:
    """AdamW with linear warmup and decay for s['max_steps'] steps; returns the (step, loss) curve."""
    import torch
    from tqdm import tqdm

    from stages.lm import token_nll

    rng = random.Random(s["seed"])
    examples = [encode_example(tokenizer, r["prompt"], r["response"], s["max_seq_len"]) for r in rows]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s["learning_rate"], weight_decay=0.0)
    warmup = max(1, s["max_steps"] // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min((step + 1) / warmup, max(0.0, (s["max_steps"] - step) / (s["max_steps"] - warmup)))
    )
    curve, order = [], []
    model.train()
    bar = tqdm(range(s["max_steps"]), desc="finetune", unit="step")
    for step in bar:
        if len(order) < s["batch_size"]:
            order += rng.sample(range(len(examples)), len(examples))  # epoch after epoch, reshuffled
        chunk, order = order[: s["batch_size"]], order[s["batch_size"] :]
        # Sorting by length inside the batch changes nothing in the loss but keeps padding small.
        batch = next(
            batches(
                sorted((examples[i] for i in chunk), key=lambda e: len(e[0])), s["batch_size"], tokenizer.pad_token_id
            )
        )
        nll, count = token_nll(model, batch, grad=True)
        loss = nll / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        curve.append((step + 1, round(loss.item(), 4)))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return curve


def finetune(task: str, s: dict, device: str, base: Path, splits: Path, out: Path, base_loss: float | None = None):
    """Train one adapter into `out`; return its metrics and the (step, loss) curve. `base_loss`: the quantized
    model's eval loss on this task when already measured (the quantize stage's metrics), else measured here."""
    import torch

    train_rows = read_jsonl(splits / task / "train.jsonl")
    eval_rows = read_jsonl(splits / task / "eval.jsonl")
    torch.manual_seed(s["seed"])
    tokenizer = load_tokenizer(base)
    model = load_model(base, device)
    metrics: dict = {"task": task, "train_rows": len(train_rows), "eval_rows": len(eval_rows)}
    if base_loss is None:
        base_loss = eval_loss(model, tokenizer, eval_rows, s["eval_max_seq_len"], s["eval_batch_size"])
    metrics["base_eval_loss"] = round(base_loss, 4)
    log.info("%s: quantized base eval loss %.4f; training %d steps", task, metrics["base_eval_loss"], s["max_steps"])

    start = time.time()
    model = lora_model(model, s)
    curve = train(model, tokenizer, train_rows, s)
    metrics["seconds"] = round(time.time() - start, 1)
    metrics["adapter_eval_loss"] = round(
        eval_loss(model, tokenizer, eval_rows, s["eval_max_seq_len"], s["eval_batch_size"]), 4
    )
    metrics["eval_loss_reduction"] = round(1 - metrics["adapter_eval_loss"] / metrics["base_eval_loss"], 4)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
    log.info(
        "%s: adapter eval loss %.4f (%.0f%% lower) in %.0f s",
        task,
        metrics["adapter_eval_loss"],
        100 * metrics["eval_loss_reduction"],
        metrics["seconds"],
    )
    return metrics, curve


def measured_base_loss(task: str) -> float | None:
    """The quantize stage's eval loss of the quantized model on `task` (same rows, evaluate.max_seq_len), if any."""
    return read_metrics(QUANTIZE_METRICS).get("task_eval_loss", {}).get("awq", {}).get(task)


@main
def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.finetune")
    parser.add_argument("task")
    task = parser.parse_args(argv).task
    params = load_params()
    s = task_settings(params, task)
    device = check_device(require(params, "device.name"))
    out = Path("models/adapters") / task
    s["eval_max_seq_len"] = require(params, "evaluate.max_seq_len")
    metrics, curve = finetune(task, s, device, BASE, SPLITS, out, measured_base_loss(task))
    write_json(Path("metrics/finetune") / f"{task}.json", metrics)
    plot = Path("plots/finetune") / f"{task}.csv"
    plot.parent.mkdir(parents=True, exist_ok=True)
    with open(plot, "w", newline="") as f:
        csv.writer(f).writerows([("step", "loss"), *curve])


if __name__ == "__main__":
    run()
