"""Would CUDA graphs close the Phi-3.5 gap? ORT GenAI decode with the LongRoPE `If` (no CUDA graph possible) against
the same model with only the short-factor cache (olive_lab.onnx.rope) and CUDA graphs on, same greedy tokens.

    python -m bench.cuda_rope [--model-conf conf/model/phi35_mini_shape.yaml] [--ep cuda] [--out FILE]

Builds its own model from the config (random weights, RTN-free: decode speed does not depend on the values) with
one random rank-16 adapter, in --work. Writes bench/results/<date>-cuda-rope.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from datetime import date
from pathlib import Path

from olive_lab.decode import SPEED_PROMPT, decode_tok_s, ort_greedy

NEW_TOKENS, ROUNDS = 128, 5


def measure(model_dir: Path, adapter_file: Path, ids: list[int]) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    adapters = og.Adapters(model)
    adapters.load(str(adapter_file), "a")
    out = {}
    for name in (None, "a"):
        ort_greedy(model, adapters, ids, name, 16, exact=True)  # warm-up (and graph capture)
        runs = [ort_greedy(model, adapters, ids, name, NEW_TOKENS, exact=True) for _ in range(ROUNDS)]
        out["adapter" if name else "base"] = {
            "ttft_ms": round(statistics.median(r[1][0] for r in runs) * 1000, 2),
            "decode_tok_s": round(statistics.median(decode_tok_s(r[1]) for r in runs), 1),
            "tokens": runs[0][0],
        }
    del adapters, model
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-conf", type=Path, default=Path("conf/model/phi35_mini_shape.yaml"))
    parser.add_argument("--tokenizer-dir", default=".gpu/tokenizer", help="borrowed tokenizer folder ('' for the GGUF)")
    parser.add_argument("--ep", default="cuda")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cuda_rope"))
    parser.add_argument("--out", type=Path, default=Path(f"bench/results/{date.today()}-cuda-rope.json"))
    args = parser.parse_args()
    import torch  # noqa: F401  (first: onnxruntime-gpu finds the CUDA libraries torch brings)
    import yaml
    from transformers import AutoTokenizer

    from olive_lab.lm import prompt_text
    from olive_lab.onnx.build import set_cuda_graph
    from olive_lab.onnx.rope import keep_short_rope
    from olive_lab.scale_model import build_random_onnx

    conf = yaml.safe_load(args.model_conf.read_text())
    conf["tokenizer_dir"] = args.tokenizer_dir or None
    base, built = build_random_onnx(conf, args.work, args.ep)
    short = args.work / "short"
    shutil.rmtree(short, ignore_errors=True)
    shutil.copytree(built / "model", short)
    original = json.loads((base / "config.json").read_text()).get("original_max_position_embeddings", 4096)
    result: dict = {"date": str(date.today()), "model": conf["name"], "ep": args.ep, "new_tokens": NEW_TOKENS}
    result["if_removed"] = keep_short_rope(short, original)
    if args.ep == "cuda":
        set_cuda_graph(short, True)
    tok = AutoTokenizer.from_pretrained(str(base))
    ids = tok(prompt_text(tok, SPEED_PROMPT), add_special_tokens=False).input_ids
    adapter_file = built / "adapters" / "a.onnx_adapter"
    result["with_if_no_cuda_graph"] = measure(built / "model", adapter_file, ids)
    result["short_rope" + ("_cuda_graph" if args.ep == "cuda" else "")] = short_run = measure(short, adapter_file, ids)
    ref = result["with_if_no_cuda_graph"]
    result["same_greedy_tokens"] = all(short_run[k]["tokens"] == ref[k]["tokens"] for k in ("base", "adapter"))
    for variant in list(result):
        if isinstance(result[variant], dict):
            for m in result[variant].values():
                m.pop("tokens", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
