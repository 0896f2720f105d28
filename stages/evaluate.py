"""Stage evaluate: quality, speed and size of every variant of the model.

Variants: fp32 base, RTN int4, AWQ int4, AWQ + each adapter (PyTorch); ONNX int4 alone and + each adapter (ORT).
Per variant: held-out loss and perplexity per task, trip_json JSON-valid rate and field accuracy (where it matters),
size on disk; for ONNX variants also time to first token, decode tokens/s and peak RSS (measured in a fresh process).
Outputs: metrics/eval.json, plots/eval/*.csv.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
import time
from pathlib import Path

from stages.common import (
    SPLITS,
    StageError,
    check_device,
    dir_size_mb,
    load_params,
    main,
    read_metrics,
    require,
    write_json,
)
from stages.data import score_trip_json
from stages.lm import (
    encode_example,
    end_token,
    eval_loss,
    greedy_replies,
    load_model,
    load_tokenizer,
    perplexity,
    prompt_text,
    read_jsonl,
)

log = logging.getLogger("stages.evaluate")

ONNX = Path("models/onnx")
# RTN is the quantize stage's control: its losses are in metrics/quantize.json and its dense checkpoint, not kept,
# would have AWQ's layout and size.
TORCH_MODELS = {"fp32": Path("models/base"), "rtn": Path("models/quantized"), "awq": Path("models/quantized")}
METRICS = Path("metrics/eval.json")
QUANTIZE_METRICS = Path("metrics/quantize.json")
OPTIMIZE_METRICS = Path("metrics/optimize.json")
FINETUNE_METRICS = Path("metrics/finetune")
PLOTS = Path("plots/eval")
JSON_TASK = "trip_json"
SPEED_PROMPT = (
    "I am planning a two-week trip through Portugal and Spain next spring with my partner. We like food, "
    "architecture, long walks and a little nightlife, and we would rather take trains than fly. Suggest a route "
    "that starts in Lisbon and ends in Barcelona, with how many nights to spend in each city and why."
)


def json_scores(replies: list[str], rows: list[dict]) -> dict:
    scores = [score_trip_json(reply, row["response"]) for reply, row in zip(replies, rows, strict=True)]
    return {
        "json_valid": round(sum(v for v, _ in scores) / len(scores), 4),
        "field_accuracy": round(sum(f for _, f in scores) / len(scores), 4),
    }


def loss_entries(task_losses: dict[str, float]) -> dict:
    """{task}_loss and {task}_ppl for each task's mean loss: the metric names every variant reports."""
    out = {}
    for task, loss in task_losses.items():
        out[f"{task}_loss"], out[f"{task}_ppl"] = loss, perplexity(loss)
    return out


def torch_variants(rows: dict, gen_rows: list[dict], ev: dict, device: str, tasks: list[str]) -> dict:
    """fp32, RTN and AWQ: the quantize stage's per-task losses (same rows, same max_seq_len), not recomputed here.
    AWQ + each adapter: losses on every task (the other task's too: what an adapter costs off its task)."""
    from peft import PeftModel

    done = read_metrics(QUANTIZE_METRICS).get("task_eval_loss", {})
    results = {}
    for name, path in TORCH_MODELS.items():
        if set(done.get(name, {})) != set(tasks):
            raise StageError(f"{QUANTIZE_METRICS}: no per-task losses for '{name}' (run `dvc repro quantize`)")
        results[name] = {**loss_entries({t: done[name][t] for t in tasks}), "size_mb": dir_size_mb(path)}
        if name != "rtn" and gen_rows:  # RTN is the control for perplexity; its generations add no insight
            tok, model = load_tokenizer(path), load_model(path, device)
            replies = greedy_replies(model, tok, [r["prompt"] for r in gen_rows], ev["max_new_tokens"])
            results[name].update(json_scores(replies, gen_rows))
        log.info("%s: %s", name, results[name])
    base_dir = TORCH_MODELS["awq"]
    tok = load_tokenizer(base_dir)
    peft_model = None
    for task in tasks:
        folder = Path("models/adapters") / task
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(load_model(base_dir, device), str(folder), adapter_name=task)
        else:
            peft_model.load_adapter(str(folder), adapter_name=task)
        peft_model.set_adapter(task)
        peft_model.eval()
        name = f"awq+{task}"
        # the own task's loss is the finetune stage's (same rows, evaluate.max_seq_len); the other tasks' are new
        own = read_metrics(FINETUNE_METRICS / f"{task}.json")
        known = {task: own["adapter_eval_loss"]} if own.get("eval_rows") == len(rows[task]) else {}
        measured = {
            t: known[t] if t in known else round(eval_loss(peft_model, tok, r, ev["max_seq_len"]), 4)
            for t, r in rows.items()
        }
        results[name] = {**loss_entries(measured), "size_mb": dir_size_mb(folder)}
        if task == JSON_TASK:
            replies = greedy_replies(peft_model, tok, [r["prompt"] for r in gen_rows], ev["max_new_tokens"])
            results[name].update(json_scores(replies, gen_rows))
        log.info("%s: %s", name, results[name])
    return results


def optimize_losses(rows: dict, tasks: list[str]) -> dict[tuple[str | None, str], float]:
    """ONNX losses the optimize stage's agreement check already measured on the whole eval split of a task:
    {(adapter or None, task): loss}. The base model covers every task, each adapter its own."""
    agree = read_metrics(OPTIMIZE_METRICS).get("agreement", {})
    found = {}
    for task in tasks:
        base = agree.get("base", {}).get("by_task", {}).get(task, {})
        own = agree.get(task, {})
        for adapter, m in ((None, base), (task, own)):
            if m.get("rows") == len(rows[task]) and "loss_onnx" in m:
                found[adapter, task] = m["loss_onnx"]
    return found


def onnx_loss(lm, tokenizer, rows: list[dict], max_len: int, adapter: dict | None = None) -> float:
    """Mean response-token loss of `rows` under an OnnxLM (with an adapter's input values, or none)."""
    from stages.onnx_check import _nll

    total, count = 0.0, 0
    for row in rows:
        ids, labels = encode_example(tokenizer, row["prompt"], row["response"], max_len)
        nll, _ = _nll(lm.logits(ids, adapter), labels)
        total, count = total + float(nll.sum()), count + len(nll)
    return round(total / count, 4)


def onnx_losses(rows: dict, max_len: int, tasks: list[str]) -> dict:
    """Held-out losses of the ONNX graph itself (onnxruntime on the same model.onnx, all positions' logits); what
    the optimize stage measured on the same rows is taken from metrics/optimize.json."""
    from stages.onnx_check import OnnxLM
    from stages.onnx_lora import read_adapter

    known = optimize_losses(rows, tasks)
    tok, lm = None, None
    results = {}
    for adapter in [None, *tasks]:
        weights = read_adapter(ONNX / "adapters" / f"{adapter}.onnx_adapter") if adapter else None
        measured = {}
        for task, task_rows in rows.items():
            if (adapter, task) in known:
                measured[task] = known[adapter, task]
                continue
            if lm is None:
                tok, lm = load_tokenizer(ONNX / "model"), OnnxLM(ONNX / "model")
            measured[task] = onnx_loss(lm, tok, task_rows, max_len, weights)
        results["onnx" if adapter is None else f"onnx+{adapter}"] = loss_entries(measured)
    log.info(
        "ONNX losses: %d of %d (variant, task) pairs from %s", len(known), len(results) * len(rows), OPTIMIZE_METRICS
    )
    return results


def ort_greedy(
    model, adapters, ids: list[int], adapter: str | None, new_tokens: int, stops=(), exact: bool = False
) -> tuple[list[int], list[float]]:
    """Greedy decoding with ORT GenAI (the model's own end token ends it early unless `exact`): the new tokens up to,
    not including, the first of `stops`, and the seconds from start at which each token reached the host."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    length = len(ids) + new_tokens
    params.set_search_options(max_length=length, do_sample=False, **({"min_length": length} if exact else {}))
    gen = og.Generator(model, params)
    if adapter:
        gen.set_active_adapter(adapters, adapter)
    start = time.perf_counter()
    gen.append_tokens(ids)
    out, stamps = [], []
    while not gen.is_done():
        gen.generate_next_token()
        token = int(gen.get_next_tokens()[0])
        stamps.append(time.perf_counter() - start)
        if token in stops:
            break
        out.append(token)
    return out, stamps


def _ort_generate(
    model_dir: str,
    adapter: str | None,
    prompts: list[list[int]],
    speed_prompt: list[int],
    stops: list[int],
    max_new_tokens: int,
    queue,
) -> None:
    """In a fresh process that imports only ORT GenAI: greedy reply tokens for `prompts` (token ids), TTFT and decode
    speed on `speed_prompt`, and the process's peak RSS (the tokenizer and torch stay in the parent)."""
    import onnxruntime_genai as og

    model = og.Model(f"{model_dir}/model")
    adapters = og.Adapters(model)
    if adapter:
        adapters.load(f"{model_dir}/adapters/{adapter}.onnx_adapter", adapter)

    replies = [ort_greedy(model, adapters, ids, adapter, max_new_tokens, stops)[0] for ids in prompts]
    ort_greedy(model, adapters, speed_prompt, adapter, 8)  # warm-up
    _, stamps = ort_greedy(model, adapters, speed_prompt, adapter, 128)
    queue.put(
        {
            "replies": replies,
            "ttft_ms": round(stamps[0] * 1000, 1),
            "decode_tok_s": round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 1),
            "peak_rss_mb": peak_rss_mb(),
        }
    )


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: a spawned child's ru_maxrss keeps the forking parent's."""
    with open("/proc/self/status") as f:
        return round(int(next(line.split()[1] for line in f if line.startswith("VmHWM"))) / 1024, 1)


def ort_run(adapter: str | None, prompts: list[str], max_new_tokens: int) -> dict:
    """_ort_generate in a fresh process (spawn: the peak RSS is the ORT model's alone); replies decoded here."""
    tok = load_tokenizer(ONNX / "model")
    stops = [end_token(tok), tok.eos_token_id]

    def encode(text: str) -> list[int]:
        return tok(prompt_text(tok, text), add_special_tokens=False).input_ids

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    args = (str(ONNX), adapter, [encode(p) for p in prompts], encode(SPEED_PROMPT), stops, max_new_tokens, queue)
    proc = ctx.Process(target=_ort_generate, args=args)
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    result["replies"] = [tok.decode(ids, skip_special_tokens=True).strip() for ids in result["replies"]]
    return result


def write_plots(results: dict, tasks: list[str]) -> None:
    PLOTS.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        with open(PLOTS / f"perplexity_{task}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variant", "perplexity"])
            w.writerows((name, m[f"{task}_ppl"]) for name, m in results.items() if f"{task}_ppl" in m)
    with open(PLOTS / "size_mb.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "size_mb"])
        w.writerows((name, m["size_mb"]) for name, m in results.items() if "size_mb" in m)


@main
def run(argv: list[str]) -> None:
    params = load_params()
    ev = require(params, "evaluate")
    tasks = require(params, "tasks")
    device = check_device(require(params, "device.name"))
    rows = {task: read_jsonl(SPLITS / task / "eval.jsonl") for task in tasks}
    gen_rows = rows[JSON_TASK][: ev["max_prompts"]] if JSON_TASK in rows else []
    start = time.time()

    results = torch_variants(rows, gen_rows, ev, device, tasks)
    log.info("torch variants done at %.0f s", time.time() - start)
    onnx = onnx_losses(rows, ev["max_seq_len"], tasks)
    log.info("ONNX losses done at %.0f s", time.time() - start)
    model_mb = dir_size_mb(ONNX / "model")
    for adapter in [None, *tasks]:
        name = "onnx" if adapter is None else f"onnx+{adapter}"
        prompts = [r["prompt"] for r in gen_rows] if adapter in (None, JSON_TASK) else []
        ort = ort_run(adapter, prompts, ev["max_new_tokens"])
        replies = ort.pop("replies")
        size = model_mb + (dir_size_mb(ONNX / "adapters" / f"{adapter}.onnx_adapter") if adapter else 0)
        onnx[name].update(ort, size_mb=round(size, 2))
        if replies:
            onnx[name].update(json_scores(replies, gen_rows))
        log.info("%s: %s (at %.0f s)", name, onnx[name], time.time() - start)
    results.update(onnx)
    results["seconds"] = round(time.time() - start, 1)
    write_json(METRICS, results)
    write_plots({k: v for k, v in results.items() if isinstance(v, dict)}, tasks)


if __name__ == "__main__":
    run()
