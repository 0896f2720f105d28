"""An If-free LongRoPE export, so that CUDA graphs can capture a Phi-3-style model (for benches, not the stages yet).

The model builder picks LongRoPE's short or long cos/sin cache with an `If` on the sequence length (longer than the
original context: the long factors). ORT's CUDA provider cannot capture a graph with control flow, so such a model
decodes without CUDA graphs. Within the original context (4096 tokens for Phi-3.5-mini) the short cache is the one
used, so keeping only it, and capping the model's context there, gives the same outputs with a capturable graph.
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
