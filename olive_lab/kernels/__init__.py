"""olive_lab's ONNX Runtime custom-op library (libolive_lab_kernels.so), the ops of `optimize.lora_layout=fused`:
- olive_lab.LoraResident (lora_resident.cc, lora_resident_cuda.cu): the resident multi-LoRA branch of a projection
  (olive_lab.onnx.lora.fuse_resident) in one CUDA launch per decoding step instead of ORT's five; its CPU kernel is
  the reference the tests run; olive_lab.LoraResidentSwiGlu, the same for a packed gate/up projection, also applies
  the MLP's activation (olive_lab.onnx.lora.fuse_swiglu);
- olive_lab.LoraBranch (lora_branch.cc): the LoRA branch of a CPU model (olive_lab.onnx.lora.fuse_branches), whose
  adapter files hold float16 A and packed B matrices, a third of the bytes of the branches layout's.
The library is C++ against ORT's C API (ort_abi.h: the entries used, by position; library.cc: the entry point ORT
calls) plus CUDA kernels, built here with the host's compilers:
- `build(out_dir, cuda=False)`: g++ only, the CPU kernels;
- `build(out_dir, cuda=True)`: nvcc, CPU + CUDA kernels, CUDA runtime linked statically (`make gpu-kernels`, which
  the offline GPU host gets as a file, like the wheelhouse, named by $OLIVE_LAB_KERNELS).
`optimize.lora_layout=fused` builds the library for its provider (`library_for`) into the model folder.
A model that uses the ops carries the library in its folder, named in genai_config.json's
session_options.custom_ops_library (`attach`), which ORT GenAI resolves against the config's folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from olive_lab.errors import StageError

LIBRARY = "libolive_lab_kernels.so"
# A prebuilt CUDA library for a host without nvcc (the offline GPU host gets `make gpu-kernels`'s output this way)
PREBUILT_ENV = "OLIVE_LAB_KERNELS"
SOURCES = Path(__file__).parent
# SASS for Ampere (A100, sm_80) and Hopper (H100/H200, sm_90), plus PTX the driver can compile for newer GPUs
CUDA_ARCHS = ("-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
              "-gencode", "arch=compute_90,code=compute_90")  # fmt: skip


def build(out_dir: Path, cuda: bool = False) -> Path:
    """Compile the library into `out_dir`; one StageError line if the compiler is missing or fails."""
    compiler = shutil.which("nvcc" if cuda else "g++")
    if compiler is None:
        need = "nvcc (the CUDA toolkit)" if cuda else "g++"
        raise StageError(f"olive_lab/kernels: building {LIBRARY} needs {need} on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / LIBRARY
    sources = [str(SOURCES / name) for name in ("library.cc", "lora_resident.cc", "lora_branch.cc")]
    if cuda:
        cmd = [compiler, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-DOLIVE_LAB_CUDA", "--cudart",
               "static", *CUDA_ARCHS, *sources, str(SOURCES / "lora_resident_cuda.cu")]  # fmt: skip
    else:
        cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", *sources]
    tmp = out.with_suffix(".so.tmp")
    done = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
        raise StageError(f"olive_lab/kernels: {Path(compiler).name} failed building {LIBRARY}: {first}")
    tmp.replace(out)  # never a half-written library where a model points
    return out


def kernels_isa(library: Path) -> str:
    """The CPU kernels `library` runs in this process: "portable", "avx", "avx2" or "avx512" (the widest the CPU
    has, or what OLIVE_LAB_KERNELS_ISA asked for), as its LoraBranch ops choose it."""
    import ctypes

    chosen = ctypes.CDLL(str(library)).olive_lab_kernels_isa
    chosen.restype = ctypes.c_char_p
    return chosen().decode()


def library_for(execution_provider: str, work_dir: Path) -> Path:
    """The library a model for `execution_provider` needs: built into `work_dir` (g++ for CPU, nvcc for CUDA), or
    for CUDA the prebuilt one $OLIVE_LAB_KERNELS names."""
    prebuilt = os.environ.get(PREBUILT_ENV)
    if execution_provider == "cuda" and prebuilt:
        if not Path(prebuilt).is_file():
            raise StageError(f"${PREBUILT_ENV}={prebuilt}: no such file (build it with `make gpu-kernels`)")
        return Path(prebuilt)
    return build(work_dir / "kernels", cuda=execution_provider == "cuda")


def attach(model_dir: Path, library: Path) -> None:
    """Copy `library` into the ORT GenAI model folder and name it in genai_config.json (relative: the folder moves)."""
    if not library.is_file():
        raise StageError(f"{library}: no such kernel library (build it with `make gpu-kernels`)")
    shutil.copyfile(library, model_dir / LIBRARY)
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["custom_ops_library"] = LIBRARY
    path.write_text(json.dumps(config, indent=4) + "\n")


def register_for(options, model_dir: Path) -> None:
    """Register on ORT SessionOptions `options` the kernel library an ORT GenAI model folder names (layout "fused"),
    for plain ORT sessions of its model.onnx (ORT GenAI registers it itself)."""
    config = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
    if library := config.get("session_options", {}).get("custom_ops_library"):
        options.register_custom_ops_library(str(Path(model_dir) / library))


def op_session(library: Path, provider: str = "CPUExecutionProvider", dtype: str = "float16", swiglu: bool = False):
    """An ORT session of one LoraResident node (LoraResidentSwiGlu with `swiglu`; inputs y, x, A, B, mask of
    `dtype`; output out), for checks and tests."""
    import numpy as np
    import onnxruntime as ort
    from onnx import helper

    from olive_lab.onnx.lora import FUSED_DOMAIN, FUSED_OP, SWIGLU_OP

    names = ("y", "x", "A", "B", "mask")
    shapes = (["rows", "N"], ["rows", "K"], ["K", "R"], ["R", "N"], ["R"])
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node(SWIGLU_OP if swiglu else FUSED_OP, list(names), ["out", "partial"], domain=FUSED_DOMAIN)
    graph = helper.make_graph(
        [node],
        "lora_resident",
        [helper.make_tensor_value_info(n, elem, s) for n, s in zip(names, shapes, strict=True)],
        [helper.make_tensor_value_info("out", elem, ["rows", "H" if swiglu else "N"])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(FUSED_DOMAIN, 1)], ir_version=10
    )
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=[provider])


def swiglu(z):
    """The packed gate/up activation LoraResidentSwiGlu applies, in numpy: silu(first half) * second half."""
    import numpy as np

    gate, up = np.split(z, 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * up


def op_inputs(dtype, rows: int, k: int, n: int, r: int, active: tuple[int, int], seed: int = 0) -> dict:
    """Random feeds of op_session's node: y [rows, n], x [rows, k], A [k, r], B [r, n], the mask's ones on columns
    [active[0], active[1])."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y = rng.standard_normal((rows, n)).astype(dtype)
    x = rng.standard_normal((rows, k)).astype(dtype)
    a = (rng.standard_normal((k, r)) / np.sqrt(k)).astype(dtype)
    b = rng.standard_normal((r, n)).astype(dtype)
    mask = np.zeros(r, dtype)
    mask[active[0] : active[1]] = 1
    return {"y": y, "x": x, "A": a, "B": b, "mask": mask}


def op_error(session, rows: int, k: int, n: int, r: int, active: tuple[int, int], seed: int = 0) -> dict:
    """The op against numpy in float32 on random inputs of the session's type (op_session's dtype), the mask's ones
    on columns [active[0], active[1]): the largest absolute error, the same for the ONNX nodes it replaces (which
    round x @ A, the mask product and the delta to float16 on the way, and for LoraResidentSwiGlu z, the Sigmoid and
    both products; the op keeps them in float32), the reference's largest value, and whether an all-zero mask
    returns y exactly (LoraResidentSwiGlu: swiglu(y) within float16 rounding, `no_adapter_is_swiglu_of_y`), and
    whether a second run gives the same bits (`same_output_twice`: no sum whose order varies)."""
    import numpy as np

    gated = session.get_outputs()[0].shape[-1] == "H"

    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    feeds = op_inputs(dtype, rows, k, n, r, active, seed)
    y, x, a, b, mask = (feeds[name] for name in ("y", "x", "A", "B", "mask"))
    (out,) = session.run(["out"], feeds)
    (again,) = session.run(["out"], feeds)
    ref = y.astype(np.float32) + ((x.astype(np.float32) @ a.astype(np.float32)) * mask) @ b.astype(np.float32)
    (idle,) = session.run(["out"], {"y": y, "x": x, "A": a, "B": b, "mask": np.zeros(r, dtype)})
    f16 = dtype  # the ONNX nodes round to the graph's type
    hidden = ((x.astype(np.float32) @ a.astype(np.float32)).astype(f16) * mask).astype(f16)
    nodes = (y + (hidden.astype(np.float32) @ b.astype(np.float32)).astype(f16)).astype(np.float32)
    if not gated:
        idle_check = {"no_adapter_returns_y": bool((idle == y).all())}
    else:  # the builder's nodes: Split, Sigmoid, Mul, Mul, each rounding to the graph's type
        gate, up = np.split(nodes.astype(f16), 2, axis=-1)
        nodes = ((gate * (1 / (1 + np.exp(-gate.astype(np.float32)))).astype(f16)).astype(f16) * up).astype(np.float32)
        ref = swiglu(ref)
        base = swiglu(y.astype(np.float32))
        idle_error = np.abs(idle.astype(np.float32) - base).max()
        idle_check = {"no_adapter_is_swiglu_of_y": bool(idle_error <= 2**-10 * np.abs(base).max())}
    return {
        "max_abs_error": float(np.abs(out.astype(np.float32) - ref).max()),
        "onnx_nodes_max_abs_error": float(np.abs(nodes - ref).max()),
        "max_abs": float(np.abs(ref).max()),
        "same_output_twice": bool((again == out).all()),
        **idle_check,
    }


def branch_session(library: Path, threads: int = 1, int8: bool = False):
    """An ORT session (CPU, `threads` intra-op threads) of one LoraBranch node: inputs y, x (float32), A, B
    (float16), parts (int64); output out. `int8`: a LoraBranchQ8 node, A and B int8 and a float32 scale [R] between
    B and parts. For checks, tests and the bench."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from olive_lab.onnx.lora import BRANCH_OP, BRANCH_Q8_OP, FUSED_DOMAIN

    weights = TensorProto.INT8 if int8 else TensorProto.FLOAT16
    inputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "N"]),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", "K"]),
        helper.make_tensor_value_info("A", weights, ["K", "R"]),
        helper.make_tensor_value_info("B", weights, ["r", "N"]),
        *([helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["R"])] if int8 else []),
        helper.make_tensor_value_info("parts", TensorProto.INT64, ["P"]),
    ]
    op = BRANCH_Q8_OP if int8 else BRANCH_OP
    node = helper.make_node(op, [i.name for i in inputs], ["out"], domain=FUSED_DOMAIN)
    graph = helper.make_graph(
        [node], "lora_branch", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["rows", "N"])]
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(FUSED_DOMAIN, 1)], ir_version=10
    )
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def quantize_branch_int8(a, b, widths):
    """LoraBranchQ8's inputs from LoraBranch's (A [K, P * r], B [r, N], the parts' widths): A int8 per column and B
    int8 per row of each part's block of columns, symmetric. Column j of A and row j % r of part j // r's block of B
    both scale t[j] (t = x @ A), so their two factors meet in one scale [P * r]. Returns (A int8, B int8, scale)."""
    import numpy as np

    def symmetric(w, axis):  # int8 and the factor per slice along `axis`; an all-zero slice gets factor 1
        factor = np.abs(w).max(axis=axis, keepdims=True) / 127
        factor[factor == 0] = 1
        return np.clip(np.rint(w / factor), -127, 127).astype(np.int8), factor

    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    r = b.shape[0]
    qa, scale_a = symmetric(a, 0)
    qb = np.empty(b.shape, np.int8)
    scale = scale_a.reshape(-1).copy()
    col = 0
    for p, width in enumerate(widths):
        qb[:, col : col + width], scale_b = symmetric(b[:, col : col + width], 1)
        scale[p * r : (p + 1) * r] *= scale_b.reshape(-1)
        col += width
    return qa, qb, scale.astype(np.float32)


def branch_reference_int8(y, x, qa, qb, scale, parts):
    """LoraBranchQ8 in float32 numpy: LoraBranch's sum with t scaled."""
    import numpy as np

    r = qb.shape[0]
    out = y.astype(np.float32).copy()
    if r == 0:
        return out
    t = (x.astype(np.float32) @ qa.astype(np.float32)) * scale
    col = 0
    for p, width in enumerate(parts):
        out[..., col : col + width] += t[..., p * r : (p + 1) * r] @ qb[:, col : col + width].astype(np.float32)
        col += width
    return out


def branch_reference(y, x, a, b, parts):
    """LoraBranch in float32 numpy: for part p, its columns of y plus (x @ A's p-th block of columns) @ B's."""
    import numpy as np

    r = b.shape[0]
    out = y.astype(np.float32).copy()
    if r == 0:
        return out
    t = x.astype(np.float32) @ a.astype(np.float32)
    col = 0
    for p, width in enumerate(parts):
        out[..., col : col + width] += t[..., p * r : (p + 1) * r] @ b[:, col : col + width].astype(np.float32)
        col += width
    return out
