"""Greedy decoding with ORT GenAI and its timing: one loop for the evaluate stage, the chat benches and bench/.

The timed work runs in a fresh process that imports only onnxruntime_genai (token ids in, token ids out), so its
peak RSS is the model's alone.
"""

from __future__ import annotations

import json
import multiprocessing
import queue as queue_module
import time
from pathlib import Path

from olive_lab.errors import StageError

# The 95-token prompt every speed figure uses (evaluate, bench/): long enough that prefill shows in the TTFT.
SPEED_PROMPT = (
    "I am planning a two-week trip through Portugal and Spain next spring with my partner. We like food, "
    "architecture, long walks and a little nightlife, and we would rather take trains than fly. Suggest a route "
    "that starts in Lisbon and ends in Barcelona, with how many nights to spend in each city and why."
)


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


def decode_tok_s(stamps: list[float]) -> float:
    """Decode speed from ort_greedy's stamps: the tokens after the first over the time they took, so the prompt's
    prefill (the first stamp, TTFT) is not in it. Every bench's decode tok/s is this one formula."""
    if len(stamps) < 2:
        raise ValueError(f"decode speed needs at least 2 token stamps, got {len(stamps)}")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: a spawned child's ru_maxrss keeps the forking parent's."""
    with open("/proc/self/status") as f:
        return round(int(next(line.split()[1] for line in f if line.startswith("VmHWM"))) / 1024, 1)


def _generate_in_child(
    onnx_dir: str,
    adapter: str | None,
    prompts: list[list[int]],
    speed_prompt: list[int],
    stops: list[int],
    max_new_tokens: int,
    queue,
) -> None:
    """Greedy reply tokens for `prompts`, TTFT and decode speed on `speed_prompt`, and the process's peak RSS."""
    import onnxruntime_genai as og

    model = og.Model(f"{onnx_dir}/model")
    adapters = og.Adapters(model)
    if adapter:
        adapters.load(f"{onnx_dir}/adapters/{adapter}.onnx_adapter", adapter)

    replies = [ort_greedy(model, adapters, ids, adapter, max_new_tokens, stops)[0] for ids in prompts]
    ort_greedy(model, adapters, speed_prompt, adapter, 8)  # warm-up
    _, stamps = ort_greedy(model, adapters, speed_prompt, adapter, 128)
    queue.put(
        {
            "replies": replies,
            "ttft_ms": round(stamps[0] * 1000, 1),
            "decode_tok_s": round(decode_tok_s(stamps), 1),
            "peak_rss_mb": peak_rss_mb(),
        }
    )


def ort_run(
    onnx_dir: Path,
    adapter: str | None,
    prompts: list[list[int]],
    speed_prompt: list[int],
    stops: list[int],
    max_new_tokens: int,
    timeout_s: float = 1800,
) -> dict:
    """_generate_in_child in a fresh process (spawn): {"replies": token id lists, ttft_ms, decode_tok_s, peak_rss_mb}."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    args = (str(onnx_dir), adapter, prompts, speed_prompt, stops, max_new_tokens, queue)
    proc = ctx.Process(target=_generate_in_child, args=args)
    proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:  # poll, so a child that dies (bad model, out of memory) fails at once instead of hanging
            try:
                result = queue.get(timeout=1)
                break
            except queue_module.Empty:
                if not proc.is_alive():
                    raise StageError(
                        f"{onnx_dir}: the ORT GenAI process died (exit {proc.exitcode}) while decoding"
                        f"{f' with adapter {adapter}' if adapter else ''}"
                    ) from None
                if time.monotonic() > deadline:
                    raise StageError(f"{onnx_dir}: ORT GenAI decoding took over {timeout_s:.0f} s") from None
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    return result


# ---------------------------------------------------------------- helpers the benches share


def first_step_ms(model, adapters, name: str | None, repeats: int) -> list[float]:
    """New generator, adapter activated, one token in: what a switch costs before decoding starts."""
    import onnxruntime_genai as og

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=16)
        gen = og.Generator(model, params)
        if name:
            gen.set_active_adapter(adapters, name)
        gen.append_tokens([1])
        times.append((time.perf_counter() - start) * 1e3)
    return times


def adapter_load_ms(model, path: Path, repeats: int) -> list[float]:
    import onnxruntime_genai as og

    times = []
    for i in range(repeats):
        adapters = og.Adapters(model)
        start = time.perf_counter()
        adapters.load(str(path), f"a{i}")
        times.append((time.perf_counter() - start) * 1e3)
        del adapters
    return times


def model_peak_rss_mb(model_dir: Path) -> float:
    """Peak RSS of a fresh process that loads the ORT GenAI model in `model_dir` and decodes one token."""
    import subprocess
    import sys

    code = (
        "import sys, onnxruntime_genai as og\n"
        "m = og.Model(sys.argv[1]); p = og.GeneratorParams(m); p.set_search_options(max_length=8)\n"
        "g = og.Generator(m, p); g.append_tokens([1, 2, 3]); g.generate_next_token()\n"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, check=True)
    return round(int(out.stdout.split()[-1]) / 1024, 1)


def set_threads(model_dir: Path, threads: int) -> None:
    """Pin ORT's intra-op threads in a model folder's genai_config.json (0: ORT's default)."""
    import json

    config_file = model_dir / "genai_config.json"
    config = json.loads(config_file.read_text())
    options = config["model"]["decoder"]["session_options"]
    options.pop("intra_op_num_threads", None)
    if threads:
        options["intra_op_num_threads"] = threads
    config_file.write_text(json.dumps(config, indent=4))


def linked_copy(model_dir: Path, out: Path) -> Path:
    """An ORT GenAI model folder as symlinks, except real copies of genai_config.json (to edit) and of a custom-ops
    library: ORT GenAI resolves the library's links and loads it only from inside the model folder (or the working
    directory), so a link to another folder fails in og.Model ("not within an allowed directory")."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        target = out / f.name
        if f.name == "genai_config.json" or f.suffix in (".so", ".dll", ".dylib"):
            if target.is_symlink():
                target.unlink()
            shutil.copyfile(f, target)
        elif not target.exists():
            target.symlink_to(f.resolve())
    return out


def bytes_per_token(model_dir: Path, adapter_file: Path | None, context: int) -> dict:
    """Bytes one decode step reads: weights (the embedding table only by one row), adapter tensors, KV cache."""
    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    weights = 0
    for t in graph.initializer:
        size = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        if size is None:
            size = len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
        if t.name in gathered and len(t.dims) == 2:
            size = size // t.dims[0]  # one row per token
        weights += size
    config = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    kv = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_size"] * 4 * context
    adapter = adapter_file.stat().st_size if adapter_file else 0
    return {"weights": weights, "adapter": adapter, "kv_cache": kv, "total": weights + adapter + kv}


def _cpuinfo_field(name: str) -> str | None:
    """The first `name: value` line of /proc/cpuinfo (None where there is none, or no /proc/cpuinfo)."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith(name):
            return line.split(":", 1)[1].strip()
    return None


def cpu_name() -> str:
    import platform

    return _cpuinfo_field("model name") or platform.machine()


def cpu_isa() -> list[str]:
    """The vector extensions MLAS and ggml pick their int4 kernels by: CPU results move with them (no AVX2 on
    2026-12-04's host made ORT's block-32 kernel the slowest part of a 1.7B step)."""
    flags = cpu_flags()
    return [f for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]


def cpu_flags() -> set[str]:
    """Every flag /proc/cpuinfo lists for the first CPU (empty where there is none)."""
    return set((_cpuinfo_field("flags") or "").split())
