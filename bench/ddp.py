"""Fine-tuning on one GPU against several (device.gpus, torchrun) on one host, through the real finetune stage:
samples per second and the loss curves with the same seed. Writes bench/results/<date>-ddp.json.

    python -m bench.ddp [--gpus 2] [--size phi35|default] [--batch-size 8] [--steps 20] [--work /tmp/ddp]

The model is random (decode and training speed do not depend on the weights' values): Phi-3.5-mini's shape by
default (conf/model/phi35_mini_shape.yaml, 3.93B), trained fp32 with LoRA rank 16 on data/split/travel (from
`dvc repro data`, or carried). Each run is `python -m stages.finetune travel` in --work with its own params.yaml,
so the measurement is the stage's own: `samples_per_s` from metrics/perf/finetune_travel.json (training loop only,
after loading), the curve from plots/finetune/travel.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_finetune(work: Path, params: dict, gpus: int) -> dict:
    params = json.loads(json.dumps(params))
    params["device"]["gpus"] = gpus
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for out in ("models/adapters", "metrics", "plots"):
        shutil.rmtree(work / out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "stages.finetune", "travel"], cwd=work, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"finetune on {gpus} GPU(s) failed (exit {done.returncode})")
    with open(work / "plots/finetune/travel.csv") as f:
        curve = [float(r["loss"]) for r in csv.DictReader(f)]
    perf = json.loads((work / "metrics/perf/finetune_travel.json").read_text())
    metrics = json.loads((work / "metrics/finetune/travel.json").read_text())
    adapter = work / "models/adapters/travel"
    return {"curve": curve, **perf, "eval_loss_reduction": metrics["eval_loss_reduction"],
            "adapter_files": sorted(p.name for p in adapter.iterdir())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--size", choices=("phi35", "default"), default="phi35")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo processes (a smoke run)")
    parser.add_argument("--tokenizer-dir", default=str(ROOT / ".gpu/tokenizer"))
    parser.add_argument("--splits", type=Path, default=ROOT / "data/split")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ddp"))
    parser.add_argument("--out", type=Path, default=ROOT / f"bench/results/{date.today()}-ddp.json")
    args = parser.parse_args()
    import torch

    from bench.cuda_lora import model_conf
    from olive_lab.base_model import materialize

    conf = model_conf(args.size, args.tokenizer_dir)
    work = args.work
    base = work / "models/quantized"
    if not (base / "config.json").exists():
        materialize(conf, base)
    (work / "data").mkdir(parents=True, exist_ok=True)
    if not (work / "data/split").exists():
        shutil.copytree(args.splits, work / "data/split")
    params = yaml.safe_load((ROOT / "bench/gpu/params-phi35-shape.yaml").read_text())
    params["model"] = {**params["model"], **{k: conf[k] for k in ("name", "lora_targets")}}
    params["finetune"].update(batch_size=args.batch_size, max_steps=args.steps, tasks={})
    if args.device == "cpu":
        params["device"].update(name="cpu", dtype="float32", execution_provider="cpu")
    runs = {gpus: run_finetune(work, params, gpus) for gpus in (1, args.gpus)}
    one, many = runs[1], runs[args.gpus]
    rel = [abs(a - b) / abs(a) for a, b in zip(one["curve"], many["curve"], strict=True)]
    result = {
        "date": str(date.today()),
        "device": f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if args.device == "cuda" else "cpu",
        "model": conf["name"],
        "batch_size": args.batch_size,
        "steps": args.steps,
        "gpus": args.gpus,
        "speedup": round(many["samples_per_s"] / one["samples_per_s"], 3),
        "loss_max_rel_diff": round(max(rel), 6),
        "same_adapter_files": one["adapter_files"] == many["adapter_files"],
        "runs": {str(g): r for g, r in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
