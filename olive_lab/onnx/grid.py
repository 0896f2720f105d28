"""The quantize stage's grid, carried into the ONNX model exactly.

The builder quantizes every MatMul itself, round-to-nearest from each block's min and max. That reproduces a weight
only when the weight's quantizer also took its scale from the final min/max (RTN, and AWQ's RTN step). GPTQ fixes a
block's scale first and then rounds error-compensated columns onto it, so many blocks never reach both ends of their
grid, and the builder's own min/max would pick another grid: a tiny GPTQ model moved 17 % of its weights that way.
So the quantize stage saves each weight's scales and zero points (GRID_FILE), and after the build the MatMulNBits
initializers are rewritten from them: the same integers, scales and zero points as torch, at 4 or 8 bits per node.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from olive_lab.errors import StageError
from olive_lab.int4_grid import GRID_FILE, META_FILE, read_grid

log = logging.getLogger(__name__)

# How the builder names a decoder projection's MatMul, from the Hugging Face weight(s) it holds: q/k/v are packed
# into one MatMul (fused qkv_proj in Phi-3 checkpoints), gate/up too (fuse_mlp_gate_up, or Phi-3's gate_up_proj).
ONNX_PROJECTION = {
    "q_proj": ("attn", "qkv_proj"),
    "k_proj": ("attn", "qkv_proj"),
    "v_proj": ("attn", "qkv_proj"),
    "qkv_proj": ("attn", "qkv_proj"),
    "o_proj": ("attn", "o_proj"),
    "gate_proj": ("mlp", "gate_up_proj"),
    "up_proj": ("mlp", "gate_up_proj"),
    "gate_up_proj": ("mlp", "gate_up_proj"),
    "down_proj": ("mlp", "down_proj"),
}
PART_ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")
WEIGHT = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight$")
QUANTIZED_NODE = re.compile(r"^(/model/layers\.\d+/(?:attn|mlp)/\w+_proj/MatMul)_Q\d+$")


def matmul_parts(weights: set[str] | list[str]) -> dict[str, list[str]]:
    """{builder MatMul node name: the checkpoint weights it holds, in the order it stacks them along N}."""
    packs: dict[str, list[str]] = {}
    for name in weights:
        match = WEIGHT.match(name)
        if match and match[2] in ONNX_PROJECTION:
            block, projection = ONNX_PROJECTION[match[2]]
            packs.setdefault(f"/model/layers.{match[1]}/{block}/{projection}/MatMul", []).append(name)
    order = {leaf: i for i, leaf in enumerate(PART_ORDER)}
    return {node: sorted(parts, key=lambda n: order[WEIGHT.match(n)[2]]) for node, parts in packs.items()}


def int8_matmuls(hf_dir: Path, weights: set[str]) -> list[str]:
    """The MatMul nodes the export keeps at int8: those holding the weights the quantize stage put on an int8 grid
    (META_FILE "int8"). A packed MatMul needs all of its parts at int8, else one line saying which is not."""
    int8 = set(read_grid(hf_dir).get("int8", []))
    if not int8:
        return []
    packs = matmul_parts(weights)
    unknown = sorted(int8 - {p for parts in packs.values() for p in parts})
    if unknown:
        raise StageError(f"{hf_dir / META_FILE}: int8 weight '{unknown[0]}' is not a decoder projection of the model")
    nodes = []
    for node, parts in sorted(packs.items()):
        if set(parts) & int8:
            if set(parts) - int8:
                raise StageError(
                    f"{hf_dir / META_FILE}: {node} packs {', '.join(parts)}, but {sorted(set(parts) - int8)[0]} is "
                    "int4 while the others are int8 (list all or none of them in quantize.int8_modules)"
                )
            nodes.append(node)
    return nodes


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values along the last axis, as MatMulNBits stores them: bytes, low nibble first at 4 bits."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def node_tensors(
    weight: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, block: int
) -> dict[str, np.ndarray]:
    """MatMulNBits' B, scales and zero_points for an [N, K] weight on the grid given by `scale` and `zero` ([N, K /
    block], signed zero points as compressed-tensors keeps them: w = (q - zero) * scale)."""
    n, k = weight.shape
    blocks = k // block
    offset = 2 ** (bits - 1)  # compressed-tensors' signed integers -> MatMulNBits' unsigned ones
    grouped = weight.reshape(n, blocks, block).astype(np.float64)
    q = np.rint(grouped / scale.reshape(n, blocks, 1).astype(np.float64)) + zero.reshape(n, blocks, 1)
    q = np.clip(q + offset, 0, 2**bits - 1)
    return {
        "B": _pack(q, bits),
        "scales": scale.reshape(-1),
        "zero_points": _pack((zero.astype(np.int32) + offset).reshape(n, blocks), bits).reshape(-1),
    }


def write_torch_grid(model_path: Path, hf_dir: Path) -> int:
    """Rewrite every decoder MatMulNBits of `model_path` onto the grid the quantize stage saved in `hf_dir`
    (GRID_FILE); returns how many. Shapes and types do not change, so the bytes are replaced in place, in the
    external data file or in the graph. Nothing to do (0) for a folder without a grid file."""
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    grid_file = Path(hf_dir) / GRID_FILE
    if not grid_file.exists():
        return 0
    grid = load_file(str(grid_file))
    bits_of = {name: 8 for name in read_grid(hf_dir).get("int8", [])}
    hf: dict[str, np.ndarray] = {}
    for f in sorted(Path(hf_dir).glob("model*.safetensors")):
        hf.update(load_file(str(f)))
    packs = matmul_parts(set(hf))
    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    inline_changed, written = False, 0
    for node in model.graph.node:
        match = QUANTIZED_NODE.match(node.name)
        if node.op_type != "MatMulNBits" or not match or match[1] not in packs:
            continue
        parts = packs[match[1]]
        if any(f"{p}.scale" not in grid for p in parts):
            raise StageError(f"{grid_file}: no scales for {', '.join(p for p in parts if f'{p}.scale' not in grid)}")
        attrs = {a.name: a.i for a in node.attribute}
        bits, block = attrs["bits"], attrs["block_size"]
        wanted = {bits_of.get(p, 4) for p in parts}
        if wanted != {bits}:
            raise StageError(f"{model_path}: {node.name} is {bits}-bit but {parts[0]} was quantized to {wanted} bits")
        weight = np.concatenate([hf[p] for p in parts]).astype(np.float32)
        scale = np.concatenate([grid[f"{p}.scale"] for p in parts]).astype(np.float32)
        zero = np.concatenate([grid[f"{p}.zero_point"] for p in parts])
        if weight.shape[1] != attrs["K"] or scale.shape != (weight.shape[0], weight.shape[1] // block):
            raise StageError(
                f"{model_path}: {node.name} has blocks of {block} over K={attrs['K']}, but {parts[0]} was quantized "
                f"with {scale.shape[1]} groups per row: set optimize.block_size to the quantize stage's group size"
            )
        new = node_tensors(weight, scale, zero, bits, block)
        for role, index in (("B", 1), ("scales", 2), ("zero_points", 3)):
            tensor = initializers[node.input[index]]
            old_dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            raw = np.ascontiguousarray(new[role].astype(old_dtype)).tobytes()
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                if int(info["length"]) != len(raw):
                    raise StageError(f"{model_path}: {tensor.name} holds {info['length']} bytes, the grid {len(raw)}")
                with open(Path(model_path).parent / info["location"], "r+b") as data:
                    data.seek(int(info.get("offset", 0)))
                    data.write(raw)
            else:
                if numpy_helper.to_array(tensor).nbytes != len(raw):
                    raise StageError(f"{model_path}: {tensor.name} size differs from the grid's")
                tensor.ClearField("float_data")
                tensor.ClearField("int32_data")
                tensor.raw_data = raw
                inline_changed = True
        written += 1
    if inline_changed:
        onnx.save(model, str(model_path))
    log.info("%d MatMuls rewritten onto the quantize stage's grid (%s)", written, grid_file)
    return written
