"""device=cuda end to end on a GPU machine: stage costs, ORT GenAI (CUDA) against torch eager, a scripted chat.

Run from the repository root on the GPU machine, with params.yaml composed for the GPU
(`python -m tools.params device=cuda`), onnxruntime-gpu + onnxruntime-genai-cuda installed (`make setup GPU=1`):

    python -m bench.cuda_e2e [--skip-stages] [--out bench/results/<date>-cuda.json]          # all in one go

or in steps that each fit a time-limited call (the state file collects them; bench/gpu/run_phi35_shape.sh):

    python -m bench.cuda_e2e stages base data quantize --state S    # each stage: seconds, peak RSS, peak GPU memory
    python -m bench.cuda_e2e measure --layouts plain --state S
    python -m bench.cuda_e2e report --state S --out bench/results/<date>-cuda-phi35-shape.json

Baseline in the same run: torch eager `generate` (bf16, the quantized model's weights) on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

from olive_lab.decode import decode_tok_s, linked_copy, ort_greedy  # the evaluate stage's own timing loop
from olive_lab.memory import param_count

STAGES = [
    ["base"],
    ["data"],
    ["quantize"],
    ["finetune", "travel"],
    ["finetune", "trip_json"],
    ["optimize"],
    ["evaluate"],
]
PROMPT = (
    "I am planning a two-week trip through Portugal and Spain next spring with my partner. We like food, "
    "architecture, long walks and a little nightlife, and we would rather take trains than fly. Suggest a route "
    "that starts in Lisbon and ends in Barcelona, with how many nights to spend in each city and why."
)
NEW_TOKENS = 128
ROUNDS = 5
TASKS = ("travel", "trip_json")
EXTRA_LAYOUTS = ("plain", "switch")  # what build_variants builds beside the stage's model


def run_stages(stages: list[list[str]], costs: dict, save) -> None:
    """Each stage as `python -m stages.<name>`: its seconds, peak host RSS and peak GPU memory (process tree),
    saved after each stage so that a failure keeps what ran before it."""
    from olive_lab.profiling import run_measured

    for stage in stages:
        name = "@".join(stage) if len(stage) > 1 else stage[0]
        code, costs[name] = run_measured([sys.executable, "-m", f"stages.{stage[0]}", *stage[1:]])
        print(f"{name}: {costs[name]} (exit {code})", flush=True)
        if code != 0:
            costs[name]["failed"] = True
            save()
            raise SystemExit(f"stage {name} failed")
        save()


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
            "decode_tok_s": round(statistics.median(decode_tok_s(s) for s in stamps), 1),
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
    # the first turn again at the end, in a new conversation on the same engine: whether the first reply's lower
    # speed is the engine's first decoding steps (CUDA graph capture among them) or that conversation's own
    for i, (adapter, text) in enumerate([*turns, turns[0]]):
        if i == len(turns):
            messages = messages[:1]
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
                **({"first_turn_again": True} if i == len(turns) else {}),
            }
        )
        print(f"[{adapter}] {reply[:200]!r}", flush=True)
    return log


def build_variants(root: Path, layouts: tuple[str, ...] = ("plain", "switch")) -> dict[str, Path]:
    """The stage's model (`pipeline`: multi-LoRA, in params.yaml's optimize.lora_layout) plus, for comparison, the
    plain model and the `switch` layout."""
    import yaml

    from olive_lab.onnx.export import build_onnx

    params = yaml.safe_load(Path("params.yaml").read_text())
    opt = params["optimize"]
    # the stage's builder options too, so that the plain model differs from the stage's in the LoRA inputs alone
    common = dict(
        precision=opt["precision"],
        block_size=opt["block_size"],
        accuracy_level=opt["accuracy_level"],
        execution_provider="cuda",
        lm_head=opt["lm_head"],
        builder_extra=params["model"].get("builder_options"),
    )
    adapters = {task: Path("models/adapters") / task for task in TASKS}
    variants = {"pipeline": Path("models/onnx")}
    if "plain" in layouts:
        # with the stage's cuda_graph, so Phi-3's LongRoPE If becomes a Where here too and the graph can be captured
        build_onnx("models/quantized", root / "plain", {}, **common, cuda_graph=bool(opt.get("cuda_graph", False)))
        variants["plain"] = root / "plain"
    if "switch" in layouts:
        build_onnx("models/quantized", root / "switch", adapters, **common, lora_layout="switch")
        variants["switch"] = root / "switch"
    return variants


def measure(result: dict, work: Path, layouts: tuple[str, ...]) -> None:
    """ORT GenAI (each layout, CUDA graphs off and on), then torch eager, on the same prompt; then the chat engine."""
    from transformers import AutoTokenizer

    from olive_lab.lm import prompt_text

    tok = AutoTokenizer.from_pretrained("models/quantized")
    ids = tok(prompt_text(tok, PROMPT), add_special_tokens=False).input_ids
    result["prompt_tokens"] = len(ids)
    result["ort_genai"] = {}
    for layout, folder in build_variants(work, layouts).items():
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
    # torch eager after ORT: in a process whose torch had already run on the GPU, ORT decoded at 0.91-0.96x on an
    # H100 (2026-12-07, bench/results/2026-12-07-cuda-phi35-goals.json: torch_first)
    result["torch_eager_bf16"] = {"base": torch_eager("models/quantized", ids)}
    for task in TASKS:
        result["torch_eager_bf16"][task] = torch_eager("models/quantized", ids, Path("models/adapters") / task)
    print("torch eager:", result["torch_eager_bf16"], flush=True)
    result["ratios"] = ratios(result)
    result["chat"] = scripted_chat(Path("models/onnx"))
    result["sizes_mb"] = sizes_mb(work)
    result["params_b"] = round(param_count(json.loads(Path("models/quantized/config.json").read_text())) / 1e9, 3)


def sizes_mb(work: Path) -> dict:
    """Sizes on disk. With the `fused` layout on CUDA the adapters' weights are resident in the model (its size less
    the plain model's, when measure built that) and each .onnx_adapter file holds only the masks that pick it."""
    from olive_lab.files import dir_size_mb

    sizes = {
        "base": dir_size_mb("models/base"),
        "quantized_fake_quant_fp32": dir_size_mb("models/quantized"),
        "onnx_model": dir_size_mb("models/onnx/model"),
        **{f"onnx_adapter_{t}": dir_size_mb(f"models/onnx/adapters/{t}.onnx_adapter") for t in TASKS},
    }
    if (work / "plain" / "model").is_dir():
        sizes["onnx_plain_model"] = dir_size_mb(work / "plain" / "model")
    return sizes


def best_pipeline(result: dict) -> tuple[str, dict]:
    """The pipeline's own model, with CUDA graphs where ORT could capture them (`branches`: state files from before
    2026-12-07, when the stage's model was always that layout)."""
    for variant in ("pipeline+cuda_graph", "pipeline", "branches+cuda_graph", "branches"):
        measured = result["ort_genai"].get(variant, {})
        if "base" in measured:
            return variant, measured
    raise SystemExit("no ORT GenAI measurement of the pipeline's model in the state file")


def summary(result: dict) -> dict:
    """The keys the any-model issue asks for, from a full run's state."""
    import yaml

    variant, ort = best_pipeline(result)
    eager = result["torch_eager_bf16"]
    params = yaml.safe_load(Path("params.yaml").read_text())
    return {
        "date": result["date"],
        "device": result["device"],
        "model": params["model"]["name"],
        "params_b": result.get("params_b"),
        "stages": result.get("stages", {}),
        "sizes_mb": result.get("sizes_mb", {}),
        "ort_variant": variant,
        "decode_tok_s": {
            "ort_base": ort["base"]["decode_tok_s"],
            "ort_adapter": {t: ort[t]["decode_tok_s"] for t in TASKS},
            "torch_base": eager["base"]["decode_tok_s"],
            "torch_adapter": {t: eager[t]["decode_tok_s"] for t in TASKS},
            "ort_plain_model": next(
                (
                    result["ort_genai"][v]["base"]["decode_tok_s"]
                    for v in ("plain+cuda_graph", "plain")
                    if "base" in result["ort_genai"].get(v, {})
                ),
                None,
            ),  # fmt: skip
        },
        "ttft_ms": {
            "ort_base": ort["base"]["ttft_ms"],
            **{f"ort_{t}": ort[t]["ttft_ms"] for t in TASKS},
            "torch_base": eager["base"]["ttft_ms"],
        },  # fmt: skip
        "ort_over_torch": round(ort["base"]["decode_tok_s"] / eager["base"]["decode_tok_s"], 2),
        "adapter_cost": {t: round(1 - ort[t]["decode_tok_s"] / ort["base"]["decode_tok_s"], 3) for t in TASKS},
        "greedy_tokens_same_after_switching": ort.get("switching_gives_same_tokens"),
        "chat": result.get("chat"),
        "prompt_tokens": result.get("prompt_tokens"),
        "new_tokens": NEW_TOKENS,
        "rounds": ROUNDS,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", nargs="?", choices=("all", "stages", "measure", "report"), default="all")
    parser.add_argument("stages", nargs="*", help="with `stages`: which (e.g. base data quantize finetune@travel)")
    parser.add_argument("--skip-stages", action="store_true", help="measure existing models/ only")
    parser.add_argument("--out", default=f"bench/results/{date.today()}-cuda.json")
    parser.add_argument("--state", default="/tmp/cuda_e2e/state.json", help="results collected across steps")
    parser.add_argument("--layouts", default="plain,switch", help="ORT GenAI models to measure beside the stage's: "
                        f"any of {','.join(EXTRA_LAYOUTS)}, comma-separated")  # fmt: skip
    parser.add_argument("--work", default="/tmp/cuda_e2e", help="scratch folder for the extra builds")
    args = parser.parse_args()
    layouts = tuple(args.layouts.split(",")) if args.layouts else ()
    if unknown := [name for name in layouts if name not in EXTRA_LAYOUTS]:
        parser.error(f"--layouts: unknown {', '.join(unknown)} (known: {', '.join(EXTRA_LAYOUTS)})")

    import torch  # first: onnxruntime-gpu finds the CUDA libraries torch brings

    state_file = Path(args.state)
    result: dict = json.loads(state_file.read_text()) if state_file.exists() and args.step != "all" else {}
    result.update(date=str(date.today()), device=torch.cuda.get_device_name(0), new_tokens=NEW_TOKENS, rounds=ROUNDS)

    def save() -> None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(result, indent=2) + "\n")

    if args.step in ("all", "stages") and not args.skip_stages:
        chosen = [s.split("@") for s in args.stages] if args.stages else STAGES
        run_stages(chosen, result.setdefault("stages", {}), save)
    if args.step in ("all", "measure"):
        measure(result, Path(args.work), layouts)
    save()
    if args.step in ("all", "report"):
        out = summary(result) if args.step == "report" else result
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps({k: v for k, v in out.items() if k not in ("chat", "ort_genai")}, indent=2))


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
