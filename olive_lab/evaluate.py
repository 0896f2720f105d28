"""Quality, speed and size of every variant of the model.

Variants: fp32 base, RTN int4, the quantize stage's int4 (quantize.method) alone and + each adapter (PyTorch); ONNX
int4 alone and + each adapter (ORT).
Per variant: held-out loss and perplexity per task, trip_json JSON-valid rate and field accuracy (where it matters)
on the eval split and, as `trip_json_ood`, on hand-written out-of-distribution requests (data/ood/), size on disk;
for ONNX variants also time to first token, decode tokens/s and peak RSS (measured in a fresh process).
Losses an upstream stage already measured on the same rows (same max_seq_len) are taken from its metrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from olive_lab.decode import SPEED_PROMPT, ort_run
from olive_lab.errors import StageError
from olive_lab.files import dir_size_mb, prompt_response_rows, write_csv
from olive_lab.lm import end_token, eval_loss, greedy_replies, load_model, load_tokenizer, prompt_text
from olive_lab.memory import require_fits
from olive_lab.onnx.check import onnx_loss
from olive_lab.scoring import JSON_TASK, TRIP_KEYS, json_scores, loss_entries

log = logging.getLogger(__name__)

SPEED_KEYS = ("ttft_ms", "decode_tok_s", "peak_rss_mb")  # wall-clock figures: reported apart from quality
OOD_KEY = f"{JSON_TASK}_ood"  # JSON scores on the out-of-distribution requests, next to the eval split's


def read_ood(path: Path) -> list[dict]:
    """The out-of-distribution trip_json rows: one `{"prompt": request, "response": expected trip JSON}` per line, as in
    data/trip_json.jsonl. Checked as far as scoring needs (tests/test_ood.py holds the shipped file to the data
    stage's whole trip_json schema); the first bad line raises StageError('file:line: reason')."""
    if not path.exists():
        raise StageError(f"{path}: not found (a file tracked in git: `git checkout -- {path}`)")
    rows: list[dict] = []
    seen: dict[str, int] = {}
    for where, lineno, row in prompt_response_rows(path):
        for field in ("prompt", "response"):
            if not isinstance(row[field], str) or not row[field].strip():
                raise StageError(f"{where}: field '{field}' must be a non-empty string")
        try:
            expected = json.loads(row["response"])
        except json.JSONDecodeError as exc:
            raise StageError(f"{where}: response is not valid JSON ({exc.msg} at char {exc.pos})") from None
        if not isinstance(expected, dict) or set(expected) != set(TRIP_KEYS):
            got = sorted(expected) if isinstance(expected, dict) else type(expected).__name__
            raise StageError(f"{where}: response must be a JSON object with exactly the keys {TRIP_KEYS}, got {got}")
        key = " ".join(row["prompt"].lower().split())
        if key in seen:
            raise StageError(f"{where}: duplicate prompt (same as line {seen[key]})")
        seen[key] = lineno
        rows.append(row)
    if not rows:
        raise StageError(f"{path}: no rows")
    return rows


def json_results(replies: list[str], gen_rows: Sequence[dict], ood_rows: Sequence[dict]) -> dict:
    """JSON scores of replies to gen_rows followed by ood_rows: the eval split's at the top level, the
    out-of-distribution rows' under OOD_KEY (absent without such rows)."""
    results = json_scores(replies[: len(gen_rows)], gen_rows)
    if ood_rows:
        results[OOD_KEY] = json_scores(replies[len(gen_rows) :], ood_rows)
    return results


@dataclass
class Models:
    """Where each variant lives."""

    base: Path  # fp32 Hugging Face folder
    quantized: Path  # the quantize stage's fake-quantized Hugging Face folder
    adapters: Path  # <task>/ PEFT folders
    onnx: Path  # model/ + adapters/<task>.onnx_adapter


@dataclass
class Upstream:
    """What earlier stages measured on the same eval rows ({} where a stage did not run)."""

    quantize: dict  # metrics/quantize.json
    finetune: dict[str, dict]  # task -> metrics/finetune/<task>.json
    optimize: dict  # metrics/optimize.json


def torch_variants(
    models: Models,
    upstream: Upstream,
    rows: dict,
    gen_rows: list[dict],
    ev: dict,
    device: str,
    tasks: list[str],
    ood_rows: Sequence[dict] = (),
) -> dict:
    """fp32, RTN and the quantized model (quantize.method): the quantize stage's per-task losses (same rows, same
    max_seq_len), not recomputed here. Quantized + each adapter: losses on every task (the other task's too: what an adapter costs off its task)."""
    from peft import PeftModel

    def replies(model, tok) -> list[str]:
        """Replies to the eval split's rows, then to the OOD rows: two calls, so that the split's batches (left
        padding depends on the batch) are the same as without OOD rows."""
        return [
            reply
            for part in (gen_rows, ood_rows)
            if part
            for reply in greedy_replies(model, tok, [r["prompt"] for r in part], ev["max_new_tokens"])
        ]

    done = upstream.quantize.get("task_eval_loss", {})
    # RTN is the quantize stage's control: its dense checkpoint, not kept, would have the kept one's layout and size.
    sources = {"fp32": models.base, "rtn": models.quantized, "quantized": models.quantized}
    results = {}
    for name, path in sources.items():
        if set(done.get(name, {})) != set(tasks):
            raise StageError(f"metrics/quantize.json: no per-task losses for '{name}' (run `dvc repro quantize`)")
        results[name] = {**loss_entries({t: done[name][t] for t in tasks}), "size_mb": dir_size_mb(path)}
        if name != "rtn" and gen_rows:  # RTN is the control for perplexity; its generations add no insight
            tok, model = load_tokenizer(path), load_model(path, device)
            results[name].update(json_results(replies(model, tok), gen_rows, ood_rows))
        log.info("%s: %s", name, results[name])
    tok = load_tokenizer(models.quantized)
    peft_model = None
    for task in tasks:
        folder = models.adapters / task
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(load_model(models.quantized, device), str(folder), adapter_name=task)
        else:
            peft_model.load_adapter(str(folder), adapter_name=task)
        peft_model.set_adapter(task)
        peft_model.eval()
        # the own task's loss is the finetune stage's (same rows, evaluate.max_seq_len); the other tasks' are new
        own = upstream.finetune.get(task, {})
        known = {task: own["adapter_eval_loss"]} if own.get("eval_rows") == len(rows[task]) else {}
        measured = {
            t: known[t] if t in known else round(eval_loss(peft_model, tok, r, ev["max_seq_len"]), 4)
            for t, r in rows.items()
        }
        name = f"quantized+{task}"
        results[name] = {**loss_entries(measured), "size_mb": dir_size_mb(folder)}
        if task == JSON_TASK and gen_rows:
            results[name].update(json_results(replies(peft_model, tok), gen_rows, ood_rows))
        log.info("%s: %s", name, results[name])
    return results


def optimize_losses(optimize_metrics: dict, rows: dict, tasks: list[str]) -> dict[tuple[str | None, str], float]:
    """ONNX losses the optimize stage's agreement check already measured on the whole eval split of a task:
    {(adapter or None, task): loss}. The base model covers every task, each adapter its own."""
    agree = optimize_metrics.get("agreement", {})
    found = {}
    for task in tasks:
        base = agree.get("base", {}).get("by_task", {}).get(task, {})
        own = agree.get(task, {})
        for adapter, m in ((None, base), (task, own)):
            if m.get("rows") == len(rows[task]) and "loss_onnx" in m:
                found[adapter, task] = m["loss_onnx"]
    return found


def onnx_losses(onnx_dir: Path, optimize_metrics: dict, rows: dict, max_len: int, tasks: list[str]) -> dict:
    """Held-out losses of the ONNX graph itself (onnxruntime on the same model.onnx, all positions' logits); what
    the optimize stage measured on the same rows is taken from its metrics."""
    from olive_lab.onnx.check import OnnxLM
    from olive_lab.onnx.lora import read_adapter

    known = optimize_losses(optimize_metrics, rows, tasks)
    tok, lm = None, None
    results = {}
    for adapter in [None, *tasks]:
        weights = read_adapter(onnx_dir / "adapters" / f"{adapter}.onnx_adapter") if adapter else None
        measured = {}
        for task, task_rows in rows.items():
            if (adapter, task) in known:
                measured[task] = known[adapter, task]
                continue
            if lm is None:
                tok, lm = load_tokenizer(onnx_dir / "model"), OnnxLM(onnx_dir / "model")
            measured[task] = onnx_loss(lm, tok, task_rows, max_len, weights)
        results["onnx" if adapter is None else f"onnx+{adapter}"] = loss_entries(measured)
    log.info(
        "ONNX losses: %d of %d (variant, task) pairs from the optimize stage", len(known), len(results) * len(rows)
    )
    return results


def ort_variant(onnx_dir: Path, adapter: str | None, prompts: list[str], max_new_tokens: int) -> dict:
    """Greedy replies (decoded) and speed of one ONNX variant, measured in a fresh process."""
    tok = load_tokenizer(onnx_dir / "model")
    stops = [end_token(tok), tok.eos_token_id]

    def encode(text: str) -> list[int]:
        return tok(prompt_text(tok, text), add_special_tokens=False).input_ids

    result = ort_run(onnx_dir, adapter, [encode(p) for p in prompts], encode(SPEED_PROMPT), stops, max_new_tokens)
    result["replies"] = [tok.decode(ids, skip_special_tokens=True).strip() for ids in result["replies"]]
    return result


def check_models(models: Models, tasks: list[str]) -> None:
    """Every variant's files, before any work: one line naming the first that is missing and the stage that makes it.
    (transformers would read a missing folder's name as a hub id and fail on the network instead.)"""
    needed = [
        (models.base / "config.json", "base"),
        (models.quantized / "config.json", "quantize"),
        *((models.adapters / task / "adapter_config.json", f"finetune@{task}") for task in tasks),
        (models.onnx / "model" / "genai_config.json", "optimize"),
        *((models.onnx / "adapters" / f"{task}.onnx_adapter", "optimize") for task in tasks),
    ]
    for path, stage in needed:
        if not path.exists():
            raise StageError(f"{path}: not found (run `dvc repro {stage}` first)")


def evaluate_all(
    models: Models, upstream: Upstream, rows: dict, ev: dict, device: str, tasks: list[str], ood: Sequence[dict] = ()
) -> tuple[dict, dict]:
    """Every variant. Returns (quality metrics, perf): perf holds each ONNX variant's TTFT, tok/s and peak RSS and
    the stage's seconds, apart from the quality figures that the upload stage tags the model with.
    `ood`: out-of-distribution trip_json rows, all of them scored wherever the eval split's first
    evaluate.max_prompts are (reported under OOD_KEY)."""
    check_models(models, tasks)
    gen_rows = rows[JSON_TASK][: ev["max_prompts"]] if JSON_TASK in rows else []
    ood_rows = list(ood) if gen_rows else []
    require_fits(models.base, "evaluate", device)
    start = time.time()
    results = torch_variants(models, upstream, rows, gen_rows, ev, device, tasks, ood_rows)
    log.info("torch variants done at %.0f s", time.time() - start)
    onnx = onnx_losses(models.onnx, upstream.optimize, rows, ev["max_seq_len"], tasks)
    log.info("ONNX losses done at %.0f s", time.time() - start)
    perf = {}
    model_mb = dir_size_mb(models.onnx / "model")
    for adapter in [None, *tasks]:
        name = "onnx" if adapter is None else f"onnx+{adapter}"
        prompts = [r["prompt"] for r in gen_rows + ood_rows] if adapter in (None, JSON_TASK) else []
        ort = ort_variant(models.onnx, adapter, prompts, ev["max_new_tokens"])
        replies = ort.pop("replies")
        perf[name] = {k: ort[k] for k in SPEED_KEYS}
        size = model_mb + (dir_size_mb(models.onnx / "adapters" / f"{adapter}.onnx_adapter") if adapter else 0)
        onnx[name]["size_mb"] = round(size, 2)
        if replies:
            onnx[name].update(json_results(replies, gen_rows, ood_rows))
        log.info("%s: %s %s (at %.0f s)", name, onnx[name], perf[name], time.time() - start)
    results.update(onnx)
    perf["seconds"] = round(time.time() - start, 1)
    return results, perf


def write_plots(results: dict, tasks: list[str], out: Path) -> None:
    """Per-task perplexity and size of every variant, as the CSVs dvc.yaml's plots read."""
    for task in tasks:
        rows = [(name, m[f"{task}_ppl"]) for name, m in results.items() if f"{task}_ppl" in m]
        write_csv(out / f"perplexity_{task}.csv", ("variant", "perplexity"), rows)
    write_csv(out / "size_mb.csv", ("variant", "size_mb"), [(n, m["size_mb"]) for n, m in results.items()])
