"""Data-parallel fine-tuning (device.gpus > 1) through the real stage: torchrun with gloo processes on the CPU runs
the same code as NCCL on GPUs. Two processes must follow the one-process loss curve and train the same adapter."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, default_params, error_lines, run_stage, write_params

STEPS = 5


def stage_dir(root, tiny_base, gpus: int, batch_size: int = 4):
    (root / "models").mkdir(parents=True)
    (root / "models/quantized").symlink_to(tiny_base)
    rows = (ROOT / "data/travel.jsonl").read_text().splitlines()
    (root / "data/split/travel").mkdir(parents=True)
    (root / "data/split/travel/train.jsonl").write_text("\n".join(rows[:24]) + "\n")
    (root / "data/split/travel/eval.jsonl").write_text("\n".join(rows[24:32]) + "\n")
    params = default_params()
    params["model"]["lora_targets"] = ["q_proj", "v_proj", "down_proj"]
    params["device"]["gpus"] = gpus
    params["finetune"].update(max_steps=STEPS, batch_size=batch_size, max_seq_len=96, r=4, alpha=8, tasks={})
    params["evaluate"]["max_seq_len"] = 96
    write_params(root, params)
    return root


def curve(root) -> list[float]:
    with open(root / "plots/finetune/travel.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def one_and_two(tiny_base, tmp_path_factory):
    runs = {}
    for gpus in (1, 2):
        root = stage_dir(tmp_path_factory.mktemp(f"gpus{gpus}"), tiny_base, gpus)
        result = run_stage("finetune", root, "travel")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[gpus] = root
    return runs


def test_two_processes_follow_the_one_process_curve(one_and_two):
    one, two = curve(one_and_two[1]), curve(one_and_two[2])
    assert len(one) == len(two) == STEPS
    # same global batch, summed gradients: only the summation order differs (fp32)
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) <= 2e-3 * abs(a), (one, two)
    assert one[-1] < one[0]


def test_two_processes_train_the_same_adapter(one_and_two):
    a = load_file(str(one_and_two[1] / "models/adapters/travel/adapter_model.safetensors"))
    b = load_file(str(one_and_two[2] / "models/adapters/travel/adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)
    perf = json.loads((one_and_two[2] / "metrics/perf/finetune_travel.json").read_text())
    assert perf["gpus"] == 2 and perf["samples_per_s"] > 0
    metrics = json.loads((one_and_two[2] / "metrics/finetune/travel.json").read_text())
    assert metrics["adapter_eval_loss"] < metrics["base_eval_loss"]


def test_more_processes_than_examples_per_step_is_one_line(tiny_base, tmp_path):
    root = stage_dir(tmp_path, tiny_base, gpus=3, batch_size=2)
    result = run_stage("finetune", root, "travel")
    assert result.returncode != 0
    assert any("finetune.batch_size 2 is smaller than device.gpus 3" in line for line in error_lines(result))
    assert not (root / "models/adapters").exists()


def test_gpus_must_be_a_positive_int(tiny_base, tmp_path):
    root = stage_dir(tmp_path, tiny_base, gpus=0)
    result = run_stage("finetune", root, "travel")
    assert result.returncode != 0
    assert error_lines(result) and "device.gpus" in error_lines(result)[0]
    shutil.rmtree(root)
