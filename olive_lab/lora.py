"""LoRA fine-tuning on the quantized model: peft and a plain torch training loop.

Each example is formatted with the model's own chat template and only the response tokens are trained on.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

from olive_lab import distributed
from olive_lab.errors import StageError
from olive_lab.files import atomic_dir, read_jsonl
from olive_lab.lm import batches, encode_example, eval_loss, load_model, load_tokenizer, token_nll
from olive_lab.memory import require_fits

log = logging.getLogger(__name__)


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
    """AdamW with linear warmup and decay for s['max_steps'] steps; returns the (step, loss) curve.

    Under torchrun (olive_lab.distributed) each rank computes its share of the same global batch and the update is
    the single-process one: loss over the global token count, gradients summed over the ranks.
    """
    import torch
    from tqdm import tqdm

    shard, world = distributed.rank(), distributed.world_size()
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
    bar = tqdm(range(s["max_steps"]), desc="finetune", unit="step", disable=not distributed.is_main())
    for step in bar:
        if len(order) < s["batch_size"]:
            order += rng.sample(range(len(examples)), len(examples))  # epoch after epoch, reshuffled
        chunk, order = order[: s["batch_size"]], order[s["batch_size"] :]
        mine = chunk[shard::world]  # every rank drew the same chunk: each takes its share
        # Sorting by length inside the batch changes nothing in the loss but keeps padding small.
        batch = next(
            batches(sorted((examples[i] for i in mine), key=lambda e: len(e[0])), len(mine), tokenizer.pad_token_id)
        )
        nll, count = token_nll(model, batch, grad=True)
        totals = distributed.all_reduce_sum(torch.tensor([float(count), nll.item()], device=nll.device))
        loss = nll / totals[0]  # this rank's part of the mean over the global batch's tokens
        loss.backward()
        if world > 1:
            distributed.all_reduce_sum([p.grad for p in params])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        mean = (totals[1] / totals[0]).item()
        curve.append((step + 1, round(mean, 4)))
        bar.set_postfix(loss=f"{mean:.3f}")
    model.eval()
    return curve


def finetune(task: str, s: dict, device: str, base: Path, splits: Path, out: Path, base_loss: float | None = None):
    """Train one adapter into `out`; return its metrics, the (step, loss) curve and the training seconds.
    `base_loss`: the quantized model's eval loss on this task when already measured (the quantize stage's
    metrics), else measured here."""
    import torch

    check_targets(base, list(s["target_modules"]))  # config problems first, before any data or weights are read
    world = distributed.world_size()
    if world > s["batch_size"]:
        raise StageError(
            f"params.yaml: finetune.batch_size {s['batch_size']} is smaller than device.gpus {world}: "
            "each GPU needs at least one example per step"
        )
    require_fits(base, "finetune", device)
    train_rows = read_jsonl(splits / task / "train.jsonl")
    eval_rows = read_jsonl(splits / task / "eval.jsonl")
    if world > 1:
        distributed.init(device)
    torch.manual_seed(s["seed"])
    tokenizer = load_tokenizer(base)
    model = load_model(base, device)
    metrics: dict = {"task": task, "train_rows": len(train_rows), "eval_rows": len(eval_rows)}
    if base_loss is None and distributed.is_main():
        base_loss = eval_loss(model, tokenizer, eval_rows, s["eval_max_seq_len"], s["eval_batch_size"])
    log.info("%s: training %d steps on %d process(es)", task, s["max_steps"], world)

    start = time.time()
    model = lora_model(model, s)
    curve = train(model, tokenizer, train_rows, s)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = round(time.time() - start, 1)
    if not distributed.is_main():  # rank 0 evaluates and writes
        distributed.barrier()
        return None, curve, seconds
    metrics["base_eval_loss"] = round(base_loss, 4)
    log.info("%s: quantized base eval loss %.4f", task, metrics["base_eval_loss"])
    metrics["adapter_eval_loss"] = round(
        eval_loss(model, tokenizer, eval_rows, s["eval_max_seq_len"], s["eval_batch_size"]), 4
    )
    metrics["eval_loss_reduction"] = round(1 - metrics["adapter_eval_loss"] / metrics["base_eval_loss"], 4)
    with atomic_dir(out) as tmp:
        save_adapter(model, Path(tmp))
    distributed.barrier()
    log.info(
        "%s: adapter eval loss %.4f (%.0f%% lower) in %.0f s",
        task,
        metrics["adapter_eval_loss"],
        100 * metrics["eval_loss_reduction"],
        seconds,
    )
    return metrics, curve, seconds


def random_adapter(base: Path, out: Path, seed: int, r: int = 4, target_modules: list[str] | None = None) -> Path:
    """A PEFT LoRA adapter on `base` with random non-zero A and B (so it changes outputs): for tests and benches,
    where a trained adapter's values do not matter. Default targets: every Linear inside the decoder layers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        init_lora_weights=False,
        target_modules=target_modules or decoder_linear_names(model),
        task_type="CAUSAL_LM",
    )
    save_adapter(get_peft_model(model, config), Path(out))
    return out


def save_adapter(peft_model, folder: Path) -> None:
    """save_pretrained with a byte-stable adapter_config.json. PEFT keeps target_modules as a set and writes it in
    the set's order, which follows Python's per-process string hashing: the same adapter got a new file, so a new
    DVC hash for models/adapters and everything built from it, on every run."""
    peft_model.save_pretrained(str(folder))
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def check_targets(model_dir: Path, targets: list[str]) -> None:
    """Every configured LoRA target must name Linear layers inside the model's decoder: peft accepts a list where
    only some match (Phi-3 has no q_proj) and silently adapts fewer layers. Checked on the meta device."""
    import json

    from olive_lab.memory import meta_model

    config_file = Path(model_dir) / "config.json"
    if not config_file.exists():
        raise StageError(f"{config_file}: not found (run the stage that makes {model_dir})")
    model = meta_model(json.loads(config_file.read_text()))
    have = decoder_linear_names(model)
    missing = [t for t in targets if t not in have]
    if missing or not targets:
        raise StageError(
            f"params.yaml: model.lora_targets {missing or targets} not found among the Linear layers of "
            f"{type(model).__name__}; it has {have}"
        )


def decoder_linear_names(model) -> list[str]:
    """The leaf names of the Linear modules inside the decoder layers (q_proj, qkv_proj, gate_up_proj, ...)."""
    import torch

    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in name
        }
    )
