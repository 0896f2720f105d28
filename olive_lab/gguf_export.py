"""Llama-architecture Hugging Face folders and PEFT LoRA adapters as llama.cpp GGUF files, for the benches that run
llama.cpp on the same weights as our ONNX model (bench/cpu_vs_llama.py, bench/scaling.py).

gguf (llama.cpp's own Python package) does the file format; this module only maps names and layouts the way
llama.cpp's convert_hf_to_gguf.py and convert_lora_to_gguf.py do for `LlamaForCausalLM`:
- the HF projections get llama.cpp's tensor names (GGUF_PROJ);
- the output rows of q_proj and k_proj are permuted per head, from HF's rotate-half RoPE layout to llama.cpp's
  interleaved one (`permute`); transformers' GGUF loader undoes exactly this, which the tests use as the check;
- norms stay fp32, matrices are written as f16 (or f32): llama.cpp's quantizer makes Q4_0 and the rest from that;
- the tokenizer is copied field by field from a GGUF that already has it (the shipped SmolLM2 GGUF, whose
  tokenizer every random model here borrows).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from olive_lab.errors import StageError

log = logging.getLogger(__name__)

# llama.cpp's tensor names for the HF projections
GGUF_PROJ = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    **{f"self_attn.{p}": GGUF_PROJ[p] for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"mlp.{p}": GGUF_PROJ[p] for p in ("gate_proj", "up_proj", "down_proj")},
}
LAYER_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def permute(rows, n_head: int):
    """Output rows of a q/k projection (or of its LoRA B) from HF's RoPE layout to llama.cpp's."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for a LlamaForCausalLM weight, or None for one it has no place for."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    if hf_name in fixed:
        return fixed[hf_name]
    match = LAYER_WEIGHT.match(hf_name)
    if match and match.group(2) in GGUF_LAYER:
        return f"blk.{match.group(1)}.{GGUF_LAYER[match.group(2)]}.weight"
    return None


def check_llama(config: dict, source: Path) -> None:
    """One line for a model this writer cannot express faithfully."""
    if config.get("model_type") != "llama":
        raise StageError(f"{source}: GGUF export writes Llama-architecture models, not '{config.get('model_type')}'")
    for key in ("rope_scaling", "attention_bias", "mlp_bias"):
        if config.get(key):
            raise StageError(f"{source}: config.json sets {key}, which this GGUF export does not write")
    rope_type = (config.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise StageError(f"{source}: rope_parameters.rope_type is '{rope_type}'; this GGUF export writes plain RoPE")


def rope_theta(config: dict) -> float:
    """RoPE's base: transformers 5 keeps it in rope_parameters, older config.json files at the top level."""
    return float((config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta") or 10000.0)


def copy_tokenizer(writer, tokenizer_gguf: Path) -> int:
    """Every `tokenizer.*` field of `tokenizer_gguf`, as it is there; returns the vocabulary size."""
    import gguf

    reader = gguf.GGUFReader(str(tokenizer_gguf))
    vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type)
        if key == "tokenizer.ggml.tokens":
            vocab = len(value)
    if not vocab:
        raise StageError(f"{tokenizer_gguf}: no tokenizer.ggml.tokens to copy")
    return vocab


def model_gguf(hf_dir: Path, dst: Path, tokenizer_gguf: Path, dtype: str = "f16") -> Path:
    """The LlamaForCausalLM in `hf_dir` (safetensors) as a GGUF at `dst`: matrices in `dtype` (f16 or f32), norms
    in f32, the tokenizer of `tokenizer_gguf`. Streams one tensor at a time, so a 1.7B model needs about one
    tensor's memory. Written to a .partial file and renamed, so `dst` is whole or absent."""
    import gguf
    import numpy as np
    from safetensors import safe_open
    from tqdm import tqdm

    if dtype not in ("f16", "f32"):
        raise StageError(f"GGUF export: dtype must be f16 or f32, not '{dtype}'")
    config = json.loads((hf_dir / "config.json").read_text())
    check_llama(config, hf_dir / "config.json")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise StageError(f"{hf_dir}: no .safetensors weights to export")
    where, shapes = {}, {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                where[name], shapes[name] = file, tuple(f.get_slice(name).get_shape())
    unknown = [n for n in where if gguf_name(n) is None]
    if unknown:
        raise StageError(f"{hf_dir}: weights with no llama.cpp name: {', '.join(unknown[:3])}")
    if config.get("tie_word_embeddings"):
        where.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output is absent

    ftype = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
    matrix_dtype = np.float16 if dtype == "f16" else np.float32

    def out_dtype(ndim: int):
        return matrix_dtype if ndim == 2 else np.float32  # norms (1-D) stay fp32

    tmp = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(None, arch="llama")
    writer.add_name(hf_dir.name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(ftype)
    vocab = copy_tokenizer(writer, tokenizer_gguf)
    if vocab != config["vocab_size"]:
        raise StageError(
            f"{hf_dir}: vocab_size {config['vocab_size']} but {tokenizer_gguf.name} has {vocab} tokens to copy"
        )
    writer.add_vocab_size(vocab)

    def tensor(name: str):
        with safe_open(str(where[name]), framework="pt") as f:
            value = f.get_tensor(name).float().numpy()  # via torch: numpy has no bfloat16
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            value = permute(value, heads if "q_proj" in name else kv_heads)
        return np.ascontiguousarray(value.astype(out_dtype(value.ndim)))

    names = sorted(where)
    for name in names:
        kind = np.dtype(out_dtype(len(shapes[name])))
        writer.add_tensor_info(gguf_name(name), shapes[name], kind, int(np.prod(shapes[name])) * kind.itemsize)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name in tqdm(names, desc=f"GGUF {dtype} {dst.name}", unit="tensor"):
            writer.write_tensor_data(tensor(name))
        writer.close()
        tmp.rename(dst)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%.1f MB)", dst, dst.stat().st_size / 1e6)
    return dst


def lora_gguf(adapter_dir: Path, hf_config: dict, dst: Path) -> Path:
    """A PEFT LoRA folder as a llama.cpp LoRA GGUF (f16, what llama.cpp's convert_lora_to_gguf.py writes by default).

    lora_a keeps PEFT's [r, in] and lora_b its [out, r] (numpy order); llama.cpp scales by alpha / r itself. The
    output rows of q_proj and k_proj are permuted like the base weights (`permute`).
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(dst), arch="llama")
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    pattern = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")
    for key, value in sorted(load_file(str(adapter_dir / "adapter_model.safetensors")).items()):
        match = pattern.search(key)
        if match is None or match.group(2) not in GGUF_PROJ:
            raise StageError(f"{adapter_dir}: LoRA weight '{key}' has no llama.cpp name")
        layer, proj, side = match.groups()
        if side == "B" and proj in ("q_proj", "k_proj"):
            value = permute(value, heads if proj == "q_proj" else kv_heads)
        name = f"blk.{layer}.{GGUF_PROJ[proj]}.weight.lora_{side.lower()}"
        writer.add_tensor(name, np.ascontiguousarray(value.astype(np.float16)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
