"""bench/cuda_lora.py's goal verdicts (the any-model issue's >= 400 tok/s and >= 8x torch eager), from a measured
file shaped as `measure` writes it, its check that built models carry the kernels asked for, and bench/cuda_e2e.py's
argument check. The timed GPU runs themselves are benchmarks, not tests."""

from __future__ import annotations

import json
import os

import pytest

from bench import cuda_lora
from bench.cuda_lora import goals_report, size_root
from olive_lab.kernels import LIBRARY


def run(tok_s: float, ttft_ms: float = 8.0) -> dict:
    return {"decode_tok_s": tok_s, "ttft_ms": ttft_ms, "tokens": [1, 2, 3], "same_tokens_every_round": True}


def measured(fused_base: float, torch_base: float) -> dict:
    return {
        "prompt_tokens": 95,
        "bandwidth_gbs": 3000.0,
        "bytes_per_step": 2.0e9,
        "block_size": 128,
        "lm_head": "fp32",
        "ort": {
            "plain": {"base": run(416.0), "switching_gives_same_tokens": True},
            "fused": {"base": run(fused_base), "a": run(300.0), "b": run(310.0), "switching_gives_same_tokens": True},
        },
        "torch_eager_bf16": {"base": {"decode_tok_s": torch_base, "ttft_ms": 26.0}, "a": {"decode_tok_s": 30.0,
                                                                                         "ttft_ms": 30.0}},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("fused_base", "torch_base", "verdicts"),
    [(413.0, 48.0, (True, True)), (390.0, 45.0, (False, True)), (413.0, 60.0, (True, False))],
)
def test_goals_are_judged_on_the_fused_layout_against_torch_in_the_same_run(tmp_path, fused_base, torch_base, verdicts):
    root = size_root(tmp_path, "phi35", 128, "fp32")
    root.mkdir(parents=True)
    (root / "measured.json").write_text(json.dumps(measured(fused_base, torch_base)))
    out = tmp_path / "goals.json"
    goals_report(tmp_path, "phi35", 128, "fp32", out)
    result = json.loads(out.read_text())
    assert tuple(result["goals"].values()) == verdicts
    assert result["adapter_cost"] == round(1 - 300.0 / fused_base, 3)  # the slower adapter
    assert result["fused_over_torch"] == round(fused_base / torch_base, 2)
    assert result["share_of_bound"]["fused"] == round(fused_base / 1500.0, 3)


def test_a_build_without_the_fused_layout_or_torch_is_one_line(tmp_path):
    root = size_root(tmp_path, "phi35", 128, "fp32")
    with pytest.raises(SystemExit, match="not measured yet"):
        goals_report(tmp_path, "phi35", 128, "fp32", tmp_path / "goals.json")
    root.mkdir(parents=True)
    no_torch = measured(413.0, 48.0) | {"torch_eager_bf16": {}}
    (root / "measured.json").write_text(json.dumps(no_torch))
    with pytest.raises(SystemExit, match="needs the fused layout and torch eager"):
        goals_report(tmp_path, "phi35", 128, "fp32", tmp_path / "goals.json")


def test_cuda_e2e_refuses_an_unknown_layout_in_one_line_before_loading_anything():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "bench.cuda_e2e", "measure", "--layouts", "plain,swtich"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--layouts: unknown swtich (known: plain, switch)" in done.stderr.strip().splitlines()[-1]


def test_the_kernels_measured_are_the_ones_olive_lab_kernels_names(tmp_path):
    import subprocess
    import sys

    library = tmp_path / "branch.so"
    done = subprocess.run(
        [sys.executable, "-c", "from bench.cuda_lora import KERNELS; print(KERNELS)"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OLIVE_LAB_KERNELS": str(library)},
    )
    assert done.stdout.strip() == str(library), done.stderr


def test_a_model_built_with_other_kernels_is_one_line_before_measuring(tmp_path, monkeypatch):
    asked, other = tmp_path / "asked.so", tmp_path / "other.so"
    asked.write_bytes(b"kernels of the branch")
    other.write_bytes(b"kernels of main")
    monkeypatch.setattr(cuda_lora, "KERNELS", asked)
    fused, plain, stale = tmp_path / "fused", tmp_path / "plain", tmp_path / "stale"
    for folder in (fused, plain, stale):
        folder.mkdir()
    (fused / LIBRARY).write_bytes(asked.read_bytes())
    (stale / LIBRARY).write_bytes(other.read_bytes())
    carried = cuda_lora.check_kernels({"fused": str(fused), "plain": str(plain)})
    assert carried == {"fused": cuda_lora.kernels_digest(asked)}  # plain carries no library
    with pytest.raises(SystemExit, match=f"{stale / LIBRARY}: built with other kernels"):
        cuda_lora.check_kernels({"fused": str(fused), "resident": str(stale)})
    monkeypatch.setattr(cuda_lora, "KERNELS", tmp_path / "not-built.so")  # measuring only plain needs no library
    assert cuda_lora.check_kernels({"plain": str(plain)}) == {}
