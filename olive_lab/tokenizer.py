"""Tokenizer folders that ONNX Runtime GenAI's own tokenizer reads exactly as Hugging Face does.

Why: transformers 5 converts a GGUF's GPT-2-style byte-level BPE (SmolLM2, Qwen2, GPT-2, ...) into a tokenizer.json
whose parts disagree: a ByteLevel pre-tokenizer with a SentencePiece-style decoder (ByteFallback, Fuse,
Replace("▁"), ByteLevel), merges stored as pairs, and tokenizer_class "TokenizersBackend". Hugging Face `tokenizers`
copes; onnxruntime-extensions (the tokenizer inside ORT GenAI) switches to SentencePiece mode on that Replace, so
every space and newline encodes to -1 and decode returns byte-level symbols ("HelloĠworldĊ"). Any app but ours
then breaks on the exported model.

`canonicalize` rewrites such a folder into the family's canonical form (ByteLevel decoder, "a b" merges, a
tokenizer_class onnxruntime-extensions knows, no clean-up of spaces around special tokens); token ids do not
change, since the pre-tokenizer, vocabulary, merge order and added tokens are untouched. `roundtrip_mismatches`
proves it on the built model: og.Tokenizer's ids equal Hugging Face's and decode(encode(x)) == x.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from olive_lab.errors import StageError

# onnxruntime-extensions' table of tokenizer classes (TokenJsonConfig; a "Fast" suffix is stripped first).
ORT_TOKENIZER_CLASSES = frozenset(
    {
        "PreTrainedTokenizer", "CLIPTokenizer", "WhisperTokenizer", "GemmaTokenizer", "LlamaTokenizer",
        "Phi3Tokenizer", "CodeLlamaTokenizer", "CodeGenTokenizer", "GPT2Tokenizer", "Qwen2Tokenizer",
        "BaichuanTokenizer", "GPTNeoXTokenizer", "T5Tokenizer", "ChatGLMTokenizer", "XLMRobertaTokenizer",
    }
)  # fmt: skip
BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
SPM_SPACE = "\u2581"  # "▁"

# Checked at build time besides the eval prompts: scripts, emoji sequences, whitespace runs, code, special tokens.
MULTILINGUAL_SAMPLE = [
    "سلام، حال شما چطور است؟ یک سفر سه روزه به اصفهان برایم برنامه‌ریزی کن.",
    "I ❤️ Paris 🗼✈️ — emoji family 👨‍👩‍👧‍👦, flags 🇮🇷🇯🇵, skin tones 👍🏽",
    "東京で一番おいしいラーメン屋はどこですか？北京烤鸭在哪里最好吃？",
    "mixed: Привет, мир! Γειά σου 안녕하세요 नमस्ते مرحبا",
    "line one\nline two\n\n\nline five\r\nwindows\ttab\t\tdouble",
    "multiple   spaces     here  ",
    "numbers 2024-11-30, 3.14159, 1,000,000 and +49 (0)30 1234; 500 €, ¥20,000",
    "don't can't it's they're we've I'm we'll he'd",
    'def f(x):\n    return {"a": [1, 2]}  # comment\n',
]


def _has_component(node: Any, type_name: str) -> bool:
    """`type_name` anywhere in a pre_tokenizer/decoder JSON tree (nested Sequences included)."""
    if isinstance(node, dict):
        return node.get("type") == type_name or any(_has_component(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_has_component(v, type_name) for v in node)
    return False


def is_byte_level_bpe(tokenizer_json: dict) -> bool:
    return tokenizer_json.get("model", {}).get("type") == "BPE" and _has_component(
        tokenizer_json.get("pre_tokenizer"), "ByteLevel"
    )


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def canonicalize(folder: Path | str) -> list[str]:
    """Rewrite the tokenizer in `folder` (tokenizer.json + tokenizer_config.json) in place; return what changed.

    Idempotent. The chat template stays where transformers wrote it (chat_template.jinja, which ORT GenAI reads
    when tokenizer_config.json has none): one copy, so the two runtimes cannot drift apart.
    """
    folder = Path(folder)
    tok_path, cfg_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not tok_path.exists():
        return []  # a SentencePiece-only folder (tokenizer.model): nothing of this kind to fix
    tok = json.loads(tok_path.read_text(encoding="utf-8"))
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    changes: list[str] = []
    byte_level = is_byte_level_bpe(tok)
    model = tok.get("model", {})

    decoder = tok.get("decoder")
    if byte_level and not (isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"):
        spm_like = [t for t in model.get("vocab", {}) if SPM_SPACE in t or (t.startswith("<0x") and len(t) == 6)]
        if spm_like:  # then the SentencePiece steps would not be no-ops: leave it, the round-trip check decides
            raise StageError(
                f"{tok_path}: byte-level pre-tokenizer but SentencePiece pieces in the vocabulary ({spm_like[:3]}); "
                "cannot make it readable by ORT GenAI's tokenizer safely"
            )
        tok["decoder"] = dict(BYTE_LEVEL_DECODER)
        changes.append("decoder -> ByteLevel")

    merges = model.get("merges")
    if merges and all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        model["merges"] = [f"{a} {b}" for a, b in merges]
        changes.append("merges -> 'a b' strings")

    old_class = cfg.get("tokenizer_class")
    if (old_class or "").removesuffix("Fast") not in ORT_TOKENIZER_CLASSES and byte_level:
        cfg["tokenizer_class"] = "GPT2Tokenizer"  # the byte-level BPE family (GPT-2 regex, no implicit BOS/EOS)
        changes.append(f"tokenizer_class {old_class!r} -> 'GPT2Tokenizer'")

    if byte_level and cfg.get("clean_up_tokenization_spaces"):
        # With it on, ORT GenAI's TokenizerStream puts spaces around special tokens; transformers 5 ignores it here.
        cfg["clean_up_tokenization_spaces"] = False
        changes.append("clean_up_tokenization_spaces -> false")

    if any(c.startswith(("decoder", "merges")) for c in changes):
        _write_json(tok_path, tok)
    if any(c.startswith(("tokenizer_class", "clean_up")) for c in changes):
        _write_json(cfg_path, cfg)
    return changes


def roundtrip_mismatches(model_dir: Path | str, hf_dir: Path | str, texts: list[str]) -> list[str]:
    """og.Tokenizer on the ORT GenAI model in `model_dir` against the Hugging Face tokenizer of `hf_dir`: for each
    text, equal ids, decode(encode(x)) == x and the same text through a TokenizerStream. One line per failure."""
    import numpy as np
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    tokenizer = og.Tokenizer(og.Model(str(model_dir)))
    tokenizer.update_options(skip_special_tokens="false")  # decode must give the input back, special tokens too
    problems = []
    for text in texts:
        ids = [int(i) for i in tokenizer.encode(text)]
        ref = hf(text, add_special_tokens=False).input_ids
        short = text[:40].replace("\n", "\\n")
        if ids != ref:
            at = next((i for i, (a, b) in enumerate(zip(ids, ref, strict=False)) if a != b), min(len(ids), len(ref)))
            problems.append(f"ids differ from token {at} on {short!r} (og {ids[at : at + 3]}, hf {ref[at : at + 3]})")
            continue
        if (decoded := tokenizer.decode(np.asarray(ids, dtype=np.int32))) != text:
            problems.append(f"decode(encode(x)) != x on {short!r}: got {decoded[:40]!r}")
        stream = tokenizer.create_stream()
        if (streamed := "".join(stream.decode(i) for i in ids)) != text:
            problems.append(f"stream decode != x on {short!r}: got {streamed[:40]!r}")
    return problems
