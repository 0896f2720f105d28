"""olive_lab/kernels: the olive_lab.LoraResident custom op (CPU reference kernel, built with g++) in real ORT sessions,
and olive_lab.onnx.lora.fuse_resident on the tiny model built for CUDA (float16 activations, run on the CPU provider).

Every entry of ORT's C API that lora_resident.cc calls by position runs here on the installed ORT (registration, the
kernel's input/output/shape queries, CreateStatus through the error paths), except the CUDA stream query.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from olive_lab.errors import StageError
from olive_lab.kernels import LIBRARY, build, op_error, op_session
from olive_lab.onnx.export import build_onnx
from olive_lab.onnx.lora import (
    BRANCH_OP,
    BRANCH_Q8_OP,
    FUSED_DOMAIN,
    FUSED_OP,
    RESIDENT_MASK,
    SWIGLU_OP,
    fuse_resident,
    fuse_swiglu,
    read_adapter,
    write_adapter,
)

GROUP = 32  # conf/model/tiny.yaml group_size
NAMES = ("y", "x", "A", "B", "mask")
F16 = np.float16


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """libolive_lab_kernels.so, CPU only, built once for this module."""
    if shutil.which("g++") is None:
        pytest.fail("g++ is not on PATH (a make setup prerequisite): cannot build the olive_lab kernels library")
    out = build(tmp_path_factory.mktemp("kernels"), cuda=False)
    assert out.name == LIBRARY and out.is_file()
    return out


@pytest.fixture(scope="module")
def op(library):
    """The library's own one-node session (symbolic dims rows, K, R, N: ORT checks only ranks and types)."""
    return op_session(library)


def ort_options(library: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # LoRA masks are overridable initializers by design; ORT warns about each
    return options


def loose_session(library: Path, types: dict[str, int] | None = None, outputs: tuple[str, ...] = ("out",)):
    """One LoraResident node whose inputs have no declared shape at all (not even a rank), so every shape check
    left is the kernel's own; `types` overrides an input's declared element type."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    types = {name: TensorProto.FLOAT16 for name in NAMES} | (types or {})
    out_types = {"out": TensorProto.FLOAT16, "partial": TensorProto.FLOAT}
    node = helper.make_node(FUSED_OP, list(NAMES), ["out", "partial"], domain=FUSED_DOMAIN)
    graph = helper.make_graph(
        [node],
        "loose",
        [helper.make_tensor_value_info(n, types[n], None) for n in NAMES],
        [helper.make_tensor_value_info(n, out_types[n], None) for n in outputs],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(FUSED_DOMAIN, 1)], ir_version=10
    )
    return ort.InferenceSession(model.SerializeToString(), ort_options(library), providers=["CPUExecutionProvider"])


def random_inputs(rows, k: int, n: int, r: int, active: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Float16 inputs like op_error's; `rows` may be a tuple of leading dims."""
    lead = tuple(rows) if isinstance(rows, tuple) else (rows,)
    rng = np.random.default_rng(seed)
    mask = np.zeros(r, F16)
    mask[active[0] : active[1]] = 1
    return {
        "y": rng.standard_normal((*lead, n)).astype(F16),
        "x": rng.standard_normal((*lead, k)).astype(F16),
        "A": (rng.standard_normal((k, r)) / np.sqrt(k)).astype(F16),
        "B": rng.standard_normal((r, n)).astype(F16),
        "mask": mask,
    }


def reference(feeds: dict[str, np.ndarray], mask: np.ndarray | None = None, b: np.ndarray | None = None) -> np.ndarray:
    """y + ((x @ A) * mask) @ B in float32 (optionally with another mask or B, to model a wrong kernel)."""
    f = {k: v.astype(np.float32) for k, v in feeds.items()}
    mask = f["mask"] if mask is None else mask.astype(np.float32)
    b = f["B"] if b is None else b.astype(np.float32)
    return f["y"] + ((f["x"] @ f["A"]) * mask) @ b


# The output is float16(float32 sum): rounding it costs at most half a float16 ulp, 2^-11 of the value, so the largest
# error is at most ~2^-11 of the largest |value| (worst seen over these shapes and 4 seeds each: 4.1e-4 of it; float32
# accumulation adds ~1e-6). 2^-10 allows twice that. A kernel that ignored the mask, or read B as [N, R], would be off
# by 0.6-1.5 of the largest value at these shapes (measured), some 600x this bound.
REL_BOUND = 2**-10
SHAPES = {  # rows, K, N, R, active columns
    "decode-span-at-start": (1, 576, 576, 32, (0, 16)),
    "prefill-ragged-K-wide-span": (7, 100, 48, 96, (48, 96)),  # K = 64 + 36: the last partial block is ragged
    "decode-ragged-K-wide-span": (1, 130, 200, 96, (48, 96)),  # K = 2 * 64 + 2
    "prefill-span-at-end": (16, 576, 192, 32, (16, 32)),
    "prefill-71-tokens": (71, 1536, 576, 32, (0, 16)),  # bench.cuda_lora kernel_check's 135m down_proj shape
}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_op_matches_numpy_within_float16_rounding(op, shape):
    rows, k, n, r, active = shape
    for seed in (0, 1):
        check = op_error(op, rows, k, n, r, active, seed=seed)
        assert check["max_abs"] > 5, check  # a real product (y and the delta are each of order one)
        assert check["max_abs_error"] <= REL_BOUND * check["max_abs"], check
        assert check["no_adapter_returns_y"], check
        assert check["same_output_twice"], check  # the CPU kernel's sums run in one order
        # the four ONNX nodes round x @ A, the masked product and the delta to float16 on the way; the op keeps them
        # in float32 (seen: 1.2-2.3x smaller errors than the nodes')
        assert check["max_abs_error"] <= check["onnx_nodes_max_abs_error"], check


def test_op_applies_the_mask_and_reads_b_as_rank_by_out(op):
    """The bound above tells a correct kernel from one that ignores the mask or reads B transposed."""
    feeds = random_inputs(7, 96, 96, 96, (48, 96))  # square, so a transposed read of B is shape-compatible
    (out,) = op.run(["out"], feeds)
    out = out.astype(np.float32)
    ref = reference(feeds)
    bound = REL_BOUND * np.abs(ref).max()
    assert np.abs(out - ref).max() <= bound
    wrong = {
        "mask ignored": reference(feeds, mask=np.ones(96, F16)),
        "mask reversed": reference(feeds, mask=feeds["mask"][::-1]),
        "B read as [N, R]": reference(feeds, b=feeds["B"].reshape(96, 96).T),
    }
    for what, value in wrong.items():
        assert np.abs(out - value).max() > 100 * bound, what


def test_op_rounds_to_float16_exactly_like_numpy(op):
    """The kernel's own half <-> float conversion (no F16C): with K = R = N = 1 each row is out = f16(y + x * a),
    the sum a single float32 operation, so the op must agree bit for bit with numpy's (IEEE, ties to even) cast, over
    every finite float16 y: the exact round trip (x = 0), ties both ways (x = +-half an ulp of y), random sums,
    overflow to infinity and, with a = 0.5, rounding inside the subnormal range."""
    every = np.arange(2**16, dtype=np.uint16).view(F16)
    y = every[np.isfinite(every)]
    half_ulp = (np.spacing(y.astype(np.float32)).astype(np.float32) / 2).astype(F16)  # 0 below the subnormal step
    rng = np.random.default_rng(0)
    xs = [np.zeros_like(y), half_ulp, -half_ulp, rng.permutation(y)]
    y_all, x_all = np.concatenate([y] * len(xs)), np.concatenate(xs)
    for a in (1.0, 0.5, 0.3):
        feeds = {
            "y": y_all[:, None],
            "x": x_all[:, None],
            "A": np.array([[a]], F16),
            "B": np.ones((1, 1), F16),
            "mask": np.ones(1, F16),
        }
        (out,) = op.run(["out"], feeds)
        # the kernel's order of float32 operations: t = (0 + x * a) * mask; out = f16(y + t * b)
        one = np.float32(1)
        t = (np.float32(0) + x_all.astype(np.float32) * np.float32(F16(a))) * one
        with np.errstate(over="ignore"):  # sums past 65504 round to infinity, as they should
            expected = (y_all.astype(np.float32) + t * one).astype(F16)
        differ = np.flatnonzero(out[:, 0].view(np.uint16) != expected.view(np.uint16))
        assert differ.size == 0, (a, differ.size, [(y_all[i], x_all[i], out[i, 0], expected[i]) for i in differ[:5]])
        assert np.isinf(out).sum() > 0 and (np.abs(out[out != 0]) < 6.1e-5).sum() > 0  # both ends were reached


def test_op_takes_any_leading_dims_and_sizes_its_scratch(library):
    """y and x as [batch, sequence, ...] (as in the model); partial, the CUDA kernels' scratch, is [0, ceil(K / 64),
    R] on the CPU, where nothing needs it; no rows is no work."""
    session = loose_session(library, outputs=("out", "partial"))
    feeds = random_inputs((2, 3), 100, 48, 96, (48, 96))
    out, partial = session.run(["out", "partial"], feeds)
    ref = reference(feeds)
    assert out.shape == (2, 3, 48) and out.dtype == F16
    assert np.abs(out.astype(np.float32) - ref).max() <= REL_BOUND * np.abs(ref).max()
    assert partial.shape == (0, 2, 96) and partial.dtype == np.float32
    empty = random_inputs((1, 0), 100, 48, 96, (48, 96))
    out, partial = session.run(["out", "partial"], empty)
    assert out.shape == (1, 0, 48) and partial.shape == (0, 2, 96)


# --- bad input: one clear error, and the session still works --------------------------------------------------------


def test_shapes_that_do_not_fit_are_one_error_from_the_kernel(op, library):
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    good = random_inputs(2, 16, 8, 4, (0, 4))
    # op_session declares A [K, R] and x [rows, K] with symbolic dims, which ORT does not check against each other:
    # the kernel's own check answers
    wrong_k = {**good, "A": good["A"][:12]}
    with pytest.raises(InvalidArgument, match=re.escape("LoraResident: A [12, 4], B [4, 8], mask [4] do not fit x [..., 16] and y [..., 8]")):  # fmt: skip
        op.run(["out"], wrong_k)
    with pytest.raises(InvalidArgument, match=re.escape("mask [5] do not fit")):
        op.run(["out"], {**good, "mask": np.zeros(5, F16)})
    with pytest.raises(InvalidArgument, match=re.escape("B [4, 9], mask [4] do not fit x [..., 16] and y [..., 8]")):
        op.run(["out"], {**good, "B": np.zeros((4, 9), F16)})
    loose = loose_session(library)
    with pytest.raises(InvalidArgument, match=re.escape("LoraResident: expected y [..., N], x [..., K], A [K, R]")):
        loose.run(["out"], {**good, "x": good["x"][None]})  # x [1, 2, 16] against y [2, 8]
    with pytest.raises(InvalidArgument, match="LoraResident: x and y differ in their leading dimensions"):
        loose.run(["out"], {**good, "y": np.zeros((3, 8), F16)})
    # an error is a status, not a crash: both sessions still compute
    for session in (op, loose):
        (out,) = session.run(["out"], good)
        assert np.abs(out.astype(np.float32) - reference(good)).max() <= REL_BOUND * np.abs(reference(good)).max()


def test_float32_is_the_cpu_models_type(library):
    """CPU models are float32: the op computes in it there (to float32 rounding of the sums)."""
    from olive_lab.kernels import op_error, op_session

    check = op_error(op_session(library, dtype="float32"), 3, 100, 96, 96, (48, 96))
    assert check["max_abs_error"] <= 1e-5 * check["max_abs"] and check["no_adapter_returns_y"]


def test_mixed_input_types_are_one_error(library):
    """All five inputs share one type: a float32 x beside float16 y is refused (by ORT's schema, before the kernel)."""
    from onnx import TensorProto
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph

    with pytest.raises((InvalidGraph, Fail), match=re.escape("Op (LoraResident)")):
        session = loose_session(library, types={"x": TensorProto.FLOAT})
        good = random_inputs(2, 16, 8, 4, (0, 4))
        session.run(["out"], {**good, "x": good["x"].astype(np.float32)})


# --- fuse_resident on the tiny model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fused(tiny_base, tiny_adapters, tmp_path_factory) -> dict:
    """The tiny model built for CUDA (float16 activations) in the resident layout with both adapters, the same
    without LoRA (plain), and the resident model.onnx fused (fused.onnx, next to it: same weights files)."""
    root = tmp_path_factory.mktemp("fused")
    fp16 = dict(precision="int4", block_size=GROUP, accuracy_level=4, execution_provider="cuda")
    resident = build_onnx(tiny_base, root / "resident", tiny_adapters, **fp16, lora_layout="resident")
    build_onnx(tiny_base, root / "plain", {}, **fp16)
    model_dir = root / "resident" / "model"
    shutil.copyfile(model_dir / "model.onnx", model_dir / "fused.onnx")
    return {
        "slots": resident["lora_slots"],
        "fused_count": fuse_resident(model_dir / "fused.onnx"),
        "resident": model_dir / "model.onnx",
        "fused": model_dir / "fused.onnx",
        "plain": root / "plain" / "model" / "model.onnx",
        "adapters": {task: root / "resident" / "adapters" / f"{task}.onnx_adapter" for task in tiny_adapters},
    }


def graph_of(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


class Decoder:
    """The exported decoder in a plain ORT session (CPU provider, the kernel library registered): logits of a
    prefill from an empty KV cache and of one decoding step after it."""

    def __init__(self, model_path: Path, library: Path):
        import onnxruntime as ort

        config = json.loads((model_path.parent / "genai_config.json").read_text())["model"]["decoder"]
        self.names, self.layers = config["inputs"], config["num_hidden_layers"]
        self.present = config["outputs"]
        self.kv_shape = (1, config["num_key_value_heads"], 0, config["head_size"])
        self.session = ort.InferenceSession(str(model_path), ort_options(library), providers=["CPUExecutionProvider"])

    def run(self, ids: list[int], next_id: int, adapter: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        past = {}
        for i in range(self.layers):
            past[self.names["past_key_names"] % i] = np.zeros(self.kv_shape, F16)
            past[self.names["past_value_names"] % i] = np.zeros(self.kv_shape, F16)
        outputs = ["logits"] + [self.present[f"present_{kv}_names"] % i for i in range(self.layers) for kv in ("key", "value")]  # fmt: skip
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        logits, *present = self.session.run(outputs, {**feeds, **past, **(adapter or {})})
        past = {
            self.names[f"past_{kv}_names"] % i: present[2 * i + j]
            for i in range(self.layers)
            for j, kv in enumerate(("key", "value"))
        }
        step = {"input_ids": np.array([[next_id]], np.int64), "attention_mask": np.ones((1, len(ids) + 1), np.int64)}
        (next_logits,) = self.session.run(["logits"], {**step, **past, **(adapter or {})})
        return logits.astype(np.float32), next_logits.astype(np.float32)


IDS, NEXT_ID = [1, 520, 33, 4000, 12, 99, 7000, 5], 321


def test_fuse_resident_replaces_every_branch_by_one_node(fused):
    assert fused["slots"] == 8  # 2 layers x (qkv, o, gate_up, down)
    assert fused["fused_count"] == fused["slots"]
    model, plain = graph_of(fused["fused"]), graph_of(fused["plain"])
    types = Counter((n.domain, n.op_type) for n in model.graph.node)
    # every LoRA node (MatMul A, Mul mask, MatMul B, Add) is gone: what is left is the plain graph plus one op a slot
    assert types == Counter((n.domain, n.op_type) for n in plain.graph.node) + Counter({(FUSED_DOMAIN, FUSED_OP): 8})
    assert not any(n.op_type == "MatMul" or ("/lora/" in n.name and n.op_type != FUSED_OP) for n in model.graph.node)
    assert [o.version for o in model.opset_import if o.domain == FUSED_DOMAIN] == [1]
    masks = {RESIDENT_MASK.format(r) for r in (4, 8, 12)}  # rank 4 per HF module: o/down 4, gate_up 8, qkv 12
    for node in (n for n in model.graph.node if n.op_type == FUSED_OP):
        base, _, a, b, mask = node.input
        assert a.endswith(".lora_A.weight") and b == a.replace("lora_A", "lora_B") and mask in masks, node
        assert base.endswith("/MatMul/output_0") and node.output[0].endswith("/lora/Add/output_0"), node
    assert [i.name for i in model.graph.input] == [i.name for i in graph_of(fused["resident"]).graph.input]


def test_fused_model_without_adapter_is_the_plain_model(fused, library):
    """With the default all-zero masks the op returns y exactly, so the logits are the plain model's bit for bit
    (the resident graph's four fp16 nodes are not: ORT's CPU fp16 paths round differently, 0.006 seen)."""
    plain = Decoder(fused["plain"], library).run(IDS, NEXT_ID)
    for got, want in zip(Decoder(fused["fused"], library).run(IDS, NEXT_ID), plain, strict=True):
        assert got.shape == want.shape and got.shape[-1] > 1000
        np.testing.assert_array_equal(got, want)


# fused vs resident logits with an adapter (prefill and the decoding step): max 0.0062 seen, the size of the resident
# graph's own float16 rounding (it differs from plain by 0.0057 with no adapter); the adapters move logits by 0.72-1.27
ADAPTER_TOL = 0.02


def test_fused_model_with_an_adapter_follows_the_resident_model(fused, library):
    resident, model = Decoder(fused["resident"], library), Decoder(fused["fused"], library)
    none = model.run(IDS, NEXT_ID)
    logits = {}
    for task, path in fused["adapters"].items():
        masks = read_adapter(path)
        assert set(masks) == {RESIDENT_MASK.format(r) for r in (4, 8, 12)}
        logits[task] = model.run(IDS, NEXT_ID, masks)
        for got, want, base in zip(logits[task], resident.run(IDS, NEXT_ID, masks), none, strict=True):
            assert np.abs(got - want).max() <= ADAPTER_TOL, task
            assert np.abs(got - base).max() > 10 * ADAPTER_TOL, task  # the adapter is really applied
    a, b = logits.values()
    assert all(np.abs(x - y).max() > 10 * ADAPTER_TOL for x, y in zip(a, b, strict=True))  # and the right one


def test_fuse_resident_leaves_a_model_without_branches_alone(fused, tmp_path):
    for name in ("plain", "fused"):  # no LoRA at all; already fused
        path = tmp_path / f"{name}.onnx"
        shutil.copyfile(fused[name], path)
        before = graph_of(path)
        assert fuse_resident(path) == 0
        after = graph_of(path)
        assert [(n.domain, n.op_type, n.name) for n in after.graph.node] == [
            (n.domain, n.op_type, n.name) for n in before.graph.node
        ]
        assert list(after.opset_import) == list(before.opset_import)


def branch_model(path: Path, down_op: str, mask_input: str = "/hidden") -> Path:
    """A float16 graph with one '/A/Mask' Mul: x -> `down_op` -> Mul(mask) -> MatMul B -> Add(y)."""
    import onnx
    from onnx import TensorProto, helper

    base = "/model/layers.0/attn/o_proj/lora"
    down_inputs = ["x", "A"] if down_op == "MatMul" else ["x", "x"]
    nodes = [
        helper.make_node(down_op, down_inputs, ["/hidden"], name=f"{base}/A"),
        helper.make_node("Mul", [mask_input, "mask"], ["/masked"], name=f"{base}/A/Mask"),
        helper.make_node("MatMul", ["/masked", "B"], ["/delta"], name=f"{base}/B"),
        helper.make_node("Add", ["y", "/delta"], ["out"], name=f"{base}/Add"),
    ]
    shapes = {"y": [1, 4], "x": [1, 4], "A": [4, 2], "B": [2, 4], "mask": [2]}
    graph = helper.make_graph(
        nodes,
        "branch",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT16, s) for n, s in shapes.items()],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, [1, 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_branch_of_another_shape_is_one_stage_error(tmp_path):
    path = branch_model(tmp_path / "odd.onnx", "Add")  # the mask's input comes from an Add, not x @ A
    with pytest.raises(StageError, match=re.escape(f"{path}: /model/layers.0/attn/o_proj/lora/A/Mask is not in a resident LoRA branch")):  # fmt: skip
        fuse_resident(path)
    path = branch_model(tmp_path / "good.onnx", "MatMul")  # the same graph with the expected pattern fuses
    assert fuse_resident(path) == 1


def test_a_mask_fed_by_a_graph_input_is_one_stage_error(tmp_path):
    path = branch_model(tmp_path / "odd.onnx", "MatMul", mask_input="x")
    with pytest.raises(StageError, match=re.escape(str(path))):
        fuse_resident(path)


# --- olive_lab.LoraResidentSwiGlu: the gate/up slot with the MLP's activation folded in --------------------------


@pytest.fixture(scope="module")
def swiglu_op(library):
    return op_session(library, swiglu=True)


@pytest.mark.parametrize("shape", [v for v in SHAPES.values() if v[2] % 2 == 0], ids=[k for k, v in SHAPES.items() if v[2] % 2 == 0])  # fmt: skip
def test_swiglu_op_matches_numpy_within_float16_rounding(swiglu_op, shape):
    """out = silu(z[:, :N/2]) * z[:, N/2:] of LoraResident's z, rounded once: within a float16 ulp of numpy's float32
    and closer than the builder's Split, Sigmoid and two Muls, which round z, the sigmoid and each product."""
    rows, k, n, r, active = shape
    for seed in (0, 1):
        check = op_error(swiglu_op, rows, k, n, r, active, seed=seed)
        assert check["max_abs"] > 5, check
        assert check["max_abs_error"] <= REL_BOUND * check["max_abs"], check
        assert check["no_adapter_is_swiglu_of_y"], check
        assert check["max_abs_error"] <= check["onnx_nodes_max_abs_error"], check


def test_swiglu_op_gates_with_the_first_half(swiglu_op):
    """The bound above tells the right activation from the halves swapped or the adapter left out."""
    from olive_lab.kernels import swiglu

    feeds = random_inputs(3, 96, 64, 32, (0, 16))
    (out,) = swiglu_op.run(["out"], feeds)
    assert out.shape == (3, 32)
    ref = swiglu(reference(feeds))
    bound = REL_BOUND * np.abs(ref).max()
    assert np.abs(out - ref).max() <= bound
    z = reference(feeds)
    wrong = {"halves swapped": swiglu(np.concatenate([z[:, 32:], z[:, :32]], axis=1)),
             "no adapter": swiglu(feeds["y"].astype(np.float32))}  # fmt: skip
    for what, value in wrong.items():
        assert np.abs(out - value).max() > 50 * bound, what


def test_swiglu_op_with_an_odd_width_is_one_error(swiglu_op):
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    feeds = random_inputs(2, 16, 9, 4, (0, 4))
    with pytest.raises(InvalidArgument, match=re.escape("LoraResidentSwiGlu: y [..., 9] has an odd last dimension")):
        swiglu_op.run(["out"], feeds)
    good = random_inputs(2, 16, 8, 4, (0, 4))
    assert swiglu_op.run(["out"], good)[0].shape == (2, 4)  # and the session still computes


@pytest.fixture(scope="module")
def phi3_fused(tmp_path_factory) -> dict:
    """A tiny Phi-3 (packed gate_up_proj) built for CUDA (float16) in the resident layout, fused two ways: LoraResident
    only (split.onnx) and then with fuse_swiglu (swiglu.onnx), both beside the weights."""
    import yaml

    from olive_lab.base_model import materialize
    from olive_lab.lora import random_adapter

    root = tmp_path_factory.mktemp("phi3_fused")
    conf = yaml.safe_load((Path(__file__).parents[1] / "conf/model/tiny_phi3.yaml").read_text())
    base = root / "base"
    materialize(conf, base)
    peft = random_adapter(base, root / "peft", seed=0, r=4, target_modules=conf["lora_targets"])
    fp16 = dict(precision="int4", block_size=GROUP, accuracy_level=4, execution_provider="cuda")
    build_onnx(base, root / "resident", {"a": peft}, **fp16, lora_layout="resident")
    model_dir = root / "resident" / "model"
    shutil.copyfile(model_dir / "model.onnx", model_dir / "split.onnx")
    fuse_resident(model_dir / "split.onnx")
    shutil.copyfile(model_dir / "split.onnx", model_dir / "swiglu.onnx")
    return {
        "swiglu_count": fuse_swiglu(model_dir / "swiglu.onnx"),
        "split": model_dir / "split.onnx",
        "swiglu": model_dir / "swiglu.onnx",
        "masks": read_adapter(root / "resident" / "adapters" / "a.onnx_adapter"),
    }


def test_fuse_swiglu_folds_the_mlp_activation_into_each_gate_up_slot(phi3_fused):
    split, fused = graph_of(phi3_fused["split"]), graph_of(phi3_fused["swiglu"])
    assert phi3_fused["swiglu_count"] == 2  # one gate/up slot per layer
    before = Counter((n.domain, n.op_type) for n in split.graph.node)
    after = Counter((n.domain, n.op_type) for n in fused.graph.node)
    # per layer: the Split, the Sigmoid and both Muls are gone, the slot's op is the SwiGlu one
    gone = Counter({("", "Split"): 2, ("", "Sigmoid"): 2, ("", "Mul"): 4, (FUSED_DOMAIN, FUSED_OP): 2})
    assert after == before - gone + Counter({(FUSED_DOMAIN, SWIGLU_OP): 2})
    for node in (n for n in fused.graph.node if n.op_type == SWIGLU_OP):
        assert "gate_up_proj" in node.input[2] and node.output[0].endswith("/mlp/Mul/output_0"), node
        down = next(n for n in fused.graph.node if n.op_type == "MatMulNBits" and node.output[0] in n.input)
        assert "down_proj" in down.name


def test_fuse_swiglu_model_follows_the_unfused_one(phi3_fused, library):
    """Same logits with no adapter and with one (prefill and a decoding step), to float16 rounding: the op rounds z,
    the sigmoid and the products once instead of four times."""
    split, fused = Decoder(phi3_fused["split"], library), Decoder(phi3_fused["swiglu"], library)
    none = split.run(IDS, NEXT_ID)
    for adapter in (None, phi3_fused["masks"]):
        for got, want, base in zip(fused.run(IDS, NEXT_ID, adapter), split.run(IDS, NEXT_ID, adapter), none, strict=True):  # fmt: skip
            assert got.shape == want.shape and np.abs(got - want).max() <= ADAPTER_TOL
            if adapter is not None:
                assert np.abs(got - base).max() > 10 * ADAPTER_TOL  # the adapter is still applied


def test_fuse_swiglu_folds_llamas_packed_mlp_and_leaves_a_half_read_elsewhere(fused, tmp_path):
    """optimize builds every model with fuse_mlp_gate_up, so Llama's MLP has the same Split; but a slot whose gate
    half is also read elsewhere (here: a graph output) keeps its nodes, graph unchanged."""
    import onnx
    from onnx import TensorProto, helper

    path = tmp_path / "fused.onnx"
    shutil.copyfile(fused["fused"], path)
    shutil.copyfile(path, tmp_path / "read.onnx")
    assert fuse_swiglu(path) == 2
    model = graph_of(tmp_path / "read.onnx")
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    for split in splits:
        model.graph.output.append(helper.make_tensor_value_info(split.output[0], TensorProto.FLOAT16, None))
    onnx.save(model, str(tmp_path / "read.onnx"))
    before = [(n.op_type, n.name) for n in graph_of(tmp_path / "read.onnx").graph.node]
    assert len(splits) == 2 and fuse_swiglu(tmp_path / "read.onnx") == 0
    assert [(n.op_type, n.name) for n in graph_of(tmp_path / "read.onnx").graph.node] == before


# --- olive_lab.LoraBranch: the CPU op of layout "fused" (float16 adapter inputs, packed B) -------------------------

BRANCH_SHAPES = [  # (rows, K, part widths, rank): 135M's qkv and down slots, ragged widths and ranks, a prefill
    (1, 576, (576, 192, 192), 16),
    (1, 1536, (576,), 16),
    (3, 100, (13, 27), 5),
    (7, 37, (9,), 3),
    (2, 64, (1536, 1536), 24),
]


def branch_feeds(rows: int, k: int, parts: tuple[int, ...], r: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = sum(parts)
    return {
        "y": rng.standard_normal((rows, n)).astype(np.float32),
        "x": rng.standard_normal((rows, k)).astype(np.float32),
        "A": (rng.standard_normal((k, len(parts) * r)) / np.sqrt(k)).astype(F16),
        "B": rng.standard_normal((r, n)).astype(F16),
        "parts": np.array(parts, np.int64),
    }


@pytest.fixture(scope="module")
def branch_op(library):
    from olive_lab.kernels import branch_session

    return branch_session(library)


@pytest.mark.parametrize("shape", BRANCH_SHAPES)
def test_branch_op_matches_numpy(branch_op, shape):
    """Each part's columns read their own block of x @ A (a wrong block or B read as [N, r] is far off)."""
    from olive_lab.kernels import branch_reference

    feeds = branch_feeds(*shape)
    (out,) = branch_op.run(["out"], feeds)
    ref = branch_reference(*(feeds[k] for k in ("y", "x", "A", "B")), shape[2])
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    if len(shape[2]) > 1:  # every part with part 0's block: wrong where the parts differ
        wrong = feeds["y"] + (feeds["x"] @ feeds["A"][:, : shape[3]].astype(np.float32)) @ feeds["B"].astype(np.float32)
        assert np.abs(out - wrong).max() > 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("shape", [(1, 2048, (2048, 512, 512), 16), (1, 8192, (2048,), 16), (9, 576, (576, 192), 16)])
def test_branch_op_split_over_two_threads_matches_numpy(library, shape):
    """With 2 intra-op threads a decoding slot of 192 KB or more of adapter splits K and the columns over ORT's
    thread pool (the partial sums of x @ A added), and a prefill splits its rows; a smaller slot stays on one."""
    from olive_lab.kernels import branch_reference, branch_session

    feeds = branch_feeds(*shape)
    ref = branch_reference(*(feeds[k] for k in ("y", "x", "A", "B")), shape[2])
    for threads in (1, 2):
        (out,) = branch_session(library, threads).run(["out"], feeds)
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), threads


ISAS = {
    "portable": (),
    "avx": ("avx", "fma", "f16c"),
    "avx2": ("avx", "avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl"),
}
# The same arithmetic in both (only int8's widening instruction differs), so the same bits: the library's own
# answer (kernels_isa) tells them apart instead
SAME_BITS = {("avx", "avx2")}


def cpu_isas() -> list[str]:
    """The ISAs of ISAS this CPU has, narrowest first (/proc/cpuinfo's flags)."""
    from olive_lab.decode import cpu_flags

    flags = cpu_flags()
    return [isa for isa, needs in ISAS.items() if all(f in flags for f in needs)]


@pytest.mark.parametrize("int8", [False, True], ids=["float16", "int8"])
def test_branch_op_kernels_for_each_isa_match_numpy(library, tmp_path, int8):
    """OLIVE_LAB_KERNELS_ISA (read once per process, so each in a child) runs the portable C++ loop (CPUs without
    AVX, FMA and F16C, and non-x86 hosts), the 8-wide AVX or AVX2 kernel or the 16-wide AVX-512 one: each to
    float32 rounding of numpy, and the library says it ran the one asked for. Their sums run in different orders
    (but AVX's and AVX2's), so each ISA's output differs in some bits from the others': an ISA that silently ran
    another's kernel would not."""
    import subprocess
    import sys

    from olive_lab.kernels import branch_reference, branch_reference_int8

    isas = cpu_isas()
    make = q8_feeds if int8 else branch_feeds
    names = ("y", "x", "A", "B", "scale", "parts") if int8 else ("y", "x", "A", "B", "parts")
    feeds = {i: make(*shape, seed=i) for i, shape in enumerate(BRANCH_SHAPES)}
    np.savez(tmp_path / "feeds.npz", **{f"{i}_{k}": v for i, f in feeds.items() for k, v in f.items()})
    outs = {}
    for isa in isas:
        script = f"""
import numpy as np
from pathlib import Path
from olive_lab.kernels import branch_session, kernels_isa
s = branch_session(Path({str(library)!r}), int8={int8})
d = np.load({str(tmp_path / "feeds.npz")!r})
outs = {{str(i): s.run(["out"], {{k: d[f"{{i}}_{{k}}"] for k in {names!r}}})[0] for i in range({len(feeds)})}}
np.savez({str(tmp_path / f"out-{isa}.npz")!r}, **outs)
print(kernels_isa(Path({str(library)!r})))
"""
        env = {**__import__("os").environ, "OLIVE_LAB_KERNELS_ISA": isa}
        done = subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=Path(__file__).parents[1],
                              capture_output=True, text=True)  # fmt: skip
        assert done.stdout.split() == [isa], done.stdout
        outs[isa] = np.load(tmp_path / f"out-{isa}.npz")
        for i, shape in enumerate(BRANCH_SHAPES):
            f = feeds[i]
            if int8:
                ref = branch_reference_int8(f["y"], f["x"], f["A"], f["B"], f["scale"], shape[2])
            else:
                ref = branch_reference(f["y"], f["x"], f["A"], f["B"], shape[2])
            assert np.abs(outs[isa][str(i)] - ref).max() <= 1e-5 * np.abs(ref).max(), (isa, shape)
    for one, other in itertools.combinations(isas, 2):
        if (one, other) in SAME_BITS:
            assert all(np.array_equal(outs[one][k], outs[other][k]) for k in outs[one].files), (one, other)
            continue
        assert any(not np.array_equal(outs[one][k], outs[other][k]) for k in outs[one].files), (one, other)


def test_the_default_kernel_isa_is_the_widest_the_cpu_has(library):
    """With no OLIVE_LAB_KERNELS_ISA the library picks the last ISA of ISAS whose flags /proc/cpuinfo shows (an AVX2
    host without AVX-512 gets avx2, whose int8 widening made int8 adapters pay there)."""
    import os
    import subprocess
    import sys

    widest = cpu_isas()[-1]
    env = {k: v for k, v in os.environ.items() if k != "OLIVE_LAB_KERNELS_ISA"}
    script = f"from pathlib import Path; from olive_lab.kernels import kernels_isa; print(kernels_isa(Path({str(library)!r})))"
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert done.stdout.strip() == widest


def test_an_unknown_kernel_isa_is_named_on_stderr(library):
    """OLIVE_LAB_KERNELS_ISA=avx10 (not a name the library knows) runs the default kernel, and says so in one line
    instead of measuring it under the name asked for."""
    import subprocess
    import sys

    script = f"""
import numpy as np
from pathlib import Path
from olive_lab.kernels import branch_session
f = {{"y": np.zeros((1, 8), np.float32), "x": np.ones((1, 4), np.float32), "A": np.ones((4, 2), np.float16),
     "B": np.ones((2, 8), np.float16), "parts": np.array([8], np.int64)}}
print(branch_session(Path({str(library)!r})).run(["out"], f)[0][0, 0])
"""
    env = {**__import__("os").environ, "OLIVE_LAB_KERNELS_ISA": "avx10"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert float(done.stdout) == 8.0
    assert "OLIVE_LAB_KERNELS_ISA=avx10 is not portable, avx, avx2 or avx512" in done.stderr


def test_branch_op_with_rank_zero_returns_y(branch_op):
    """The graph's defaults (no adapter): A [K, 0], B [0, N] copy y bit for bit."""
    feeds = branch_feeds(4, 64, (64, 32), 16)
    feeds |= {"A": np.zeros((64, 0), F16), "B": np.zeros((0, 96), F16)}
    (out,) = branch_op.run(["out"], feeds)
    assert np.array_equal(out, feeds["y"])


def q8_feeds(rows: int, k: int, parts: tuple[int, ...], r: int, seed: int = 0) -> dict[str, np.ndarray]:
    from olive_lab.kernels import quantize_branch_int8

    feeds = branch_feeds(rows, k, parts, r, seed)
    qa, qb, scale = quantize_branch_int8(feeds["A"], feeds["B"], parts)
    return {"y": feeds["y"], "x": feeds["x"], "A": qa, "B": qb, "scale": scale, "parts": feeds["parts"]}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [*BRANCH_SHAPES, (1, 2048, (2048, 512, 512), 16), (1, 8192, (2048,), 16)])
def test_branch_q8_op_matches_numpy_and_the_float16_adapter_it_quantizes(library, shape, threads):
    """LoraBranchQ8 computes its own int8 inputs' sum exactly (to float32 rounding), split over threads or not, and
    stays within int8 rounding of LoraBranch on the float16 adapter it was made from: a scale applied to the wrong
    columns, or per part where it is per row, is far off both."""
    from olive_lab.kernels import branch_reference, branch_reference_int8, branch_session

    feeds = q8_feeds(*shape)
    (out,) = branch_session(library, threads, int8=True).run(["out"], feeds)
    ref = branch_reference_int8(*(feeds[k] for k in ("y", "x", "A", "B", "scale")), shape[2])
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    f16 = branch_feeds(*shape)
    delta_f16 = branch_reference(*(f16[k] for k in ("y", "x", "A", "B")), shape[2]) - f16["y"]
    # two int8 roundings of at most 1/254 of a slice's largest value each, on sums of r (and K) random terms
    assert np.abs((out - feeds["y"]) - delta_f16).max() <= 0.03 * np.abs(delta_f16).max()
    wrong = feeds | {"scale": np.roll(feeds["scale"], 1)}
    (off,) = branch_session(library, threads, int8=True).run(["out"], wrong)
    assert np.abs((off - feeds["y"]) - delta_f16).max() > 0.05 * np.abs(delta_f16).max()


def test_branch_q8_rank_zero_returns_y_and_a_scale_that_does_not_fit_is_one_error(library):
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    from olive_lab.kernels import branch_session

    session = branch_session(library, int8=True)
    feeds = q8_feeds(4, 64, (64, 32), 16)
    idle = feeds | {"A": np.zeros((64, 0), np.int8), "B": np.zeros((0, 96), np.int8), "scale": np.zeros(0, np.float32)}
    assert np.array_equal(session.run(["out"], idle)[0], feeds["y"])
    with pytest.raises(
        InvalidArgument, match=re.escape("LoraBranchQ8: scale [31] must be [32], one factor per column")
    ):
        session.run(["out"], feeds | {"scale": feeds["scale"][:31]})


def test_branch_shapes_that_do_not_fit_are_one_error_from_the_kernel(branch_op):
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    feeds = branch_feeds(2, 64, (64, 32), 16)
    for change, message in [
        (
            {"parts": np.array([64, 16], np.int64)},
            "LoraBranch: parts [64, 16] must be positive widths that sum to y's last dimension, 96",
        ),  # fmt: skip
        ({"parts": np.array([96, 0], np.int64)}, "LoraBranch: parts [96, 0] must be positive"),
        (
            {"A": feeds["A"][:, :24]},
            "LoraBranch: A [64, 24], B [16, 96] do not fit x [..., 64], y [..., 96] and 2 parts",
        ),
        ({"B": feeds["B"][:, :90]}, "LoraBranch: A [64, 32], B [16, 90] do not fit"),
        ({"x": feeds["x"][:1]}, "LoraBranch: x and y differ in their leading dimensions"),
    ]:
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            branch_op.run(["out"], feeds | change)


def test_fuse_branches_on_a_graph_without_the_branch_is_one_stage_error(tmp_path):
    """A slot whose LoRA inputs feed something other than MatMul A -> MatMul B -> Add: one line naming it."""
    import onnx

    from olive_lab.onnx.lora import LoraSlot, fuse_branches

    slot = LoraSlot(0, "model.layers.0.attn.o_proj", ("o_proj",), (4,), 4, "float16")
    path = branch_model(tmp_path / "resident.onnx", "MatMul")  # a resident branch: a Mul sits between the MatMuls
    model = onnx.load(str(path))
    for value in [*model.graph.input, *(n for n in model.graph.node)]:  # the slot's own input names
        if isinstance(value, onnx.ValueInfoProto):
            value.name = {"A": slot.a, "B": slot.b}.get(value.name, value.name)
        else:
            value.input[:] = [{"A": slot.a, "B": slot.b}.get(i, i) for i in value.input]
    onnx.save(model, str(path))
    with pytest.raises(StageError, match=re.escape(f"{path}: model.layers.0.attn.o_proj's LoRA inputs are not in a branch (MatMul A, MatMul B, Add)")):  # fmt: skip
        fuse_branches(path, [slot])


# --- optimize.lora_layout=fused on the CPU, through build_onnx and ORT GenAI ---------------------------------------


@pytest.fixture(scope="module")
def cpu_builds(tiny_base, tiny_adapters, tmp_path_factory) -> dict[str, Path]:
    """The tiny model for the CPU (float32) in the fused layout and in the default branches layout, plus
    "branches_f16": the branches model with its adapters rounded to float16, the values the fused adapters hold."""
    root = tmp_path_factory.mktemp("cpu_fused")
    fp32 = dict(precision="int4", block_size=GROUP, accuracy_level=4, execution_provider="cpu")
    for layout in ("fused", "branches"):
        build_onnx(tiny_base, root / layout, tiny_adapters, **fp32, lora_layout=layout)
    build_onnx(tiny_base, root / "fused_int8", tiny_adapters, **fp32, lora_layout="fused", adapter_dtype="int8")
    (root / "branches_f16").mkdir()
    (root / "branches_f16" / "model").symlink_to(root / "branches" / "model")
    (root / "branches_f16" / "adapters").mkdir()
    for path in (root / "branches" / "adapters").glob("*.onnx_adapter"):
        values = {k: v.astype(F16).astype(np.float32) for k, v in read_adapter(path).items()}
        write_adapter(values, root / "branches_f16" / "adapters" / path.name)
    return {layout: root / layout for layout in ("fused", "branches", "branches_f16", "fused_int8")}


def greedy_tokens(root: Path, names: list[str]) -> list[list[int]]:
    """ORT GenAI greedy tokens of the model under `root` with no adapter, each adapter, then back, on one model."""
    import onnxruntime_genai as og

    from olive_lab.decode import ort_greedy

    model = og.Model(str(root / "model"))
    adapters = og.Adapters(model)
    for name in names:
        adapters.load(str(root / "adapters" / f"{name}.onnx_adapter"), name)
    return [ort_greedy(model, adapters, IDS, name, 12, exact=True)[0] for name in [None, *names, None, *names[::-1]]]


def test_linked_copy_of_a_fused_model_loads_from_another_working_directory(cpu_builds, tmp_path, monkeypatch):
    """The benches decode linked copies of model folders. ORT GenAI resolves a custom-ops library's links and loads it
    only from inside the model folder or the working directory: a copy whose library links to the original (outside
    both) would fail in og.Model, so linked_copy copies the library and links the rest."""
    import onnxruntime_genai as og

    from olive_lab.decode import linked_copy

    monkeypatch.chdir(tmp_path)
    copy = linked_copy(cpu_builds["fused"] / "model", tmp_path / "copy")
    assert (copy / LIBRARY).is_file() and not (copy / LIBRARY).is_symlink()
    assert (copy / "model.onnx.data").is_symlink()
    linked_copy(cpu_builds["fused"] / "model", copy)  # again over the same folder: the library copied anew
    og.Model(str(copy))


def test_fused_layout_is_a_self_contained_ort_genai_model(cpu_builds):
    """build_onnx puts the library in the model folder and names it relatively in genai_config.json; ORT GenAI
    loads it from there, and its greedy tokens (no adapter, each adapter, switching back and forth on one model)
    are those of the branches layout with the same float16 adapter values."""
    model_dir = cpu_builds["fused"] / "model"
    config = json.loads((model_dir / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["custom_ops_library"] == LIBRARY
    assert (model_dir / LIBRARY).is_file()
    names = sorted(p.stem for p in (cpu_builds["fused"] / "adapters").glob("*.onnx_adapter"))
    fused = greedy_tokens(cpu_builds["fused"], names)
    assert fused == greedy_tokens(cpu_builds["branches_f16"], names)
    assert len({tuple(t) for t in fused[: 1 + len(names)]}) == 1 + len(names)  # each adapter changes them


def test_fused_layout_logits_follow_the_branches_layout(cpu_builds):
    """The optimize stage's own check path (OnnxLM registers the library from genai_config.json): full-sequence
    logits of the fused layout and of branches with the same float16 adapter values, with each adapter, to float32
    rounding; against branches' float32 adapter, to float16 rounding of the adapter."""
    from olive_lab.onnx.check import OnnxLM

    lms = {layout: OnnxLM(root / "model") for layout, root in cpu_builds.items() if layout != "fused_int8"}
    for adapter in sorted((cpu_builds["fused"] / "adapters").glob("*.onnx_adapter")):
        values = {layout: read_adapter(root / "adapters" / adapter.name) for layout, root in cpu_builds.items()}
        fused = lms["fused"].logits(IDS, values["fused"])
        same, branches = (lms["branches"].logits(IDS, values[k]) for k in ("branches_f16", "branches"))
        plain = lms["branches"].logits(IDS)
        scale, effect = np.abs(branches).max(), np.abs(branches - plain).max()
        assert effect > 0.1 * scale  # the adapter is applied
        assert np.abs(fused - same).max() <= 1e-5 * scale  # seen: 5e-7
        # float16 rounds each weight by up to 2^-11: seen 0.5 % of the adapter's effect on the logits
        assert 1e-6 * scale < np.abs(fused - branches).max() <= 0.01 * effect


def test_fused_adapters_are_float16_without_the_block_diagonal(cpu_builds, tiny_base):
    """The fused adapter holds, per slot, A [in, parts x rank] and B [rank, out] in float16, where branches holds a
    float32 B [parts x rank, out] that is block-diagonal: under a third of the bytes for qkv and gate_up."""
    config = json.loads((tiny_base / "config.json").read_text())
    for path in (cpu_builds["fused"] / "adapters").glob("*.onnx_adapter"):
        fused, branches = read_adapter(path), read_adapter(cpu_builds["branches"] / "adapters" / path.name)
        assert fused.keys() == branches.keys()
        qkv_a, qkv_b = (fused[f"model.layers.0.attn.qkv_proj.lora_{m}.weight"] for m in "AB")
        rank = qkv_b.shape[0]
        assert qkv_a.dtype == qkv_b.dtype == F16
        assert qkv_a.shape == (config["hidden_size"], 3 * rank) and qkv_b.shape[0] == rank
        assert all(v.dtype == F16 for v in fused.values())
        for name in (n for n in fused if n.endswith("lora_B.weight")):  # B: one block of rows, the same columns
            assert fused[name].shape[1] == branches[name].shape[1]
        assert sum(v.nbytes for v in fused.values()) <= sum(v.nbytes for v in branches.values()) / 3


def test_fused_graph_has_one_branch_op_per_slot(cpu_builds):
    import onnx

    model = onnx.load(str(cpu_builds["fused"] / "model" / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops[BRANCH_OP] == 8 and ops["MatMul"] == 0  # 2 layers x 4 slots; no float MatMul left
    inputs = {i.name: i for i in model.graph.input}
    a = inputs["model.layers.0.attn.qkv_proj.lora_A.weight"].type.tensor_type
    assert a.elem_type == onnx.TensorProto.FLOAT16
    parts = {t.name: list(t.int64_data) for t in model.graph.initializer if t.name.endswith(".lora_parts")}
    assert len(parts) == 8
    config = json.loads((cpu_builds["fused"] / "model" / "genai_config.json").read_text())["model"]
    heads, kv = config["decoder"]["num_attention_heads"], config["decoder"]["num_key_value_heads"]
    head = config["decoder"]["head_size"]
    assert parts["model.layers.0.attn.qkv_proj.lora_parts"] == [heads * head, kv * head, kv * head]


def test_int8_adapters_follow_the_float32_adapter_at_half_the_bytes(cpu_builds):
    """optimize.adapter_dtype=int8: LoraBranchQ8 nodes, adapters of int8 A and B plus a float32 scale per column of
    A, about half of float16's bytes. With no adapter the logits are the float16 model's bit for bit; with each
    adapter its effect on the logits is within int8 rounding of the float32 adapter's (branches)."""
    import onnx

    from olive_lab.onnx.check import OnnxLM

    model = onnx.load(str(cpu_builds["fused_int8"] / "model" / "model.onnx"), load_external_data=False)
    assert Counter(n.op_type for n in model.graph.node)[BRANCH_Q8_OP] == 8
    lms = {layout: OnnxLM(cpu_builds[layout] / "model") for layout in ("fused_int8", "fused", "branches")}
    assert np.array_equal(lms["fused_int8"].logits(IDS), lms["fused"].logits(IDS))
    for adapter in sorted((cpu_builds["fused_int8"] / "adapters").glob("*.onnx_adapter")):
        int8 = read_adapter(adapter)
        f16 = read_adapter(cpu_builds["fused"] / "adapters" / adapter.name)
        assert {v.dtype for k, v in int8.items() if "lora_scale" not in k} == {np.dtype(np.int8)}
        assert sum(v.nbytes for v in int8.values()) <= 0.6 * sum(v.nbytes for v in f16.values())
        branches = read_adapter(cpu_builds["branches"] / "adapters" / adapter.name)
        want, plain = lms["branches"].logits(IDS, branches), lms["branches"].logits(IDS)
        got = lms["fused_int8"].logits(IDS, int8)
        effect = np.abs(want - plain).max()
        assert effect > 0.1 * np.abs(want).max()  # the adapter is applied
        # int8 rounds a weight by up to 1/254 of its slice's largest: 0.55 % of A @ B here, against float16's 0.03 %;
        # seen on the logits: 3.6 % of the adapter's largest effect, 2.6 % of its RMS (float16: 0.5 % of the largest)
        err = got - want
        assert np.abs(err).max() <= 0.06 * effect
        assert np.sqrt(np.mean(err**2)) <= 0.04 * np.sqrt(np.mean((want - plain) ** 2))


def test_int8_adapters_are_refused_outside_the_cpu_fused_layout(tiny_base, tiny_adapters, tmp_path):
    with pytest.raises(StageError, match=re.escape("optimize.adapter_dtype=int8 is for optimize.lora_layout=fused on the CPU")):  # fmt: skip
        build_onnx(tiny_base, tmp_path / "x", tiny_adapters, precision="int4", block_size=GROUP,
                   execution_provider="cpu", lora_layout="branches", adapter_dtype="int8")  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_fused_layout_on_phi3s_fused_modules(tmp_path):
    """Phi-3 trains qkv_proj and gate_up_proj as one module each (one part per slot, B [rank, out] as PEFT has it):
    the fused model's logits follow branches' with the same float16 adapter values."""
    import yaml

    from olive_lab.base_model import materialize
    from olive_lab.lora import random_adapter
    from olive_lab.onnx.check import OnnxLM

    conf = yaml.safe_load((Path(__file__).parents[1] / "conf/model/tiny_phi3.yaml").read_text())
    base = tmp_path / "base"
    materialize(conf, base)
    peft = random_adapter(base, tmp_path / "peft", seed=0, r=4, target_modules=conf["lora_targets"])
    fp32 = dict(precision="int4", block_size=GROUP, accuracy_level=4, execution_provider="cpu")
    for layout in ("fused", "branches"):
        build_onnx(base, tmp_path / layout, {"a": peft}, **fp32, lora_layout=layout)
    fused_values = read_adapter(tmp_path / "fused/adapters/a.onnx_adapter")
    branch_values = read_adapter(tmp_path / "branches/adapters/a.onnx_adapter")
    qkv = "model.layers.0.attn.qkv_proj.lora_{}.weight"
    assert fused_values[qkv.format("B")].shape == branch_values[qkv.format("B")].shape  # one part: nothing to pack
    rounded = {k: v.astype(F16).astype(np.float32) for k, v in branch_values.items()}
    fused = OnnxLM(tmp_path / "fused/model").logits(IDS, fused_values)
    same = OnnxLM(tmp_path / "branches/model").logits(IDS, rounded)
    plain = OnnxLM(tmp_path / "branches/model").logits(IDS)
    scale = np.abs(same).max()
    assert np.abs(same - plain).max() > 0.01 * scale  # the adapter is applied
    assert np.abs(fused - same).max() <= 1e-5 * scale
