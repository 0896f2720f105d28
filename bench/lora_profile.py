"""Where an active LoRA adapter's decode time goes: ORT's own profiler over ORT GenAI decode steps, no adapter
against an adapter, summed per op type, for the LoRA branch nodes apart, and for copies between host and device.

    python -m bench.lora_profile [--model-conf conf/model/phi35_mini_shape.yaml] [--ep cuda] [--out FILE]

Builds its own model (random weights, one random rank-16 adapter) in --work, like bench/cuda_rope.py, or profiles
an existing optimize output with --onnx models/onnx --adapter travel.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import defaultdict
from datetime import date
from pathlib import Path

from olive_lab.decode import SPEED_PROMPT, decode_tok_s, linked_copy, ort_greedy

STEPS = 64


def profile(model_dir: Path, adapter_file: Path, adapter: str | None, ids: list[int], work: Path) -> dict:
    """Decode STEPS tokens with ORT's profiler on; per op type and per kind of node, total ms per decode step."""
    import onnxruntime_genai as og

    folder = work / f"profiled-{adapter or 'base'}"
    shutil.rmtree(folder, ignore_errors=True)
    linked_copy(model_dir, folder)
    for f in folder.iterdir():  # ORT refuses external data behind a link that leaves the folder: real hard links
        if f.is_symlink():
            target = f.resolve()
            f.unlink()
            try:
                f.hardlink_to(target)
            except OSError:
                shutil.copyfile(target, f)
    config = json.loads((folder / "genai_config.json").read_text())
    prefix = str(work / f"ortprof-{adapter or 'base'}")
    config["model"]["decoder"]["session_options"]["enable_profiling"] = prefix
    (folder / "genai_config.json").write_text(json.dumps(config, indent=4))
    model = og.Model(str(folder))
    adapters = og.Adapters(model)
    if adapter:
        adapters.load(str(adapter_file), adapter)
    ort_greedy(model, adapters, ids, adapter, 8, exact=True)  # warm-up
    _, stamps = ort_greedy(model, adapters, ids, adapter, STEPS, exact=True)
    del adapters, model  # the profile is written when the session ends
    trace = max(Path(work).glob(f"ortprof-{adapter or 'base'}*.json"), key=lambda p: p.stat().st_mtime)
    events = json.loads(trace.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    by_op: dict[str, float] = defaultdict(float)
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        ms = e["dur"] / 1000
        by_op[e.get("args", {}).get("op_name", "?")] += ms
        name = e["name"]
        kind = "lora_branch" if "/lora/" in name else "memcpy" if "Memcpy" in name else "other"
        by_kind[kind] += ms
    n_runs = max(len(runs), 1)
    return {
        "decode_tok_s": round(decode_tok_s(stamps), 1),
        "model_runs": len(runs),
        "ms_per_run": round(sum(e["dur"] for e in runs) / 1000 / n_runs, 3),
        "kernel_ms_per_run_by_kind": {k: round(v / n_runs, 3) for k, v in sorted(by_kind.items())},
        "kernel_ms_per_run_top_ops": {
            k: round(v / n_runs, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-conf", type=Path, default=Path("conf/model/phi35_mini_shape.yaml"))
    parser.add_argument("--tokenizer-dir", default=".gpu/tokenizer", help="borrowed tokenizer folder ('' for the GGUF)")
    parser.add_argument("--ep", default="cuda")
    parser.add_argument("--onnx", type=Path, default=None, help="an optimize output to profile instead of building")
    parser.add_argument("--adapter", default="a")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora_profile"))
    parser.add_argument("--out", type=Path, default=Path(f"bench/results/{date.today()}-lora-profile.json"))
    args = parser.parse_args()
    import torch  # noqa: F401  (first: onnxruntime-gpu finds the CUDA libraries torch brings)
    import yaml
    from transformers import AutoTokenizer

    from olive_lab.lm import prompt_text

    args.work.mkdir(parents=True, exist_ok=True)
    if args.onnx is None:
        from olive_lab.scale_model import build_random_onnx

        conf = yaml.safe_load(args.model_conf.read_text())
        conf["tokenizer_dir"] = args.tokenizer_dir or None
        # no CUDA graph: the profiler is to see each node
        _, args.onnx = build_random_onnx(conf, args.work, args.ep, adapter=args.adapter, cuda_graph=False)
    tok = AutoTokenizer.from_pretrained(str(args.onnx / "model"))
    ids = tok(prompt_text(tok, SPEED_PROMPT), add_special_tokens=False).input_ids
    adapter_file = args.onnx / "adapters" / f"{args.adapter}.onnx_adapter"
    result = {"date": str(date.today()), "ep": args.ep, "onnx": str(args.onnx), "decode_steps": STEPS}
    result["no_adapter"] = profile(args.onnx / "model", adapter_file, None, ids, args.work)
    result["adapter"] = profile(args.onnx / "model", adapter_file, args.adapter, ids, args.work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
