"""Quantize stage on the tiny model: AWQ really applies scales, weights sit on the int4 grid, no collapse."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from olive_lab import quantize as Q
from olive_lab.lm import encode_example, eval_loss, load_model, load_tokenizer
from tests.helpers import default_params, error_lines, run_stage, write_params

GROUP = 32
ROWS = [
    {
        "prompt": f"I am going to city number {i} in spring. What should I pack?",
        "response": f"For city {i} in spring, pack layers, a light rain jacket and comfortable walking shoes.",
    }
    for i in range(16)
]
QPARAMS = {"n_grid": 10, "bits": 4, "symmetric": False, "calib_samples": 12, "calib_seq_len": 64}


@pytest.fixture(scope="module")
def quantized(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("q")
    Q.quantize(tiny_base, out / "awq", "awq", QPARAMS, GROUP, ROWS, "cpu")
    Q.quantize(tiny_base, out / "rtn", "rtn", QPARAMS, GROUP, ROWS, "cpu")
    return tiny_base, out / "awq", out / "rtn"


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _rtn_asym(w: torch.Tensor, group: int) -> torch.Tensor:
    """Plain min/max asymmetric int4 round-to-nearest, as the ONNX int4 exporter does it."""
    g = w.reshape(-1, group)
    lo, hi = g.min(dim=1, keepdim=True).values, g.max(dim=1, keepdim=True).values
    scale = (hi - lo).clamp(min=1e-12) / 15
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, 15)
    return ((q - zero) * scale).reshape(w.shape)


def test_weights_sit_on_the_int4_grid_and_requantize_exactly(quantized):
    _, awq, _ = quantized
    meta = json.loads((awq / Q.META_FILE).read_text())
    assert meta["group_size"] == GROUP and meta["bits"] == 4 and meta["quantized"]
    weights = _weights(awq)
    for name in meta["quantized"]:
        w = weights[name]
        assert max(len(torch.unique(g)) for g in w.reshape(-1, GROUP)) <= 16, name
        # Re-quantizing to the same grid reproduces the weights (up to float rounding): the export loses nothing.
        torch.testing.assert_close(_rtn_asym(w, GROUP), w, rtol=0, atol=1e-6)
    assert "lm_head.weight" not in meta["quantized"]


def test_awq_scales_were_applied(quantized):
    base, awq, rtn = quantized
    a, r, b = _weights(awq), _weights(rtn), _weights(base)
    linear = json.loads((awq / Q.META_FILE).read_text())["quantized"]
    differ = [n for n in linear if not torch.equal(a[n], r[n])]
    # AWQ may keep identity scales for a mapping where they are best, but not for most of them.
    assert len(differ) >= len(linear) / 2, f"AWQ and RTN weights are equal in {len(linear) - len(differ)} layers"
    # AWQ folds its per-channel scales into the preceding norms.
    norms = [n for n in b if "layernorm" in n]
    assert any(not torch.equal(a[n], b[n]) for n in norms), "no norm carries AWQ scales"

    tok = load_tokenizer(base)
    ids = torch.tensor([encode_example(tok, r["prompt"], r["response"], 64)[0][:40] for r in ROWS])
    with torch.inference_mode():
        logits = {p: load_model(p)(ids).logits for p in (base, awq, rtn)}
    awq_err = (logits[awq] - logits[base]).pow(2).mean()
    rtn_err = (logits[rtn] - logits[base]).pow(2).mean()
    assert awq_err < rtn_err, f"AWQ error {awq_err:.3g} not below RTN {rtn_err:.3g} on calibration inputs"


def test_quantized_loss_stays_close_to_fp32(quantized):
    base, awq, _ = quantized
    tok = load_tokenizer(base)
    fp32 = eval_loss(load_model(base), tok, ROWS, 64)
    q = eval_loss(load_model(awq), tok, ROWS, 64)
    assert abs(q - fp32) / fp32 < 0.05, f"quantized loss {q:.3f} vs fp32 {fp32:.3f}: collapsed"


def test_cuda_on_a_cpu_machine_fails_at_once(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    params = default_params()
    params["device"]["name"] = "cuda"
    write_params(tmp_path, params)
    proc = run_stage("quantize", tmp_path, timeout=120)
    assert proc.returncode == 1
    assert error_lines(proc) == [
        "quantize: error: device=cuda but no CUDA GPU is visible to torch here; use device=cpu"
    ]
    assert "Traceback" not in proc.stderr
