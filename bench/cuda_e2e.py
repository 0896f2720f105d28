"""device=cuda end to end on a GPU machine: stage timings, ORT GenAI (CUDA) against torch eager, a scripted chat.

Run from the repository root on the GPU machine, with params.yaml composed for the GPU
(`python -m stages.params device=cuda`), onnxruntime-gpu + onnxruntime-genai-cuda installed (`make setup GPU=1`):

    python bench/cuda_e2e.py [--skip-stages] [--out bench/results/<date>-cuda.json]

Baseline in the same run: torch eager `generate` (bf16, the quantized model's weights) on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = [["base"], ["data"], ["quantize"], ["finetune", "travel"], ["finetune", "trip_json"], ["optimize"]]
PROMPT = (
    "I am planning a two-week trip through Portugal and Spain next spring with my partner. We like food, "
    "architecture, long walks and a little nightlife, and we would rather take trains than fly. Suggest a route "
    "that starts in Lisbon and ends in Barcelona, with how many nights to spend in each city and why."
)
NEW_TOKENS = 128
ROUNDS = 5


def run_stages() -> dict[str, float]:
    seconds = {}
    for stage in STAGES:
        name = "@".join(stage) if len(stage) > 1 else stage[0]
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage[0]}", *stage[1:]], capture_output=True, text=True)
        seconds[name] = round(time.time() - start, 1)
        print(f"{name}: {seconds[name]} s (exit {proc.returncode})", flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], flush=True)
            # optimize checks its CUDA graph against torch through onnxruntime's CPU provider after building it
            if not (name == "optimize" and Path("models/onnx/model/genai_config.json").exists()):
                raise SystemExit(f"stage {name} failed")
            seconds["optimize_check_failed"] = proc.stderr.strip().splitlines()[-1][:300]
    return seconds


def torch_eager(model_dir: str, ids: list[int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda").eval()
    x = torch.tensor([ids], device="cuda")

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(8)  # warm-up
    ttft = [timed(1) for _ in range(ROUNDS)]
    full = [timed(NEW_TOKENS) for _ in range(ROUNDS)]
    return {
        "ttft_ms": round(statistics.median(ttft) * 1000, 2),
        "decode_tok_s": round((NEW_TOKENS - 1) / (statistics.median(full) - statistics.median(ttft)), 1),
    }


def ort_genai(model_dir: Path, ids: list[int], adapter: str | None) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir / "model"))
    adapters = og.Adapters(model)
    if adapter:
        adapters.load(str(model_dir / "adapters" / f"{adapter}.onnx_adapter"), adapter)

    def once() -> list[float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + NEW_TOKENS, min_length=len(ids) + NEW_TOKENS, do_sample=False)
        gen = og.Generator(model, params)
        if adapter:
            gen.set_active_adapter(adapters, adapter)
        start = time.perf_counter()
        gen.append_tokens(ids)
        stamps = []
        while not gen.is_done():
            gen.generate_next_token()
            gen.get_next_tokens()
            stamps.append(time.perf_counter() - start)
        return stamps

    once()  # warm-up
    runs = [once() for _ in range(ROUNDS)]
    return {
        "ttft_ms": round(statistics.median(r[0] for r in runs) * 1000, 2),
        "decode_tok_s": round(statistics.median((len(r) - 1) / (r[-1] - r[0]) for r in runs), 1),
        "tokens": len(runs[0]),
    }


def scripted_chat(model_dir: Path) -> list[dict]:
    """The chat engine headless: one conversation that switches adapters between turns."""
    from chat.engine import Engine, Sampling, collect

    engine = Engine(model_dir)
    engine.load()
    messages = [{"role": "system", "content": "You are a helpful, concise travel assistant."}]
    turns = [
        ("base", "What should I pack for a week in Iceland in October?"),
        ("travel", "And what is the best way to get around the island?"),
        ("trip_json", "Me and my wife want to spend 10 days in Japan in April 2027 with a budget of 4000 USD."),
    ]
    log = []
    for adapter, text in turns:
        if adapter != "base":
            engine.prepare_adapter(adapter)
        messages.append({"role": "user", "content": text})
        reply, stats = collect(
            engine.generate(messages, adapter, Sampling(temperature=0.0, top_p=1.0, max_new_tokens=96))
        )
        messages.append({"role": "assistant", "content": reply})
        log.append(
            {
                "adapter": adapter,
                "prompt": text,
                "reply": reply,
                "ttft_ms": round(stats.ttft_s * 1000, 1),
                "tok_s": round(stats.tokens_per_s or 0, 1),
                "finish": stats.finish,
            }
        )
        print(f"[{adapter}] {reply[:200]!r}", flush=True)
    return log


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-stages", action="store_true", help="measure existing models/ only")
    parser.add_argument("--out", default=f"bench/results/{date.today()}-cuda.json")
    args = parser.parse_args()

    import torch  # first: onnxruntime-gpu finds the CUDA libraries torch brings

    result: dict = {
        "date": str(date.today()),
        "device": torch.cuda.get_device_name(0),
        "new_tokens": NEW_TOKENS,
        "rounds": ROUNDS,
    }
    if not args.skip_stages:
        result["stage_seconds"] = run_stages()
    from transformers import AutoTokenizer

    from stages.lm import prompt_text

    tok = AutoTokenizer.from_pretrained("models/quantized")
    ids = tok(prompt_text(tok, PROMPT), add_special_tokens=False).input_ids
    result["prompt_tokens"] = len(ids)
    result["torch_eager_bf16"] = torch_eager("models/quantized", ids)
    print("torch eager:", result["torch_eager_bf16"], flush=True)
    onnx = Path("models/onnx")
    result["ort_genai"] = {name or "base": ort_genai(onnx, ids, name) for name in (None, "travel", "trip_json")}
    print("ort genai:", result["ort_genai"], flush=True)
    result["decode_ratio_ort_over_torch"] = round(
        result["ort_genai"]["travel"]["decode_tok_s"] / result["torch_eager_bf16"]["decode_tok_s"], 2
    )
    result["chat"] = scripted_chat(onnx)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "chat"}, indent=2))


if __name__ == "__main__":
    main()
