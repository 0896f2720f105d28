"""GPTQ, AWQ+GPTQ and mixed precision on the tiny model, through the real llm-compressor and the real ONNX export:
each weight sits on its 4- or 8-bit grid, the export keeps exactly that grid (olive_lab.onnx.grid), int8 lands on the
MatMuls llama.cpp's rule picks, and ORT GenAI computes what torch does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from olive_lab import quantize as Q
from olive_lab.errors import StageError
from olive_lab.int4_grid import GRID_FILE
from olive_lab.lm import load_model
from olive_lab.onnx.check import int4_grid_error, require_agreement
from olive_lab.onnx.export import build_onnx, torch_agreement
from tests.test_quantize import GROUP, QPARAMS, ROWS

MIXED = {**QPARAMS, "int8_layers": "sensitive", "int8_modules": ["q_proj", "k_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def mixed(tiny_base, tmp_path_factory):
    """{method: quantized folder}: GPTQ plain, AWQ+GPTQ with the sensitive layers at int8."""
    out = tmp_path_factory.mktemp("quant-methods")
    Q.quantize(tiny_base, out / "gptq", "gptq", QPARAMS, GROUP, ROWS, "cpu")
    Q.quantize(tiny_base, out / "awq+gptq", "awq+gptq", MIXED, GROUP, ROWS, "cpu")
    return {"gptq": out / "gptq", "awq+gptq": out / "awq+gptq"}


def test_sensitive_layers_follow_llama_cpp():
    # llama.cpp's use_more_bits: i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2; SmolLM2 has 30 layers, Phi-3.5 32
    assert Q.sensitive_layers(30) == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29]
    assert Q.sensitive_layers(32) == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert Q.sensitive_layers(2) == [0]  # the tiny model


def test_each_weight_sits_on_its_grid_and_int8_is_where_configured(mixed):
    for method, folder in mixed.items():
        meta = json.loads((folder / Q.META_FILE).read_text())
        weights, grid = load_file(str(folder / "model.safetensors")), load_file(str(folder / GRID_FILE))
        int8 = set(meta["int8"])
        expected = {f"model.layers.0.{p}.weight" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                           "mlp.down_proj")}  # fmt: skip
        assert int8 == (expected if method == "awq+gptq" else set()), method
        for name in meta["quantized"]:
            bits = 8 if name in int8 else 4
            w, scale, zero = weights[name], grid[f"{name}.scale"], grid[f"{name}.zero_point"].float()
            groups = w.reshape(w.shape[0], -1, GROUP) / scale.unsqueeze(-1) + zero.unsqueeze(-1)
            torch.testing.assert_close(groups, groups.round(), rtol=0, atol=1e-3)  # whole numbers: on the grid
            q = groups.round()
            assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1, (name, bits)
        assert any(len(torch.unique(g)) > 16 for n in int8 for g in weights[n].reshape(-1, GROUP)) or not int8


def test_gptq_beats_round_to_nearest_on_the_calibration_inputs(mixed, tiny_base, tmp_path):
    """GPTQ's point, on the very inputs it calibrated on: a smaller output error than RTN on the same grid."""
    from olive_lab.lm import encode_example, load_tokenizer

    Q.quantize(tiny_base, tmp_path / "rtn", "rtn", QPARAMS, GROUP, ROWS, "cpu")
    tok = load_tokenizer(tiny_base)
    ids = torch.tensor([encode_example(tok, r["prompt"], r["response"], 64)[0][:40] for r in ROWS])
    with torch.inference_mode():
        ref = load_model(tiny_base)(ids).logits
        err = {p.name: (load_model(p)(ids).logits - ref).pow(2).mean() for p in (mixed["gptq"], tmp_path / "rtn")}
    assert err["gptq"] < err["rtn"], err


def test_export_writes_the_torch_grid_exactly_and_int8_where_quantized(mixed, tmp_path):
    import onnx

    for method, folder in mixed.items():
        out = tmp_path / method
        build_onnx(folder, out, {}, precision="int4", block_size=GROUP, execution_provider="cpu")
        graph = onnx.load(str(out / "model" / "model.onnx"), load_external_data=False).graph
        bits = {
            n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"
        }
        eight = sorted(name for name, b in bits.items() if b == 8)
        if method == "awq+gptq":
            assert eight == ["/lm_head/MatMul_Q8", "/model/layers.0/attn/qkv_proj/MatMul_Q8",
                             "/model/layers.0/mlp/down_proj/MatMul_Q8"]  # fmt: skip
        else:
            assert eight == ["/lm_head/MatMul_Q8"]
        error = int4_grid_error(out / "model" / "model.onnx", folder)
        assert error["max_abs"] == 0 and error["moved_share"] == 0, (method, error)
        assert error["int8_matmuls"] == len(eight) - 1


def test_without_the_saved_grid_the_builder_moves_gptq_weights(mixed, tmp_path):
    """Why olive_lab.onnx.grid exists: GPTQ's blocks rarely reach both ends of their grid, so the builder's own
    min/max rounding picks other grids and moves weights."""
    folder = tmp_path / "no-grid"
    shutil.copytree(mixed["gptq"], folder)
    (folder / GRID_FILE).unlink()
    build_onnx(folder, tmp_path / "onnx", {}, precision="int4", block_size=GROUP, execution_provider="cpu")
    error = int4_grid_error(tmp_path / "onnx" / "model" / "model.onnx", folder)
    assert error["moved_share"] > 0.01, error


def test_mixed_model_runs_in_ort_and_agrees_with_torch(mixed, tiny_adapters, tmp_path):
    """ORT's 8-bit MatMulNBits kernels on the rewritten initializers compute what torch does, adapters included."""
    from olive_lab.lora import random_adapter

    folder = mixed["awq+gptq"]
    adapter = random_adapter(folder, tmp_path / "adapter", seed=3)
    out = tmp_path / "onnx"
    build_onnx(folder, out, {"travel": adapter}, precision="int4", block_size=GROUP, execution_provider="cpu")
    checks = {"agreement": torch_agreement(out, folder, {"travel": adapter}, {"travel": ROWS}, 64)}
    require_agreement(checks, out)
    assert checks["agreement"]["base"]["argmax_agreement"] >= 0.95, checks


def test_a_grid_bits_mismatch_is_one_line(mixed, tmp_path):
    folder = tmp_path / "q"
    shutil.copytree(mixed["awq+gptq"], folder)
    build_onnx(folder, tmp_path / "onnx", {}, precision="int4", block_size=GROUP, execution_provider="cpu")
    meta = json.loads((folder / Q.META_FILE).read_text())
    (folder / Q.META_FILE).write_text(json.dumps({**meta, "int8": []}))  # the checkpoint now claims int4 everywhere
    with pytest.raises(StageError, match=r"qkv_proj/MatMul_Q8 is 8-bit, but the quantize stage put .* on a 4-bit grid"):
        int4_grid_error(tmp_path / "onnx" / "model" / "model.onnx", folder)


@pytest.mark.parametrize(
    "layers, modules, says",
    [
        ([0], ["v_proj"], "quantize.int8_modules lists ['v_proj'] but not ['k_proj', 'q_proj']"),
        ([5], ["down_proj"], "quantize.int8_layers must be 'sensitive', a list of layer indices in 0..1"),
        ([0], ["wo"], "quantize.int8_modules: 'wo' is not a Linear of layer 0"),
    ],
)
def test_bad_mixed_precision_settings_are_one_line(tiny_base, layers, modules, says):
    model = load_model(tiny_base)
    with pytest.raises(StageError, match=None) as info:
        Q.int8_module_names(model, layers, modules)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_node_tensors_pack_like_matmulnbits():
    """The packing olive_lab.onnx.grid writes, read back by the check's own unpacking (little nibble first)."""
    from olive_lab.onnx.check import _unpack
    from olive_lab.onnx.grid import node_tensors

    rng = np.random.default_rng(0)
    for bits in (4, 8):
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        q = rng.integers(lo, hi + 1, size=(3, 2, 8)).astype(np.float32)
        zero = rng.integers(lo, hi + 1, size=(3, 2)).astype(np.int8)
        scale = rng.uniform(0.01, 0.1, size=(3, 2)).astype(np.float32)
        weight = ((q - zero[..., None]) * scale[..., None]).reshape(3, 16)
        t = node_tensors(weight, scale, zero, bits, 8)
        back = _unpack(t["B"].reshape(3, 2, -1), bits, 8) - 2 ** (bits - 1)
        np.testing.assert_array_equal(back, q)
        zp = _unpack(t["zero_points"].reshape(3, -1), bits, 2) - 2 ** (bits - 1)
        np.testing.assert_array_equal(zp, zero)
