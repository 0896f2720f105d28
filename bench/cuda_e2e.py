"""device=cuda end to end on a GPU machine: stage timings, ORT GenAI (CUDA) against torch eager, a scripted chat.

Run from the repository root on the GPU machine, with params.yaml composed for the GPU
(`python -m tools.params device=cuda`), onnxruntime-gpu + onnxruntime-genai-cuda installed (`make setup GPU=1`):

    python -m bench.cuda_e2e [--skip-stages] [--out bench/results/<date>-cuda.json]

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

from olive_lab.decode import linked_copy, ort_greedy  # the evaluate stage's own timing loop

STAGES = [["base"], ["data"], ["quantize"], ["finetune", "travel"], ["finetune", "trip_json"], ["optimize"]]
PROMPT = (
    "I am planning a two-week trip through Portugal and Spain next spring with my partner. We like food, "
    "architecture, long walks and a little nightlife, and we would rather take trains than fly. Suggest a route "
    "that starts in Lisbon and ends in Barcelona, with how many nights to spend in each city and why."
)
NEW_TOKENS = 128
ROUNDS = 5
TASKS = ("travel", "trip_json")


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
            raise SystemExit(f"stage {name} failed")
    return seconds


def torch_eager(model_dir: str, ids: list[int], adapter: Path | None = None) -> dict:
    """HF `generate` (bf16, eager) on the GPU; with `adapter`, the PEFT adapter on top (the fair baseline for ORT
    GenAI with that adapter active)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda").eval()
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).to("cuda").eval()
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


def with_cuda_graph(model_dir: Path, out: Path, on: bool) -> Path:
    """A copy of an optimize output (symlinks, own genai_config.json) with ORT's CUDA graph capture on or off."""
    from olive_lab.onnx.build import set_cuda_graph

    set_cuda_graph(linked_copy(model_dir / "model", out / "model"), on)
    if (model_dir / "adapters").exists() and not (out / "adapters").exists():
        (out / "adapters").symlink_to((model_dir / "adapters").resolve())
    return out


def ort_genai(model_dir: Path, ids: list[int], names: list[str | None]) -> dict:
    """Per adapter (None = base): TTFT, decode tok/s (medians of ROUNDS), the greedy tokens; then the same
    adapters again in a switching order on the same model, to catch a captured graph that keeps the old adapter."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir / "model"))
    adapters = og.Adapters(model)
    for name in names:
        if name:
            adapters.load(str(model_dir / "adapters" / f"{name}.onnx_adapter"), name)
    result: dict = {}
    for name in names:
        ort_greedy(model, adapters, ids, name, 16, exact=True)  # warm-up (and graph capture)
        runs = [ort_greedy(model, adapters, ids, name, NEW_TOKENS, exact=True) for _ in range(ROUNDS)]
        stamps = [r[1] for r in runs]
        result[name or "base"] = {
            "ttft_ms": round(statistics.median(s[0] for s in stamps) * 1000, 2),
            "decode_tok_s": round(statistics.median((len(s) - 1) / (s[-1] - s[0]) for s in stamps), 1),
            "tokens": runs[0][0],
            "same_tokens_every_round": all(r[0] == runs[0][0] for r in runs),
        }
    switched = [*names[1:], *names[:1], *names[1:]]
    result["switching_gives_same_tokens"] = all(
        ort_greedy(model, adapters, ids, name, NEW_TOKENS, exact=True)[0] == result[name or "base"]["tokens"]
        for name in switched
    )
    return result


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


def build_variants(root: Path) -> dict[str, Path]:
    """The stage's model (multi-LoRA branches) plus, for comparison, the plain model and the `switch` layout."""
    import yaml

    from olive_lab.onnx.export import build_onnx

    opt = yaml.safe_load(Path("params.yaml").read_text())["optimize"]
    common = dict(
        precision=opt["precision"],
        block_size=opt["block_size"],
        accuracy_level=opt["accuracy_level"],
        execution_provider="cuda",
        lm_head=opt["lm_head"],
    )
    adapters = {task: Path("models/adapters") / task for task in TASKS}
    build_onnx("models/quantized", root / "plain", {}, **common)
    build_onnx("models/quantized", root / "switch", adapters, **common, lora_layout="switch")
    return {"branches": Path("models/onnx"), "plain": root / "plain", "switch": root / "switch"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-stages", action="store_true", help="measure existing models/ only")
    parser.add_argument("--out", default=f"bench/results/{date.today()}-cuda.json")
    parser.add_argument("--work", default="/tmp/cuda_e2e", help="scratch folder for the extra builds")
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

    from olive_lab.lm import prompt_text

    tok = AutoTokenizer.from_pretrained("models/quantized")
    ids = tok(prompt_text(tok, PROMPT), add_special_tokens=False).input_ids
    result["prompt_tokens"] = len(ids)
    result["torch_eager_bf16"] = {"base": torch_eager("models/quantized", ids)}
    for task in TASKS:
        result["torch_eager_bf16"][task] = torch_eager("models/quantized", ids, Path("models/adapters") / task)
    print("torch eager:", result["torch_eager_bf16"], flush=True)

    work = Path(args.work)
    result["ort_genai"] = {}
    for layout, folder in build_variants(work).items():
        names = [None] if layout == "plain" else [None, *TASKS]
        for graph in (False, True):
            variant = f"{layout}{'+cuda_graph' if graph else ''}"
            try:
                measured = ort_genai(with_cuda_graph(folder, work / "variants" / variant, graph), ids, names)
            except Exception as exc:  # e.g. a graph ORT cannot capture (control flow): record it, go on
                measured = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
            result["ort_genai"][variant] = measured
            print(
                variant,
                {
                    k: (v if not isinstance(v, dict) else {x: y for x, y in v.items() if x != "tokens"})
                    for k, v in measured.items()
                },
                flush=True,
            )
    result["ratios"] = ratios(result)
    result["chat"] = scripted_chat(Path("models/onnx"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))


def ratios(result: dict) -> dict:
    """ORT GenAI decode tok/s over torch eager's for the same adapter (base = no adapter), per ORT variant; tokens
    of a CUDA-graph variant are checked against the same layout without it."""
    torch_eager = result["torch_eager_bf16"]
    out = {}
    for variant, measured in result["ort_genai"].items():
        if "error" in measured:
            continue
        plain = result["ort_genai"].get(variant.removesuffix("+cuda_graph"), {})
        for name, m in measured.items():
            if not isinstance(m, dict):
                continue
            out[f"{variant}/{name}"] = {
                "decode_ratio": round(m["decode_tok_s"] / torch_eager[name]["decode_tok_s"], 2),
                "tokens_match_no_graph": m["tokens"] == plain.get(name, {}).get("tokens"),
            }
    return out


if __name__ == "__main__":
    main()
