"""If-free LongRoPE, so that CUDA graphs can capture a Phi-3-style model.

The model builder picks LongRoPE's short or long cos/sin cache with an `If` on the sequence length (longer than the
original context: the long factors). ORT's CUDA provider cannot capture a graph with control flow, so such a model
decodes without CUDA graphs.
- capturable_longrope (used by the optimize stage for CUDA builds with CUDA graphs): the same choice as a Where,
  full context kept.
- keep_short_rope (bench/cuda_rope.py, the first probe): only the short cache, the context capped at the original.
"""

from __future__ import annotations

import json
from pathlib import Path

from olive_lab.errors import StageError

ROPE_SWITCH = "/model/rope_caches_subgraph/If"


def keep_short_rope(model_dir: Path, original_context: int) -> bool:
    """Replace the LongRoPE cache switch in `model_dir`/model.onnx by its short-factor branch and cap genai_config's
    context at `original_context`. Returns False when the model has no such switch. Rewrites the graph proto only
    (a symlinked model.onnx is replaced by a real file; the weights stay where they are)."""
    import onnx

    model_path = Path(model_dir) / "model.onnx"
    model = onnx.load(str(model_path), load_external_data=False)
    switch = next((n for n in model.graph.node if n.op_type == "If" and n.name == ROPE_SWITCH), None)
    if switch is None:
        return False
    short = next(a.g for a in switch.attribute if a.name == "else_branch")  # condition: length > original context
    rename = {out.name: name for out, name in zip(short.output, switch.output, strict=True)}
    inlined = []
    for node in short.node:
        copy = onnx.NodeProto.FromString(node.SerializeToString())
        for i, name in enumerate(copy.output):
            copy.output[i] = rename.get(name, name)
        inlined.append(copy)
    if set(rename.values()) != {o for n in inlined for o in n.output}:
        raise StageError(f"{model_path}: unexpected LongRoPE switch branch (outputs {list(rename)})")
    nodes = [n for n in model.graph.node if n is not switch]
    at = next(i for i, n in enumerate(model.graph.node) if n is switch)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes[:at] + inlined + nodes[at:])
    if model_path.is_symlink():
        model_path.unlink()
    onnx.save(model, str(model_path))
    config_path = Path(model_dir) / "genai_config.json"
    if config_path.is_symlink():
        text = config_path.read_text()
        config_path.unlink()
        config_path.write_text(text)
    config = json.loads(config_path.read_text())
    config["model"]["context_length"] = min(config["model"]["context_length"], original_context)
    config["search"]["max_length"] = min(config["search"].get("max_length", original_context), original_context)
    config_path.write_text(json.dumps(config, indent=4) + "\n")
    return True


def capturable_longrope(model_path: Path, original_context: int) -> bool:
    """Replace the LongRoPE cache `If` of `model_path` by a device-side `Where`, keeping its meaning; rewrite in place.

    The builder's If compares the attention mask's width with the original context. Under CUDA graphs ORT GenAI
    feeds a mask as wide as max_length, so that width says nothing; the true length is in GroupQueryAttention's
    seqlens_k (tokens so far - 1), which the graph already computes on the device. The Where reads it: long factors
    once the sequence is longer than the original context, as Hugging Face's Phi-3 does, and no control flow is left,
    so ORT can capture the graph. Both caches stay in the model; the Where copies one of them per step (~25 MB at
    Phi-3.5-mini's 131k context, ~10 us on an H200). Returns False when the model has no such If.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    switch = next((n for n in graph.node if n.op_type == "If" and n.name == ROPE_SWITCH), None)
    if switch is None:
        return False
    attention = next((n for n in graph.node if n.op_type == "GroupQueryAttention"), None)
    if attention is None or len(attention.input) < 6 or not attention.input[5]:
        raise StageError(f"{model_path}: LongRoPE If without a GroupQueryAttention seqlens_k to replace it with")
    branches = {a.name: a.g for a in switch.attribute}
    inlined, picked = [], {}
    for tag, branch in (("long", branches["then_branch"]), ("short", branches["else_branch"])):  # then: length > orig.
        for node in branch.node:
            if node.op_type != "Constant":
                raise StageError(f"{model_path}: unexpected LongRoPE If branch (a {node.op_type} node)")
            inlined.append(onnx.NodeProto.FromString(node.SerializeToString()))
        picked[tag] = [o.name for o in branch.output]
    # The short caches cover the original context only; the Where wants equal shapes. Rows past the original context
    # are never read while the short caches are picked, so the long caches' rows fill them.
    value = {n.output[0]: n.attribute[0] for n in inlined}
    for long_name, short_name in zip(picked["long"], picked["short"], strict=True):
        long_cache, short_cache = (numpy_helper.to_array(value[n].t) for n in (long_name, short_name))
        if short_cache.shape[0] < long_cache.shape[0]:
            padded = np.concatenate([short_cache, long_cache[short_cache.shape[0] :]])
            value[short_name].t.CopyFrom(numpy_helper.from_array(padded, value[short_name].t.name))
    seqlens = attention.input[5]
    base = "/model/rope_caches_subgraph"
    cond = f"{base}/LongCond/output_0"
    inlined += [
        helper.make_node(
            "Cast", [seqlens], [f"{base}/SeqLensF/output_0"], name=f"{base}/SeqLensF", to=TensorProto.FLOAT
        ),
        helper.make_node(
            "ReduceMax",
            [f"{base}/SeqLensF/output_0"],
            [f"{base}/MaxSeqLen/output_0"],
            name=f"{base}/MaxSeqLen",
            keepdims=0,
        ),  # fmt: skip
        # seqlens_k = length - 1: length > original  <=>  seqlens_k > original - 1 (the 0.5 keeps it exact in float)
        helper.make_node(
            "Greater", [f"{base}/MaxSeqLen/output_0", f"{base}/Original"], [cond], name=f"{base}/LongCond"
        ),
    ]
    graph.initializer.append(helper.make_tensor(f"{base}/Original", TensorProto.FLOAT, [], [original_context - 0.5]))
    for i, out in enumerate(switch.output):
        inlined.append(
            helper.make_node("Where", [cond, picked["long"][i], picked["short"][i]], [out], name=f"{base}/Where_{i}")
        )
    # The old condition (mask width > original) fed only the If.
    users = {i for n in graph.node if n is not switch for i in n.input}
    nodes = [
        n
        for n in graph.node
        if n is not switch and not (n.output and n.output[0] == switch.input[0] and n.output[0] not in users)
    ]
    at = next(i for i, n in enumerate(nodes) if n is attention)  # seqlens_k exists here, the caches are read here
    graph.ClearField("node")
    graph.node.extend(nodes[:at] + inlined + nodes[at:])
    if Path(model_path).is_symlink():
        Path(model_path).unlink()
    onnx.save(model, str(model_path))
    return True
