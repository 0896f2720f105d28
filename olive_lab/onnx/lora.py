"""Multi-LoRA for an ORT GenAI model: LoRA branches as optional graph inputs, PEFT adapters as .onnx_adapter files.

Each projection the builder emits (packed qkv_proj / gate_up_proj or single ones) gets a branch

    y' = y + (x @ A) @ B        A: [in, rank], B: [rank, out]

where A and B are graph inputs whose default value (an initializer of the same name) has rank 0, so with no
adapter active the branch adds exact zeros and the output equals the plain model's. The base graph is left as the
builder made it (packed QKV, int4 MatMulNBits): that is what keeps an unused adapter slot cheap.

For a packed projection the parts share the input, so A is the parts' lora_A stacked along the rank and B is
block-diagonal: one branch of three nodes instead of one per part.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from olive_lab.errors import StageError

# The builder's node names for the projections it emits, per decoder layer.
PROJ_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+_proj)/MatMul(?:_Q\d+)?$")
# The HF modules behind each packed projection, in the order the builder packs their outputs.
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
HF_BLOCK = {"attn": "self_attn", "mlp": "mlp"}  # builder block name -> Hugging Face module name
PEFT_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")
LAYOUTS = ("branches", "switch", "resident", "fused")
SWITCH = "lora_active"  # layout "switch": 0 (default) runs the plain graph, adapters carry 1
RESIDENT_MASK = "lora_mask.r{}"  # layout "resident": per slot rank, ones on the active adapter's block (none: zeros)
RESIDENT_DATA = "lora_adapters.onnx.data"  # layout "resident": the stacked adapters, next to model.onnx
# optimize.lora_layout also takes "auto": "resident" on CUDA, where ORT GenAI 0.18 re-copies a loaded adapter to the
# device at every step (H200: 2.5x decode with an adapter at 3.8B), "branches" on CPU, where adapters stay files.
# "fused" (olive_lab/kernels' custom ops, opt-in: the model folder then carries a library built for its platform):
# on CUDA the resident layout with one LoraResident node per slot, on the CPU adapter files of float16 A and packed B
# read by one LoraBranch node per slot (README, "Adapters on the CPU")
PARAM_LAYOUTS = ("auto", *LAYOUTS)
# optimize.adapter_dtype: the CPU fused layout's adapter weights (int8: half the bytes an active adapter reads per
# token, LoraBranchQ8; bench/results/2026-12-07-cpu-lora-bytes-135m-int8.json)
ADAPTER_DTYPES = ("float16", "int8")


def resolve_layout(layout: str, execution_provider: str) -> str:
    """The concrete layout for optimize.lora_layout (`auto` picks by execution provider)."""
    if layout == "auto":
        return "resident" if execution_provider == "cuda" else "branches"
    return layout


# PEFT options whose effect this conversion does not reproduce.
UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save", "fan_in_fan_out", "rank_pattern", "alpha_pattern")


@dataclass(frozen=True)
class LoraSlot:
    """One LoRA branch in the graph: where it reads, which HF modules it covers and their output widths."""

    layer: int
    name: str  # e.g. model.layers.0.attn.qkv_proj
    parts: tuple[str, ...]  # HF module names, e.g. ("q_proj", "k_proj", "v_proj")
    widths: tuple[int, ...]  # output width of each part
    in_features: int
    dtype: str  # the graph's activation type: float32 on CPU, float16 on CUDA

    @property
    def a(self) -> str:
        return f"{self.name}.lora_A.weight"

    @property
    def b(self) -> str:
        return f"{self.name}.lora_B.weight"

    @property
    def scale(self) -> str:  # LoraBranchQ8's factor per column of A (optimize.adapter_dtype=int8)
        return f"{self.name}.lora_scale"


def part_widths(hf_config: dict, proj: str, fused_in_hf: bool = False) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The Hugging Face modules behind a builder projection and their output widths. `fused_in_hf`: the checkpoint
    itself has `proj` (Phi-3's qkv_proj and gate_up_proj), so PEFT trains it as one module."""
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    sizes = {
        "q_proj": hf_config["num_attention_heads"] * head_dim,
        "k_proj": hf_config.get("num_key_value_heads", hf_config["num_attention_heads"]) * head_dim,
        "v_proj": hf_config.get("num_key_value_heads", hf_config["num_attention_heads"]) * head_dim,
        "o_proj": hf_config["hidden_size"],
        "gate_proj": hf_config["intermediate_size"],
        "up_proj": hf_config["intermediate_size"],
        "down_proj": hf_config["hidden_size"],
    }
    sizes |= {packed: sum(sizes[p] for p in parts) for packed, parts in PACKED.items()}
    parts = (proj,) if fused_in_hf else PACKED.get(proj, (proj,))
    return parts, tuple(sizes[p] for p in parts)


def _weight_shape(graph, node) -> tuple[int, int]:
    """(in_features, out_features) of a MatMul or MatMulNBits node."""
    if node.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in node.attribute}
        return attrs["K"], attrs["N"]
    for init in graph.initializer:
        if init.name == node.input[1]:
            return int(init.dims[0]), int(init.dims[1])
    raise StageError(f"{node.name}: weight initializer not found")


def add_lora_inputs(
    model_path: Path, hf_config: dict, layout: str = "branches", hf_weights: set[str] | frozenset = frozenset()
) -> list[LoraSlot]:
    """Give every decoder projection of `model_path` a LoRA branch fed by optional inputs; rewrite it in place.

    layout "switch" also keeps the plain graph and picks one of the two with an If on the SWITCH input, which
    adapters set to 1: no LoRA node runs without an adapter, but ORT pre-packs the int4 weights once per branch.
    Only the graph proto changes: the weights stay in the external data file next to it. `hf_weights`: the
    checkpoint's weight names, which tell whether a packed projection is one module there (Phi-3) or several.
    """
    import onnx
    from onnx import helper

    if layout not in LAYOUTS:
        raise StageError(f"params.yaml: optimize.lora_layout must be one of {LAYOUTS}, not '{layout}'")
    # "resident" and "fused" start as "branches"; make_resident then moves the adapters' weights into the model,
    # and fuse_resident makes each slot one custom op (CUDA), or fuse_branches does (CPU, adapters stay files)
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    elem = next(o.type.tensor_type.elem_type for o in graph.output if o.name == "logits")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name
    nodes = list(graph.node)
    plain_nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
    consumers: dict[str, list] = {}
    for node in nodes:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))

    slots, new_nodes = [], []
    for node in nodes:
        new_nodes.append(node)
        match = PROJ_NODE.match(node.name)
        if not match:
            continue
        layer, block, proj = int(match[1]), match[2], match[3]
        fused = f"model.layers.{layer}.{HF_BLOCK[block]}.{proj}.weight" in hf_weights
        parts, widths = part_widths(hf_config, proj, fused)
        k, n = _weight_shape(graph, node)
        if sum(widths) != n:
            raise StageError(
                f"{model_path}: {node.name} has {n} outputs, config.json implies {sum(widths)} for {parts}"
            )
        slot = LoraSlot(layer, f"model.layers.{layer}.{block}.{proj}", parts, widths, k, dtype)
        x, y = node.input[0], node.output[0]
        base = f"/model/layers.{layer}/{block}/{proj}/lora"
        hidden, delta, summed = f"{base}/A/output_0", f"{base}/B/output_0", f"{base}/Add/output_0"
        for consumer, i in consumers.get(y, []):
            consumer.input[i] = summed
        new_nodes += [
            helper.make_node("MatMul", [x, slot.a], [hidden], name=f"{base}/A"),
            helper.make_node("MatMul", [hidden, slot.b], [delta], name=f"{base}/B"),
            helper.make_node("Add", [y, delta], [summed], name=f"{base}/Add"),
        ]
        graph.input.extend(
            [
                # a rank dim per slot: packed slots have a multiple of the rank, and ORT plans buffers by dim name
                helper.make_tensor_value_info(slot.a, elem, [k, f"{slot.name}.rank"]),
                helper.make_tensor_value_info(slot.b, elem, [f"{slot.name}.rank", n]),
            ]
        )
        # Defaults of rank 0: without an active adapter the branch adds zeros.
        graph.initializer.extend(
            [
                helper.make_tensor(slot.a, elem, [k, 0], []),
                helper.make_tensor(slot.b, elem, [0, n], []),
            ]
        )
        slots.append(slot)
    if not slots:
        raise StageError(f"{model_path}: no decoder projections found to attach LoRA to (unexpected builder output)")
    if layout == "switch":
        new_nodes = _switch(graph, plain_nodes, new_nodes, elem)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    onnx.save(model, str(model_path))
    return slots


def _switch(graph, plain_nodes: list, lora_nodes: list, elem: int) -> list:
    """Two nodes: Cast(SWITCH) and an If whose branches are the LoRA and the plain decoder (weights stay outside)."""
    from onnx import TensorProto, helper

    outputs = [o.name for o in graph.output]

    def branch(nodes: list, tag: str):
        # branch outputs need their own names; intermediate names may repeat across the two sibling scopes
        renamed = {name: f"{tag}/{name}" for name in outputs}
        for node in nodes:
            node.name = f"/{tag}{node.name}"
            for i, name in enumerate(node.output):
                node.output[i] = renamed.get(name, name)
            for i, name in enumerate(node.input):
                node.input[i] = renamed.get(name, name)
        values = []
        for out in graph.output:
            value = type(out).FromString(out.SerializeToString())
            value.name = renamed[out.name]
            values.append(value)
        return helper.make_graph(nodes, tag, [], values)

    graph.input.append(helper.make_tensor_value_info(SWITCH, elem, []))
    graph.initializer.append(helper.make_tensor(SWITCH, elem, [], [0]))
    return [
        helper.make_node("Cast", [SWITCH], ["/lora_switch/cond"], name="/lora_switch/Cast", to=TensorProto.BOOL),
        helper.make_node(
            "If",
            ["/lora_switch/cond"],
            outputs,
            name="/lora_switch/If",
            then_branch=branch(lora_nodes, "lora"),
            else_branch=branch(plain_nodes, "plain"),
        ),
    ]


def make_resident(model_path: Path, slots: list[LoraSlot], adapters: dict[str, dict[str, np.ndarray]]) -> dict:
    """Layout "resident": move the adapters (peft_to_inputs values, by name) into the model of `model_path` and
    return what each adapter file then holds: only masks that pick it, {RESIDENT_MASK.format(rank): [n * rank]}.

    Why: ORT GenAI 0.18 keeps a loaded adapter in host memory and ORT copies all of it to the GPU at every decoding
    step (about 50 MB at Phi-3.5-mini's size, rank 16). Here the adapters are initializers, so they sit on the device
    once. Per slot, the adapters' A matrices are concatenated along the rank, [in, n * rank] (each padded with zeros to
    the slot's largest rank, which is exact), and their B matrices likewise, [n * rank, out]; the branch computes
    (x @ A_all * mask) @ B_all, and the mask (ones on the active adapter's block, zeros elsewhere and by default) picks
    one adapter or none. Four small kernels per slot with or without an adapter (two Gathers per slot picking the
    active matrices were 2-8 % slower on an H200; a Split cutting one flat stack took 14-35 ms per step).
    Switching is a few bytes of mask. The cost: adapters are fixed when the model is built (a new one means
    re-running optimize), and every slot's branch runs, adapter or not.
    """
    import onnx
    from onnx import TensorProto, helper

    names = list(adapters)
    n = len(names)
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(slots[0].dtype))
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    stacks, ranks, mask_after = {}, set(), {}
    for slot in slots:
        rank = max((adapters[a][slot.a].shape[1] for a in names), default=0)
        ranks.add(rank)
        a_all = np.zeros((slot.in_features, n * rank), slot.dtype)
        b_all = np.zeros((n * rank, sum(slot.widths)), slot.dtype)
        for i, name in enumerate(names):
            a, b = adapters[name][slot.a], adapters[name][slot.b]
            a_all[:, i * rank : i * rank + a.shape[1]] = a
            b_all[i * rank : i * rank + b.shape[0], :] = b
        stacks[slot.a], stacks[slot.b] = a_all, b_all
        # the branch's A MatMul output is multiplied by the mask before the B MatMul reads it
        ((a_node, _),) = [(c, i) for c, i in consumers[slot.a] if c.op_type == "MatMul"]
        hidden = a_node.output[0]
        masked = f"{hidden}/masked"
        for consumer, i in consumers.get(hidden, []):
            consumer.input[i] = masked
        mask_after[a_node.name] = helper.make_node(
            "Mul", [hidden, RESIDENT_MASK.format(rank)], [masked], name=f"{a_node.name}/Mask"
        )
    body = []
    for node in graph.node:
        body.append(node)
        if node.name in mask_after:
            body.append(mask_after[node.name])
    graph.ClearField("node")
    graph.node.extend(body)
    lora_names = {name for s in slots for name in (s.a, s.b)}
    kept_inputs = [i for i in graph.input if i.name not in lora_names]
    graph.ClearField("input")
    masks = [RESIDENT_MASK.format(r) for r in sorted(ranks)]
    graph.input.extend(
        [
            *kept_inputs,
            *(helper.make_tensor_value_info(m, elem, [n * r]) for m, r in zip(masks, sorted(ranks), strict=True)),
        ]
    )
    kept = [t for t in graph.initializer if t.name not in lora_names]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    for mask, rank in zip(masks, sorted(ranks), strict=True):  # default: no adapter
        graph.initializer.append(
            helper.make_tensor(mask, elem, [n * rank], np.zeros(n * rank, slots[0].dtype).tolist())
        )
    offset = 0
    with open(Path(model_path).parent / RESIDENT_DATA, "wb") as data:
        for name, stack in stacks.items():
            tensor = TensorProto(name=name, data_type=elem, dims=list(stack.shape))
            tensor.data_location = TensorProto.EXTERNAL
            raw = np.ascontiguousarray(stack).tobytes()
            for key, value in (("location", RESIDENT_DATA), ("offset", str(offset)), ("length", str(len(raw)))):
                tensor.external_data.add(key=key, value=value)
            data.write(raw)
            offset += len(raw)
            graph.initializer.append(tensor)
    onnx.save(model, str(model_path))
    files = {}
    for i, name in enumerate(names):
        values = {}
        for mask, rank in zip(masks, sorted(ranks), strict=True):
            picked = np.zeros(n * rank, slots[0].dtype)
            picked[i * rank : (i + 1) * rank] = 1
            values[mask] = picked
        files[name] = values
    return files


FUSED_DOMAIN = "olive_lab"  # the custom-op domain of olive_lab/kernels (libolive_lab_kernels.so)
FUSED_OP = "LoraResident"
SWIGLU_OP = "LoraResidentSwiGlu"  # FUSED_OP with the packed gate/up activation folded in: see fuse_swiglu
BRANCH_OP = "LoraBranch"  # layout "fused" on the CPU: see fuse_branches
BRANCH_Q8_OP = "LoraBranchQ8"  # BRANCH_OP with int8 A and B and a scale per column of A (olive_lab.kernels)


def graph_with_readers(model_path: Path):
    """The ONNX model at `model_path` (without its weights) and, per value name, the nodes that read it."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return model, consumers


def fuse_resident(model_path: Path) -> int:
    """Layout "fused": each slot's resident branch (MatMul A, Mul mask, MatMul B, Add) of a make_resident model as
    one olive_lab.LoraResident node, whose CUDA kernel (olive_lab/kernels) does a decoding step in one launch
    instead of ORT's five, and skips the adapter products when the mask is all zeros. Rewrites `model_path` in place;
    returns the number of slots fused. The model then needs the kernel library (genai_config's custom_ops_library)."""
    import onnx
    from onnx import helper

    model, consumers = graph_with_readers(model_path)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    graph_outputs = {o.name for o in graph.output}

    def only(nodes: list, what: str, mask: str):
        """The one node of `nodes` with op type `what`, or one line naming the branch that differs."""
        if len(nodes) != 1 or nodes[0].op_type != what:
            found = ", ".join(n.op_type for n in nodes) or "nothing"
            raise StageError(
                f"{model_path}: {mask} is not in a resident LoRA branch (MatMul, Mul, MatMul, Add): "
                f"expected one {what} there, found {found}"
            )
        return nodes[0]

    dropped, fused_at = set(), {}
    for node in graph.node:
        if node.op_type != "Mul" or not node.name.endswith("/A/Mask"):
            continue
        down = only([producer[node.input[0]]] if node.input[0] in producer else [], "MatMul", node.name)
        up = only(consumers.get(node.output[0], []), "MatMul", node.name)
        add = only(consumers.get(up.output[0], []), "Add", node.name)
        if {node.output[0], up.output[0], down.output[0]} & graph_outputs or len(consumers[down.output[0]]) != 1:
            raise StageError(f"{model_path}: {node.name}'s branch has an output read elsewhere; it cannot be fused")
        base_out = add.input[0] if add.input[1] == up.output[0] else add.input[1]
        x, a_all, b_all, mask = down.input[0], down.input[1], up.input[1], node.input[1]
        prefix = node.name[: -len("/A/Mask")]
        fused_at[add.name] = helper.make_node(
            FUSED_OP,
            [base_out, x, a_all, b_all, mask],
            [add.output[0], f"{prefix}/partial"],
            name=f"{prefix}/Fused",
            domain=FUSED_DOMAIN,
        )
        dropped |= {down.name, node.name, up.name}
    body = [fused_at.get(n.name, n) for n in graph.node if n.name not in dropped]
    graph.ClearField("node")
    graph.node.extend(body)
    if fused_at and not any(o.domain == FUSED_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(FUSED_DOMAIN, 1))
    onnx.save(model, str(model_path))
    return len(fused_at)


def fuse_swiglu(model_path: Path) -> int:
    """After fuse_resident: each LoraResident of a packed gate/up projection whose output only feeds the builder's
    SwiGLU (Split in two halves, then gate * Sigmoid(gate) * up, Phi-3's MLP) becomes one olive_lab.LoraResidentSwiGlu
    node that writes the product itself: ORT's three kernels per layer after it (Split, QuickGelu, Mul) are gone,
    which at 3.8B on a GPU is as much time as the LoRA ops' own idle launches. A slot whose output goes anywhere
    else stays as it is. Rewrites `model_path` in place; returns the number of slots rewritten."""
    import onnx
    from onnx import helper

    model, consumers = graph_with_readers(model_path)
    graph = model.graph
    graph_outputs = {o.name for o in graph.output}
    initializers = {t.name: t for t in graph.initializer}

    def only_reader(name: str, op_type: str):
        readers = consumers.get(name, [])
        ok = len(readers) == 1 and readers[0].op_type == op_type and readers[0].domain in ("", "ai.onnx")
        return readers[0] if ok and name not in graph_outputs else None

    def halves(split) -> bool:
        """Split into two equal halves along the last axis (num_outputs=2, or a `split` initializer [h, h])."""
        attrs = {a.name: helper.get_attribute_value(a) for a in split.attribute}
        if attrs.get("axis", 0) != -1 or len(split.output) != 2:
            return False
        if len(split.input) > 1 and split.input[1]:
            sizes = initializers.get(split.input[1])
            return sizes is not None and len(set(onnx.numpy_helper.to_array(sizes).tolist())) == 1
        return attrs.get("num_outputs", 2) == 2

    dropped, rewritten = set(), {}
    for node in graph.node:
        if node.op_type != FUSED_OP or node.domain != FUSED_DOMAIN:
            continue
        split = only_reader(node.output[0], "Split")
        if split is None or not halves(split):
            continue
        gate, up = split.output
        gate_readers = consumers.get(gate, [])
        sigmoid = next((n for n in gate_readers if n.op_type == "Sigmoid"), None)
        act = only_reader(sigmoid.output[0], "Mul") if sigmoid else None
        if (
            act is None
            or len(gate_readers) != 2
            or act not in gate_readers
            or set(act.input) != {gate, sigmoid.output[0]}
        ):
            continue
        product = only_reader(act.output[0], "Mul")
        if product is None or only_reader(up, "Mul") is not product or set(product.input) != {act.output[0], up}:
            continue
        if gate in graph_outputs:  # (only_reader has ruled `up` out there)
            continue
        rewritten[node.name] = helper.make_node(
            SWIGLU_OP, list(node.input), [product.output[0], node.output[1]], name=f"{node.name}SwiGlu",
            domain=FUSED_DOMAIN,
        )  # fmt: skip
        dropped |= {split.name, sigmoid.name, act.name, product.name}
    body = [rewritten.get(n.name, n) for n in graph.node if n.name not in dropped]
    graph.ClearField("node")
    graph.node.extend(body)
    onnx.save(model, str(model_path))
    return len(rewritten)


def fuse_branches(model_path: Path, slots: list[LoraSlot], int8: bool = False) -> int:
    """Layout "fused" on the CPU: each slot's branch (MatMul A, MatMul B, Add) of an add_lora_inputs model as one
    olive_lab.LoraBranch node, whose adapter inputs become float16 with B [rank, out] (peft_to_inputs(packed=True))
    instead of float32 with a block-diagonal B: a third of the bytes decoding reads per token, in one op instead of
    three. The slot's part widths are an int64 initializer, `<slot>.lora_parts`. `int8`: olive_lab.LoraBranchQ8
    nodes instead, A and B int8 and one more input, `<slot>.lora_scale` [rank] (peft_to_inputs(int8=True)). Rewrites
    `model_path` in place; returns the number of slots fused. The model then needs the kernel library
    (genai_config's custom_ops_library)."""
    import onnx
    from onnx import TensorProto, helper

    model, consumers = graph_with_readers(model_path)
    graph = model.graph
    by_slot = {s.a: s for s in slots} | {s.b: s for s in slots}
    fused_at, dropped = {}, set()
    for slot in slots:
        downs, ups = consumers.get(slot.a, []), consumers.get(slot.b, [])
        down = downs[0] if len(downs) == 1 and downs[0].op_type == "MatMul" else None
        up = ups[0] if len(ups) == 1 and ups[0].op_type == "MatMul" else None
        adds = consumers.get(up.output[0], []) if up else []
        if not (down and up and len(adds) == 1 and adds[0].op_type == "Add" and up.input[0] == down.output[0]):
            raise StageError(f"{model_path}: {slot.name}'s LoRA inputs are not in a branch (MatMul A, MatMul B, Add)")
        (add,) = adds
        base_out = add.input[0] if add.input[1] == up.output[0] else add.input[1]
        parts = f"{slot.name}.lora_parts"
        fused_at[add.name] = helper.make_node(
            BRANCH_Q8_OP if int8 else BRANCH_OP,
            [base_out, down.input[0], slot.a, slot.b, *([slot.scale] if int8 else []), parts], [add.output[0]],
            name=add.name.rsplit("/", 1)[0] + "/Fused", domain=FUSED_DOMAIN,
        )  # fmt: skip
        if int8:  # its default, like A's and B's: rank 0, no adapter
            graph.input.append(helper.make_tensor_value_info(slot.scale, TensorProto.FLOAT, [f"{slot.name}.rank"]))
            graph.initializer.append(helper.make_tensor(slot.scale, TensorProto.FLOAT, [0], []))
        dropped |= {down.name, up.name}
        graph.initializer.append(helper.make_tensor(parts, TensorProto.INT64, [len(slot.widths)], list(slot.widths)))
    body = [fused_at.get(n.name, n) for n in graph.node if n.name not in dropped]
    graph.ClearField("node")
    graph.node.extend(body)
    weights = TensorProto.INT8 if int8 else TensorProto.FLOAT16
    for value in graph.input:  # the adapter inputs: float16 (or int8), B with one block of rows
        if slot := by_slot.get(value.name):
            n = sum(slot.widths)
            shape = [slot.in_features, f"{slot.name}.rank"] if value.name == slot.a else [f"{slot.name}.part_rank", n]
            value.CopyFrom(helper.make_tensor_value_info(value.name, weights, shape))
    for tensor in graph.initializer:  # their defaults, rank 0: no adapter
        if slot := by_slot.get(tensor.name):
            dims = list(tensor.dims)
            tensor.CopyFrom(helper.make_tensor(tensor.name, weights, dims, []))
    if fused_at and not any(o.domain == FUSED_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(FUSED_DOMAIN, 1))
    onnx.save(model, str(model_path))
    return len(fused_at)


def _read_peft(adapter_dir: Path) -> tuple[dict, dict[tuple[int, str, str], np.ndarray]]:
    from safetensors.numpy import load_file

    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_file.exists():
        raise StageError(f"{config_file}: not found (not a PEFT adapter folder)")
    if not weights_file.exists():
        raise StageError(f"{weights_file}: not found (only safetensors adapters are supported)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise StageError(f"{config_file}: peft_type is {config.get('peft_type')!r}, only LORA is supported")
    for key in UNSUPPORTED:
        if config.get(key):
            raise StageError(f"{config_file}: '{key}' is set; the ONNX conversion does not support it")
    tensors = {}
    for key, value in load_file(str(weights_file)).items():
        match = PEFT_KEY.search(key)
        if not match:
            raise StageError(f"{weights_file}: unexpected tensor '{key}' (only decoder-layer LoRA projections)")
        tensors[(int(match[1]), match[2], match[3])] = value.astype(np.float32)
    if not tensors:
        raise StageError(f"{weights_file}: no LoRA tensors")
    return config, tensors


def peft_to_inputs(
    adapter_dir: Path, slots: list[LoraSlot], switch: bool = False, packed: bool = False, int8: bool = False
) -> dict[str, np.ndarray]:
    """The adapter's weights as values for every LoRA input of the graph (PEFT scaling folded into B).

    Every slot gets a value, rank 0 where the adapter does not touch it, so each adapter file names every input.
    `packed` (fuse_branches' graph): float16, A [in, parts x rank] with every part's block (zeros for a part the
    adapter skips) and B [rank, out], each part's columns reading its own block of x @ A. With `int8` (packed
    only, fuse_branches(int8=True)): A and B int8 and `<slot>.lora_scale` (olive_lab.kernels.quantize_branch_int8).
    """
    if int8 and not packed:
        raise ValueError("peft_to_inputs: int8 adapter inputs exist only for the packed (fused CPU) layout")
    config, tensors = _read_peft(adapter_dir)
    r = int(config["r"])
    scaling = config["lora_alpha"] / (r**0.5 if config.get("use_rslora") else r)
    known = {(s.layer, p) for s in slots for p in s.parts}
    stray = sorted({(layer, mod) for layer, mod, _ in tensors} - known)
    if stray:
        raise StageError(
            f"{adapter_dir}: LoRA on layer {stray[0][0]} {stray[0][1]}, which the ONNX model has no slot for"
        )
    values = {}
    for slot in slots:
        used = [p for p in slot.parts if (slot.layer, p, "A") in tensors]
        rank = r * (len(slot.parts) if packed and used else len(used))
        a = np.zeros((slot.in_features, rank), np.float32)
        b = np.zeros((r if packed and used else rank, sum(slot.widths)), np.float32)
        col, row = 0, 0
        for part, width in zip(slot.parts, slot.widths, strict=True):
            if part in used:
                lora_a, lora_b = tensors[(slot.layer, part, "A")], tensors[(slot.layer, part, "B")]
                if lora_a.shape != (r, slot.in_features) or lora_b.shape != (width, r):
                    raise StageError(
                        f"{adapter_dir}: layer {slot.layer} {part} LoRA shapes {lora_a.shape}, {lora_b.shape} do not fit the model"
                    )
                a[:, row : row + r] = lora_a.T
                b[0 if packed else row : (0 if packed else row) + r, col : col + width] = lora_b.T * scaling
                row += r
            elif packed and used:
                row += r  # the part's block of A stays zeros, and so do its columns of B
            col += width
        if int8:
            from olive_lab.kernels import quantize_branch_int8

            values[slot.a], values[slot.b], values[slot.scale] = quantize_branch_int8(a, b, slot.widths)
            continue
        dtype = np.float16 if packed else slot.dtype
        values[slot.a], values[slot.b] = a.astype(dtype), b.astype(dtype)
    if switch:
        values[SWITCH] = np.array(1, slots[0].dtype)
    return values


def write_adapter(values: dict[str, np.ndarray], path: Path) -> None:
    import onnxruntime as ort

    # OrtValues borrow the numpy buffers: `values` must outlive the export, hence the local references.
    arrays = {name: np.ascontiguousarray(v) for name, v in values.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(v) for name, v in arrays.items()})
    fmt.export_adapter(str(path))


def read_adapter(path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    # Copy while `fmt` is alive: the OrtValues point into its buffer and dangle once it is freed.
    values = {name: np.array(v.numpy(), copy=True) for name, v in fmt.get_parameters().items()}
    del fmt
    return values
