"""bench/cuda_lora.py's goal verdicts (the any-model issue's >= 400 tok/s and >= 8x torch eager), from a measured
file shaped as `measure` writes it, and bench/cuda_e2e.py's argument check. The timed GPU runs themselves are benchmarks,
not tests."""

from __future__ import annotations

import json

import pytest

from bench.cuda_lora import goals_report, size_root


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
