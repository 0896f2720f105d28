"""Quantization frontier (issue #17): every quantize method, with and without int8 sensitive layers, measured in one
run on one machine, plus the order question (quantize then fine-tune, or fine-tune then quantize).

    python -m bench.quant_frontier [--variants rtn,awq,...] [--steps 30] [--rounds 3] [--out FILE]

For each variant, from the pipeline's own models/base and data/split and params.yaml's quantize settings:
- ppl_over_fp32: perplexity pooled over every task's eval split (the quantize stage's measure), over fp32's;
- onnx_mb: the plain ONNX model (no adapter) built by the optimize stage's code (its block size, lm_head, the
  quantize stage's exact grid); weights_read_mb: what one decode step reads (the embedding table by one row);
- decode_tok_s: ORT GenAI greedy decode on the 95-token speed prompt, 2 threads, median of --rounds interleaved
  rounds (every variant once per round), decode_vs_rtn its ratio to plain RTN int4 in the same round;
- travel_loss_cut: 1 - adapter / base eval loss of a travel adapter trained --steps steps on that variant (the
  same budget for every variant, less than the pipeline's: a relative measure, not the pipeline's figure).

default: the rule this file applies, stated in `rule`: the lowest perplexity among variants whose decode speed is
at least 90 % of plain int4's (RTN; every int4 variant has its size).

order: on the default variant, adapters for every task with the same budget (--steps), trained on the quantized
model (the lab's order) or on fp32 and then applied to the quantized base, both exported to ONNX (same base graph,
multi-LoRA) and measured with the ONNX model itself: eval loss per task.

Writes bench/results/<date>-quant-frontier.json. Quiet machine only: nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from olive_lab import paths
from olive_lab.decode import SPEED_PROMPT, bytes_per_token, cpu_name, linked_copy, ort_run, set_threads
from olive_lab.files import dir_size_mb, read_jsonl
from olive_lab.lm import load_model, load_tokenizer, prompt_text
from olive_lab.lora import finetune
from olive_lab.onnx.check import OnnxLM, onnx_loss
from olive_lab.onnx.export import build_onnx
from olive_lab.onnx.lora import read_adapter
from olive_lab.params import load_params, require, task_settings
from olive_lab.quantize import calibration_rows, int4_size_mb, pooled_loss, quantize
from olive_lab.scoring import perplexity

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.quant_frontier")
# name -> (quantize.method, quantize.int8_layers)
VARIANTS = {
    "rtn": ("rtn", None),
    "rtn+int8": ("rtn", "sensitive"),
    "awq": ("awq", None),
    "gptq": ("gptq", None),
    "gptq+int8": ("gptq", "sensitive"),
    "awq+gptq": ("awq+gptq", None),
    "awq+gptq+int8": ("awq+gptq", "sensitive"),
}
MIN_SPEED = 0.9  # the default rule: at least this share of plain int4's decode speed
RULE = "lowest ppl_over_fp32 among variants with decode_vs_rtn >= 0.9 (median over rounds)"


def build(folder: Path, out: Path, adapters: dict[str, Path], opt: dict, group: int) -> Path:
    build_onnx(
        folder,
        out,
        adapters,
        precision="int4",
        block_size=group,
        accuracy_level=int(opt["accuracy_level"]),
        execution_provider="cpu",
        lm_head=opt["lm_head"],
        lora_layout="branches",
    )
    return out


def train(task: str, params: dict, steps: int, base: Path, out: Path, base_loss: float | None) -> dict:
    settings = {
        **task_settings(params, task),
        "max_steps": steps,
        "eval_max_seq_len": require(params, "evaluate.max_seq_len"),
        "target_modules": require(params, "model.lora_targets"),
    }
    metrics, _, seconds = finetune(task, settings, "cpu", base, ROOT / paths.SPLITS, out, base_loss)
    return {**metrics, "seconds": seconds}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="python -m bench.quant_frontier")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=30, help="adapter training steps (every variant, both orders)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-order", action="store_true", help="skip the order measurement")
    parser.add_argument("--work", type=Path, default=None, help="keep the models here (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "rtn" not in names:
        parser.error(f"--variants: unknown {unknown}" if unknown else "--variants must include rtn (the baseline)")
    params = load_params(ROOT / "params.yaml")
    q, opt, tasks = require(params, "quantize"), require(params, "optimize"), require(params, "tasks")
    group, max_len = int(require(params, "model.group_size")), int(require(params, "evaluate.max_seq_len"))
    base = ROOT / paths.BASE_MODEL
    if not (base / "config.json").exists():
        raise SystemExit(f"{base}: no base model (run `dvc repro base` or `dvc pull base` first)")
    work = args.work or Path(tempfile.mkdtemp(prefix="quant-frontier-"))
    work.mkdir(parents=True, exist_ok=True)
    splits = ROOT / paths.SPLITS
    eval_rows = {t: read_jsonl(splits / t / "eval.jsonl") for t in tasks}
    calib = calibration_rows(splits, tasks, int(require(params, "data.seed")))
    tok = load_tokenizer(base)
    started = time.time()

    fp32_loss, fp32_tasks = pooled_loss(load_model(base), tok, eval_rows, max_len)
    log.info("fp32: eval loss %.4f, perplexity %.3f", fp32_loss, perplexity(fp32_loss))
    variants: dict[str, dict] = {}
    for name in names:
        method, layers = VARIANTS[name]
        folder, done = work / name, work / f"{name}.json"
        if done.exists():  # a re-run with the same --work: the variant was measured (speed is measured again)
            variants[name] = json.loads(done.read_text())
            continue
        start = time.time()
        model = quantize(base, folder, method, {**q, "int8_layers": layers}, group, calib, "cpu")
        seconds = round(time.time() - start, 1)
        loss, per_task = pooled_loss(model, tok, eval_rows, max_len)
        del model
        onnx_dir = build(folder, work / f"{name}-onnx", {}, opt, group)
        read = bytes_per_token(onnx_dir / "model", None, 0)
        variants[name] = {
            "name": name,
            "method": method,
            "int8_layers": layers,
            "ppl": perplexity(loss),
            "ppl_over_fp32": round(perplexity(loss) / perplexity(fp32_loss), 4),
            "task_eval_loss": per_task,
            "packed_mb": int4_size_mb(folder, 4, group),
            "onnx_mb": dir_size_mb(onnx_dir / "model"),
            "weights_read_mb": round(read["weights"] / 1e6, 1),
            "quantize_seconds": seconds,
        }
        log.info("%s: %s", name, variants[name])
        cut = train("travel", params, args.steps, folder, work / f"{name}-travel", per_task["travel"])
        variants[name]["travel_loss_cut"] = cut["eval_loss_reduction"]
        log.info("%s: travel adapter cuts the loss by %.1f %%", name, 100 * cut["eval_loss_reduction"])
        done.write_text(json.dumps(variants[name]))

    # decode speed: interleaved rounds, 2 threads, each run in a fresh process (olive_lab.decode.ort_run)
    speed_ids = tok(prompt_text(tok, SPEED_PROMPT))["input_ids"]
    for name in names:
        set_threads(linked_copy(work / f"{name}-onnx" / "model", work / f"{name}-speed" / "model"), 2)
    speeds: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        got = {n: ort_run(work / f"{n}-speed", None, [], speed_ids, [], 128)["decode_tok_s"] for n in names}
        for n in names:
            speeds[n].append(got[n])
            ratios[n].append(got[n] / got["rtn"])
        log.info("round %d: %s", r + 1, got)
    for n in names:
        variants[n]["decode_tok_s"] = round(statistics.median(speeds[n]), 1)
        variants[n]["decode_vs_rtn"] = round(statistics.median(ratios[n]), 3)
        variants[n]["decode_runs"] = speeds[n]

    eligible = [v for v in variants.values() if v["decode_vs_rtn"] >= MIN_SPEED]
    default = min(eligible, key=lambda v: v["ppl_over_fp32"])["name"]
    log.info("default by the rule: %s", default)

    result = {
        "date": dt.date.today().isoformat(),
        "cpu": cpu_name(),
        "threads": 2,
        "fp32_ppl": perplexity(fp32_loss),
        "fp32_task_eval_loss": {t: round(v, 4) for t, v in fp32_tasks.items()},
        "adapter_steps": args.steps,
        "rule": RULE,
        "default": default,
        "variants": list(variants.values()),
    }
    if not args.no_order:
        result["order"] = measure_order(default, work, params, tasks, args.steps, eval_rows, max_len, opt, group)
    result["seconds"] = round(time.time() - started, 1)
    out = args.out or ROOT / "bench" / "results" / f"{result['date']}-quant-frontier.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({v["name"]: {k: v[k] for k in ("ppl_over_fp32", "onnx_mb", "decode_vs_rtn",
                                                   "travel_loss_cut")} for v in variants.values()}, indent=1))  # fmt: skip
    print(f"default: {default}; wrote {out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def measure_order(
    name: str, work: Path, params: dict, tasks: list[str], steps: int, eval_rows: dict, max_len: int, opt: dict,
    group: int,
) -> dict:  # fmt: skip
    """Eval loss per task of the final ONNX model (quantized base + adapters), adapters trained on the quantized
    model (quantize_first) or on fp32 (finetune_first), the same budget either way."""
    quantized, fp32 = work / name, ROOT / paths.BASE_MODEL
    result: dict = {"variant": name, "adapter_steps": steps}
    for order, train_on in (("quantize_first", quantized), ("finetune_first", fp32)):
        adapters = {}
        for task in tasks:
            folder = work / f"{order}-{task}"
            train(task, params, steps, train_on, folder, None)
            adapters[task] = folder
        onnx_dir = build(quantized, work / f"{order}-onnx", adapters, opt, group)
        lm, tok = OnnxLM(onnx_dir / "model"), load_tokenizer(quantized)
        result[order] = {
            task: round(
                onnx_loss(
                    lm, tok, eval_rows[task], max_len, read_adapter(onnx_dir / "adapters" / f"{task}.onnx_adapter")
                ),
                4,
            )
            for task in tasks
        }
        log.info("order %s: ONNX eval loss %s", order, result[order])
    result["finetune_first_over_quantize_first"] = {
        t: round(result["finetune_first"][t] / result["quantize_first"][t], 4) for t in tasks
    }
    return result


if __name__ == "__main__":
    main()
