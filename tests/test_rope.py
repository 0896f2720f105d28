"""The LongRoPE rewrite that lets ORT capture a Phi-3 model in a CUDA graph (olive_lab.onnx.rope): the builder's
If on the sequence length becomes a Where on GroupQueryAttention's seqlens_k. It must keep the If's meaning on both
sides of the original context, in a full prefill and while decoding across the boundary. A tiny random Phi-3 whose
original context is 16 tokens makes both cases cheap (CPU; the If still runs there, so the two can be compared)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import ROOT

ORIGINAL = 16


@pytest.fixture(scope="module")
def longrope_onnx(tmp_path_factory) -> Path:
    from olive_lab.scale_model import build_random_onnx

    conf = yaml.safe_load((ROOT / "conf/model/tiny_phi3.yaml").read_text())
    conf["arch"] |= {"original_max_position_embeddings": ORIGINAL, "max_position_embeddings": 256}
    _, onnx_dir = build_random_onnx(conf, tmp_path_factory.mktemp("longrope"), "cpu", cuda_graph=False)
    return onnx_dir / "model"


def rewritten(src: Path, dst: Path, original: int) -> Path:
    from olive_lab.onnx.export import control_flow_nodes
    from olive_lab.onnx.rope import capturable_longrope

    shutil.copytree(src, dst)
    assert capturable_longrope(dst / "model.onnx", original)
    assert control_flow_nodes(dst / "model.onnx") == []
    return dst


def test_where_gives_the_ifs_logits_on_both_sides_of_the_original_context(longrope_onnx, tmp_path):
    from olive_lab.onnx.check import OnnxLM

    with_if = OnnxLM(longrope_onnx)
    where = OnnxLM(rewritten(longrope_onnx, tmp_path / "where", ORIGINAL))
    rng = np.random.default_rng(0)
    for length in (ORIGINAL - 4, ORIGINAL, ORIGINAL + 1, 3 * ORIGINAL):  # short factors up to 16 tokens, long after
        ids = rng.integers(100, 40000, length).tolist()
        np.testing.assert_array_equal(where.logits(ids), with_if.logits(ids), err_msg=f"{length} tokens")


def test_a_wrong_switch_point_is_visible(longrope_onnx, tmp_path):
    """Negative control: the comparison above can tell short from long factors."""
    from olive_lab.onnx.check import OnnxLM

    with_if = OnnxLM(longrope_onnx)
    early = OnnxLM(rewritten(longrope_onnx, tmp_path / "early", ORIGINAL // 2))
    ids = np.random.default_rng(1).integers(100, 40000, ORIGINAL - 2).tolist()
    assert np.abs(early.logits(ids) - with_if.logits(ids)).max() > 1e-4


def test_greedy_decoding_across_the_boundary_matches(longrope_onnx, tmp_path):
    import onnxruntime_genai as og

    from olive_lab.decode import ort_greedy

    where_dir = rewritten(longrope_onnx, tmp_path / "where", ORIGINAL)
    ids = np.random.default_rng(2).integers(100, 40000, ORIGINAL - 6).tolist()  # decoding crosses 16 tokens
    runs = []
    for model_dir in (longrope_onnx, where_dir):
        model = og.Model(str(model_dir))
        runs.append(ort_greedy(model, None, ids, None, 24, exact=True)[0])
        del model
    assert len(runs[0]) == 24 and runs[0] == runs[1]


def test_a_model_without_longrope_is_left_alone(tiny_onnx, tmp_path):
    from olive_lab.onnx.rope import capturable_longrope

    model = tmp_path / "model.onnx"
    shutil.copy(tiny_onnx / "model" / "model.onnx", model)
    before = model.read_bytes()
    assert capturable_longrope(model, 16) is False
    assert model.read_bytes() == before
