"""olive_lab.gguf_export: the GGUF that bench/scaling.py hands to llama.cpp holds the same model as the HF folder.

transformers' own GGUF loader (gguf_file=) reads it back and undoes llama.cpp's q/k row order, so equal logits prove
the names, the shapes, the permutation and the tokenizer fields at once.
"""

from __future__ import annotations

import json
import shutil

import pytest

from olive_lab.errors import StageError
from olive_lab.gguf_export import model_gguf, permute
from tests.conftest import tiny_model_params

IDS = [[1, 50, 400, 2000, 7, 9, 30000, 12, 2]]


def shipped_tokenizer_gguf():
    from olive_lab.base_model import gguf_path

    params = tiny_model_params()
    return gguf_path(params["package"], params["gguf_file"])


def logits(folder, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs)
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def with_rope_theta(tiny_base, folder, theta: float):
    """A copy of the tiny model with another RoPE base (SmolLM2 uses 100000, 1.7B 130000; tiny has the default)."""
    shutil.copytree(tiny_base, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {**config.get("rope_parameters", {}), "rope_theta": theta, "rope_type": "default"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("dtype, atol", [("f32", 1e-5), ("f16", 2e-2)])
def test_the_gguf_gives_the_hf_models_logits(tiny_base, tmp_path, dtype, atol):
    import gguf

    hf_dir = with_rope_theta(tiny_base, tmp_path / "hf", 130000.0)
    out = model_gguf(hf_dir, tmp_path / f"tiny-{dtype}.gguf", shipped_tokenizer_gguf(), dtype)
    assert not list(tmp_path.glob("*.partial"))
    reader = gguf.GGUFReader(str(out))
    config = json.loads((hf_dir / "config.json").read_text())
    assert reader.fields["llama.rope.freq_base"].contents() == 130000.0
    assert reader.fields["llama.block_count"].contents() == config["num_hidden_layers"]
    assert reader.fields["llama.attention.head_count_kv"].contents() == config["num_key_value_heads"]
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == config["vocab_size"]
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {dtype.upper()}
    expected, got = logits(hf_dir), logits(tmp_path, gguf_file=out.name)
    assert (expected - got).abs().max().item() < atol
    assert (expected - logits(tiny_base)).abs().max().item() > 1e-3  # the RoPE base shows in the logits


def test_permute_is_what_makes_q_and_k_agree(tiny_base, tmp_path, monkeypatch):
    """Negative control: without the q/k permutation the same writer gives a different model."""
    import olive_lab.gguf_export as gguf_export

    monkeypatch.setattr(gguf_export, "permute", lambda rows, n_head: rows)
    out = gguf_export.model_gguf(tiny_base, tmp_path / "tiny.gguf", shipped_tokenizer_gguf(), "f32")
    assert (logits(tiny_base) - logits(tmp_path, gguf_file=out.name)).abs().max().item() > 1e-3


def test_permute_keeps_each_head_in_place():
    import numpy as np

    rows = np.arange(2 * 8 * 3).reshape(2 * 8, 3)  # 2 heads of 8 rows
    out = permute(rows, 2)
    assert sorted(out[:8, 0].tolist()) == sorted(rows[:8, 0].tolist())
    assert out[:, 0].tolist()[:4] == [0, 12, 3, 15]  # halves interleaved: 0,4,1,5,... of rows in units of 3


def test_a_model_it_cannot_write_fails_in_one_line(tiny_base, tmp_path):
    folder = tmp_path / "phi3"
    shutil.copytree(tiny_base, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    with pytest.raises(StageError, match=r"config.json: GGUF export writes Llama-architecture models, not 'phi3'"):
        model_gguf(folder, tmp_path / "x.gguf", shipped_tokenizer_gguf())
    scaled = {"rope_theta": 10000.0, "rope_type": "llama3", "factor": 8.0}
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama", "rope_parameters": scaled}))
    with pytest.raises(StageError, match=r"rope_parameters.rope_type is 'llama3'; this GGUF export writes plain RoPE"):
        model_gguf(folder, tmp_path / "x.gguf", shipped_tokenizer_gguf())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    with pytest.raises(StageError, match=r"vocab_size 49160 but SmolLM2-135M-Instruct.Q4_1.gguf has 49152 tokens"):
        model_gguf(folder, tmp_path / "x.gguf", shipped_tokenizer_gguf())
    assert not list(tmp_path.glob("x.gguf*"))
