"""Would a float16 KV cache make CPU decoding faster (the perf-scale issue's attention share at 1.7B)? One
GroupQueryAttention node as the builder emits it for SmolLM2-1.7B's shape (32 query and 32 KV heads of 64, rotary in
the op, the KV cache shared between past and present as ORT GenAI runs it), float32 against float16 in the same
process, rounds interleaved, on the CPU provider with `--threads` intra-op threads.

    python -m bench.cpu_kv_fp16 [--context 160] [--threads 2] [--rounds 7] [--steps 200]

The builder gives CPU int4 models float32 activations and cache, and offers no float16 cache for the CPU provider,
so this measures the op alone before any graph surgery: a float16 model would also need casts around every
attention. Writes bench/results/<date>-cpu-kv-fp16.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import date

import numpy as np

from bench.scaling import model_conf
from olive_lab.decode import cpu_isa, cpu_name
from olive_lab.paths import BENCH_RESULTS

# bench.scaling's 1.7B model, whose profile put attention at 15 % of a decode step
ARCH = model_conf("1.7b")["arch"]
HEADS, KV_HEADS, LAYERS = ARCH["num_attention_heads"], ARCH["num_key_value_heads"], ARCH["num_hidden_layers"]
HEAD_DIM = ARCH["hidden_size"] // HEADS


def attention_session(dtype: str, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    hidden = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    inputs = [
        helper.make_tensor_value_info("qkv", elem, [1, 1, hidden]),
        helper.make_tensor_value_info("past_key", elem, [1, KV_HEADS, "max", HEAD_DIM]),
        helper.make_tensor_value_info("past_value", elem, [1, KV_HEADS, "max", HEAD_DIM]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    inverse_frequencies = ARCH["rope_theta"] ** -(np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    angles = np.arange(ARCH["max_position_embeddings"])[:, None] * inverse_frequencies[None, :]
    caches = [
        helper.make_tensor(name, elem, list(angles.shape), fn(angles).astype(dtype).flatten().tolist())
        for name, fn in (("cos_cache", np.cos), ("sin_cache", np.sin))
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
        ["out", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=HEADS, kv_num_heads=KV_HEADS, scale=HEAD_DIM**-0.5, local_window_size=-1, do_rotary=1,
        rotary_interleaved=0,
    )  # fmt: skip
    outputs = [
        helper.make_tensor_value_info("out", elem, [1, 1, HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("present_key", elem, [1, KV_HEADS, "max", HEAD_DIM]),
        helper.make_tensor_value_info("present_value", elem, [1, KV_HEADS, "max", HEAD_DIM]),
    ]
    graph = helper.make_graph([node], "gqa", inputs, outputs, initializer=caches)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def bind_step(session, dtype: str, context: int, buffer: int, seed: int = 0):
    """An IO binding of one decode step at `context` cached tokens, past and present sharing one buffer of `buffer`
    positions (random values, the same for either dtype at one seed)."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((1, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(dtype)
    key = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, KV_HEADS, buffer, HEAD_DIM)).astype(dtype))
    value = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, KV_HEADS, buffer, HEAD_DIM)).astype(dtype))
    binding = session.io_binding()
    binding.bind_cpu_input("qkv", qkv)
    binding.bind_ortvalue_input("past_key", key)
    binding.bind_ortvalue_input("past_value", value)
    binding.bind_output("out")  # first: copy_outputs_to_cpu()[0]
    binding.bind_ortvalue_output("present_key", key)  # shared buffer: GQA appends in place
    binding.bind_ortvalue_output("present_value", value)
    binding.bind_cpu_input("seqlens_k", np.array([context], np.int32))  # cached tokens + the new one, minus 1
    binding.bind_cpu_input("total_sequence_length", np.array(context + 1, np.int32))
    binding.keep = (key, value)  # the OrtValues must outlive the binding's runs
    return binding


def step_us(session, dtype: str, context: int, steps: int, buffer: int) -> float:
    """Microseconds per call of one decode step at `context` cached tokens (bind_step's binding, run again and
    again: GQA rewrites the same position, so every call does the same work)."""
    binding = bind_step(session, dtype, context, buffer)
    for _ in range(10):
        session.run_with_iobinding(binding)
    start = time.perf_counter()
    for _ in range(steps):
        session.run_with_iobinding(binding)
    return (time.perf_counter() - start) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=160, help="cached tokens (a 95-token prompt + 64 generated)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    buffer = args.context + 128
    sessions = {d: attention_session(d, args.threads) for d in ("float32", "float16")}
    readings: dict[str, list[float]] = {d: [] for d in sessions}
    for i in range(args.rounds):
        for d in list(sessions) if i % 2 == 0 else list(sessions)[::-1]:
            readings[d].append(step_us(sessions[d], d, args.context, args.steps, buffer))
        print(i, {d: round(r[-1], 1) for d, r in readings.items()}, flush=True)
    median = {d: round(statistics.median(r), 1) for d, r in readings.items()}
    kv_mb = {d: round(2 * KV_HEADS * (args.context + 1) * HEAD_DIM * np.dtype(d).itemsize / 1e6, 3) for d in sessions}
    result = {
        "date": str(date.today()),
        "machine": f"{cpu_name()} ({', '.join(cpu_isa()) or 'no AVX'}), {os.cpu_count()} cores",
        "threads": args.threads,
        "context": args.context,
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "layers": LAYERS},
        "us_per_layer": median,
        "ms_per_token_all_layers": {d: round(v * LAYERS / 1000, 2) for d, v in median.items()},
        "kv_mb_read_per_layer": kv_mb,
        "float16_over_float32_time": round(median["float16"] / median["float32"], 3),
        "readings_us": {d: [round(x, 1) for x in r] for d, r in readings.items()},
    }
    out = BENCH_RESULTS / f"{date.today()}-cpu-kv-fp16.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "readings_us"}, indent=2))


if __name__ == "__main__":
    main()
