"""bench/scaling.py's own logic, without llama.cpp: which sizes fit this host, the bytes a llama.cpp step reads, how
the issue's goals are judged, and bad input. (The timed runs themselves are benchmarks, not tests.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.scaling import add_run_best_bound, fits, gguf_bytes_per_token, goals, model_conf, paired_ratios
from tests.conftest import ROOT
from tests.test_gguf_export import shipped_tokenizer_gguf


def test_a_size_the_host_cannot_build_says_why_and_a_small_one_fits(monkeypatch):
    import olive_lab.memory as memory

    monkeypatch.setattr(memory, "available_host_gb", lambda: 24.0)
    reason = fits(model_conf("3.8b"))
    assert reason and "the base stage needs about 31.4 GB" in reason and "3.93B" in reason
    assert fits(model_conf("135m")) is None


@pytest.mark.parametrize("tied", [True, False])
def test_llama_step_bytes_count_the_embedding_by_one_row_unless_it_is_the_output(tiny_base, tmp_path, tied):
    import json
    import shutil

    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from olive_lab.gguf_export import model_gguf

    folder = tmp_path / "hf"
    if tied:
        shutil.copytree(tiny_base, folder)
    else:  # the same weights with their own output matrix
        model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32, tie_word_embeddings=False)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    out = model_gguf(folder, tmp_path / "m.gguf", shipped_tokenizer_gguf(), "f32")
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(out)).tensors}
    embedding = tensors["token_embd.weight"]
    read = gguf_bytes_per_token(out, None, context=10, config=config)
    row = embedding // config["vocab_size"]
    assert read["weights"] == sum(tensors.values()) - (0 if tied else embedding - row)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert read["kv_cache"] == 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2 * 10


def size_result(params_b, adapter_ratio, share, prefill):
    return {
        "params_b": params_b,
        "ratio": {"adapter_vs_llama_same_adapter": adapter_ratio, "prefill": prefill},
        "share_of_bound": {"ort_base": share, "ort_adapter": share},
    }


def test_goals_are_judged_per_size_and_unmeasured_ones_are_none():
    met = goals({"135m": size_result(0.135, 1.31, 0.3, 0.9), "1.7b": size_result(1.71, 1.5, 0.6, 1.0)})
    assert met == {
        "adapter_ratio_ge_1.5_at_1.7b_plus": True,
        "adapter_ratio_ge_1.3_at_135m": True,
        "share_of_bound_ge_0.6_at_1.7b_plus": True,
        "prefill_at_least_llama_at_1.7b_plus": True,
    }
    missed = goals({"135m": size_result(0.135, 1.29, 0.3, 1.2), "1.7b": size_result(1.71, 1.49, 0.59, 0.99)})
    assert not any(missed.values())
    # the rounds' own ratios decide where measured, not the medians' ratio rounded for the table
    rounded_up = {**size_result(0.135, 1.3, 0.3, 1.0), "ratio_per_round": {
        "adapter_vs_llama_same_adapter": {"median": 1.284, "rounds": [1.27, 1.284, 1.31]}}}  # fmt: skip
    assert goals({"135m": rounded_up})["adapter_ratio_ge_1.3_at_135m"] is False
    skipped = goals({"3.8b": {"skipped": "too big"}})
    assert set(skipped.values()) == {None}


def test_a_size_measured_in_a_busy_stretch_is_judged_against_the_run_best_bandwidth():
    busy = {**size_result(1.71, 1.5, 0.9, 1.0), "copy_bandwidth_gb_s": 20.0}  # its own readings all low
    quiet = {**size_result(0.135, 1.3, 0.3, 1.0), "copy_bandwidth_gb_s": 50.0}
    sizes = {"135m": quiet, "1.7b": busy, "3.8b": {"skipped": "too big"}}
    add_run_best_bound(sizes)
    assert busy["share_of_run_best_bound"] == {"ort_base": 0.36, "ort_adapter": 0.36}
    assert quiet["share_of_run_best_bound"] == quiet["share_of_bound"]
    assert busy["run_best_copy_bandwidth_gb_s"] == 50.0 and "share_of_run_best_bound" not in sizes["3.8b"]
    assert goals(sizes)["share_of_bound_ge_0.6_at_1.7b_plus"] is False  # 0.9 of its own bound, 0.36 of the host's


def test_each_round_is_its_own_ratio():
    def stamps(tok_s):  # a first token at 0.2 s, then 8 more at tok_s
        return [0.2 + i / tok_s for i in range(9)]

    # the host slows down in round 2 for both engines: the round's own ratio stays 1.3
    paired = paired_ratios([stamps(130), stamps(65), stamps(120)], [stamps(100), stamps(50), stamps(100)])
    assert paired == {"median": 1.3, "rounds": [1.3, 1.3, 1.2]}
    with pytest.raises(ValueError):
        paired_ratios([stamps(130)], [])


def test_an_unknown_size_fails_in_one_line():
    run = subprocess.run([sys.executable, "-m", "bench.scaling", "--sizes", "135m,7b"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert run.returncode != 0
    assert run.stderr.strip() == "--sizes: unknown size '7b' (known: 135m, 360m, 1.7b, 3.8b)"


@pytest.mark.parametrize(
    ("returncode", "stderr", "message"),
    [
        (-11, "", "llama.cpp crashed (signal 11) decoding m.gguf with l.gguf: rebuild it with `make bench-setup`"),
        (1, "Traceback ...\nValueError: Failed to load model from file: m.gguf", "llama.cpp could not decode m.gguf "
         "with l.gguf: ValueError: Failed to load model from file: m.gguf"),
    ],
)  # fmt: skip
def test_a_llama_cpp_that_crashes_in_its_child_stops_the_bench_in_one_line(monkeypatch, returncode, stderr, message):
    import bench.scaling as scaling

    def run(argv, **kwargs):
        raise subprocess.CalledProcessError(returncode, argv, output="", stderr=stderr)

    monkeypatch.setattr(scaling.subprocess, "run", run)
    with pytest.raises(SystemExit) as exit_info:
        scaling.llama_peak_rss_mb(Path("m.gguf"), Path("l.gguf"), 2)
    assert str(exit_info.value).startswith(message)
    assert "\n" not in str(exit_info.value)
