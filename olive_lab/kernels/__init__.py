"""olive_lab's ONNX Runtime custom-op library (libolive_lab_kernels.so): today one op, olive_lab.LoraResident.

It fuses the resident multi-LoRA branch of a projection (olive_lab.onnx.lora.fuse_resident) into two CUDA launches
instead of ORT's five. The library is C++ (lora_resident.cc: the op's contract and the ORT ABI it uses) plus CUDA
kernels (lora_resident_cuda.cu), built here with the host's compilers:
- `build(out_dir, cuda=False)`: g++ only, CPU reference kernel (what the tests load into real ORT sessions);
- `build(out_dir, cuda=True)`: nvcc, CPU + CUDA kernels, CUDA runtime linked statically (`make gpu-kernels`, which
  the offline GPU host gets as a file, like the wheelhouse).
A model that uses the op carries the library in its folder, named in genai_config.json's
session_options.custom_ops_library (`attach`), which ORT GenAI resolves against the config's folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from olive_lab.errors import StageError

LIBRARY = "libolive_lab_kernels.so"
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
    sources = [str(SOURCES / "lora_resident.cc")]
    if cuda:
        cmd = [compiler, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-DOLIVE_LAB_CUDA", "--cudart",
               "static", *CUDA_ARCHS, *sources, str(SOURCES / "lora_resident_cuda.cu")]  # fmt: skip
    else:
        cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", *sources]
    tmp = out.with_suffix(".so.tmp")
    done = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
        raise StageError(f"olive_lab/kernels: {Path(compiler).name} failed building {LIBRARY}: {first}")
    tmp.replace(out)  # never a half-written library where a model points
    return out


def attach(model_dir: Path, library: Path) -> None:
    """Copy `library` into the ORT GenAI model folder and name it in genai_config.json (relative: the folder moves)."""
    if not library.is_file():
        raise StageError(f"{library}: no such kernel library (build it with `make gpu-kernels`)")
    shutil.copyfile(library, model_dir / LIBRARY)
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["custom_ops_library"] = LIBRARY
    path.write_text(json.dumps(config, indent=4) + "\n")


def op_session(library: Path, provider: str = "CPUExecutionProvider"):
    """An ORT session of one LoraResident node (inputs y, x, A, B, mask; output out), for checks and tests."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    names = ("y", "x", "A", "B", "mask")
    shapes = (["rows", "N"], ["rows", "K"], ["K", "R"], ["R", "N"], ["R"])
    node = helper.make_node("LoraResident", list(names), ["out", "partial"], domain="olive_lab")
    graph = helper.make_graph(
        [node],
        "lora_resident",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT16, s) for n, s in zip(names, shapes, strict=True)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, ["rows", "N"])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("olive_lab", 1)], ir_version=10
    )
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=[provider])


def op_error(session, rows: int, k: int, n: int, r: int, active: tuple[int, int], seed: int = 0) -> dict:
    """The op against numpy in float32 on random float16 inputs, the mask's ones on columns [active[0], active[1]):
    the largest absolute error, the same for the four ONNX nodes it replaces (which round x @ A, the mask product
    and the delta to float16 on the way; the op keeps them in float32), the reference's largest value, and whether
    an all-zero mask returns y exactly."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y = rng.standard_normal((rows, n)).astype(np.float16)
    x = rng.standard_normal((rows, k)).astype(np.float16)
    a = (rng.standard_normal((k, r)) / np.sqrt(k)).astype(np.float16)
    b = rng.standard_normal((r, n)).astype(np.float16)
    mask = np.zeros(r, np.float16)
    mask[active[0] : active[1]] = 1
    (out,) = session.run(["out"], {"y": y, "x": x, "A": a, "B": b, "mask": mask})
    ref = y.astype(np.float32) + ((x.astype(np.float32) @ a.astype(np.float32)) * mask) @ b.astype(np.float32)
    (idle,) = session.run(["out"], {"y": y, "x": x, "A": a, "B": b, "mask": np.zeros(r, np.float16)})
    f16 = np.float16
    hidden = ((x.astype(np.float32) @ a.astype(np.float32)).astype(f16) * mask).astype(f16)
    nodes = (y + (hidden.astype(np.float32) @ b.astype(np.float32)).astype(f16)).astype(np.float32)
    return {
        "max_abs_error": float(np.abs(out.astype(np.float32) - ref).max()),
        "onnx_nodes_max_abs_error": float(np.abs(nodes - ref).max()),
        "max_abs": float(np.abs(ref).max()),
        "no_adapter_returns_y": bool((idle == y).all()),
    }
