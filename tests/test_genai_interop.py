"""The exported model works in any ONNX Runtime GenAI app: the plain og API end to end, with og's own tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from olive_lab.tokenizer import MULTILINGUAL_SAMPLE, canonicalize, roundtrip_mismatches

PROMPT = "Plan a relaxed weekend in Lisbon with good food and a day trip."


def plain_genai_replies(onnx_dir: Path, adapter: str, max_new_tokens: int = 24) -> tuple[str, str]:
    """What a user's own script does with the folder (the README's snippet): (base reply, adapter reply)."""
    import onnxruntime_genai as og

    model = og.Model(str(onnx_dir / "model"))
    tokenizer = og.Tokenizer(model)
    adapters = og.Adapters(model)
    adapters.load(str(onnx_dir / "adapters" / f"{adapter}.onnx_adapter"), adapter)
    prompt = tokenizer.apply_chat_template(
        json.dumps([{"role": "user", "content": PROMPT}]), add_generation_prompt=True
    )
    ids = tokenizer.encode(prompt)
    assert (ids >= 0).all(), f"og.Tokenizer gave -1 ids: {ids.tolist()}"

    def reply(active: str | None) -> str:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        if active:
            generator.set_active_adapter(adapters, active)
        generator.append_tokens(ids)
        stream, text = tokenizer.create_stream(), ""
        while not generator.is_done():
            generator.generate_next_token()
            text += stream.decode(generator.get_next_tokens()[0])
        return text

    return reply(None), reply(adapter)


def test_plain_ort_genai_api_end_to_end(tiny_onnx):
    base, tuned = plain_genai_replies(tiny_onnx, "travel")
    assert base and tuned
    assert tuned != base, "the adapter changed nothing: set_active_adapter did not take"
    for text in (base, tuned):
        assert not any(sym in text for sym in ("Ġ", "Ċ")), f"byte-level symbols leaked into the text: {text!r}"


def test_og_tokenizer_equals_transformers_on_the_built_model(tiny_onnx, tiny_base):
    texts = [PROMPT, *MULTILINGUAL_SAMPLE]
    assert roundtrip_mismatches(tiny_onnx / "model", tiny_base, texts) == []


def test_the_check_catches_the_gguf_converted_tokenizer(tiny_onnx, tiny_base, tmp_path):
    """Negative control: the tokenizer.json transformers writes from the GGUF (SentencePiece-style decoder) fails."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_onnx / "model", model_dir, symlinks=True)
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        ],
    }
    (model_dir / "tokenizer.json").write_text(json.dumps(tok))
    problems = roundtrip_mismatches(model_dir, tiny_base, ["Hello world, how are you?"])
    assert problems and "differ" in problems[0], problems
    assert canonicalize(model_dir) == ["decoder -> ByteLevel"]
    assert roundtrip_mismatches(model_dir, tiny_base, ["Hello world, how are you?"]) == []


def test_canonical_tokenizer_keeps_the_gguf_tokenizer_ids(tiny_base):
    """Same ids as the tokenizer transformers builds from the shipped GGUF, so no metric moves."""
    import yaml

    from olive_lab.base_model import gguf_path, load_gguf_tokenizer
    from olive_lab.lm import load_tokenizer

    conf = yaml.safe_load((Path(__file__).parents[1] / "conf/model/tiny.yaml").read_text())
    original = load_gguf_tokenizer(gguf_path(conf["package"], conf["gguf_file"]), conf["eos_token"])
    canonical = load_tokenizer(tiny_base)
    for text in [PROMPT, *MULTILINGUAL_SAMPLE]:
        assert canonical(text, add_special_tokens=False).input_ids == original(text, add_special_tokens=False).input_ids
    messages = [{"role": "user", "content": PROMPT}]
    assert canonical.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(
        messages, tokenize=False
    )


def test_registered_folder_is_byte_identical_to_the_onnx_model(tiny_onnx, tmp_path, monkeypatch):
    """What upload registers (model.yml's path, as `az ml model create --file` resolves it) is models/onnx itself."""
    import time

    import yaml
    from azure.ai.ml import load_model

    from olive_lab.azure.registry import upload

    shutil.copytree(tiny_onnx, tmp_path / "models" / "onnx")
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    for key in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    receipt = upload(params, Path("models/onnx"), Path("metrics/eval.json"), Path("models/upload"), time.monotonic())
    registered = Path(load_model(tmp_path / "models/upload/model.yml").path)
    files = sorted(p.relative_to(registered) for p in registered.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tiny_onnx) for p in tiny_onnx.rglob("*") if p.is_file())
    for rel in files:
        assert (registered / rel).read_bytes() == (tiny_onnx / rel).read_bytes(), rel
    assert receipt["tags"]["adapters"] == "travel,trip_json"
