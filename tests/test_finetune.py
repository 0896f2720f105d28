"""Finetune stage on the tiny model: response-only labels, deterministic adapters, loss goes down."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from olive_lab.errors import StageError
from olive_lab.lm import IGNORE, encode_example, load_tokenizer
from olive_lab.lora import finetune
from tests.helpers import ROOT

SETTINGS = {
    "r": 4,
    "alpha": 8,
    "dropout": 0.0,
    "target_modules": ["q_proj", "v_proj", "down_proj"],
    "learning_rate": 0.01,
    "max_steps": 6,
    "batch_size": 4,
    "max_seq_len": 96,
    "seed": 3,
    "eval_batch_size": 8,
    "eval_max_seq_len": 96,
}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    rows = (ROOT / "data/travel.jsonl").read_text().splitlines()
    (root / "travel").mkdir()
    (root / "travel/train.jsonl").write_text("\n".join(rows[:24]) + "\n")
    (root / "travel/eval.jsonl").write_text("\n".join(rows[24:32]) + "\n")
    return root


def test_labels_cover_the_response_and_its_end_token_only(tiny_base):
    tok = load_tokenizer(tiny_base)
    ids, labels = encode_example(tok, "Where is Lisbon?", "In Portugal.", 256)
    scored = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE]
    assert tok.decode(scored) == "In Portugal.<|im_end|>"
    assert tok.decode(ids).startswith("<|im_start|>system")  # the model's own chat template


def test_same_seed_gives_the_same_adapter_and_training_lowers_the_loss(tiny_base, splits, tmp_path):
    runs = []
    for name in ("a", "b"):
        metrics, curve, _ = finetune("travel", SETTINGS, "cpu", tiny_base, splits, tmp_path / name)
        runs.append(load_file(str(tmp_path / name / "adapter_model.safetensors")))
        assert len(curve) == SETTINGS["max_steps"]
    assert runs[0].keys() == runs[1].keys() and runs[0]
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
    assert metrics["adapter_eval_loss"] < metrics["base_eval_loss"], metrics
    config = json.loads((tmp_path / "a/adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}


def test_an_adapter_folder_is_byte_identical_across_processes(tiny_base, tmp_path):
    """PEFT writes target_modules in a set's order, which follows the process's string hashing: without
    olive_lab.lora.save_adapter's sorting, every run gave models/adapters a new DVC hash."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    script = (
        "import sys; from pathlib import Path; from olive_lab.lora import random_adapter; "
        f"random_adapter(Path(sys.argv[1]), Path(sys.argv[2]), 0, target_modules={targets!r})"
    )
    folders = []
    for hash_seed in ("1", "2", "3"):
        out = tmp_path / f"seed{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-c", script, str(tiny_base), str(out)], env=env, check=True, cwd=ROOT)
        folders.append({f.name: f.read_bytes() for f in sorted(out.iterdir())})
    assert folders[0].keys() == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    for other in folders[1:]:
        for name in folders[0]:
            assert other[name] == folders[0][name], name
    assert json.loads(folders[0]["adapter_config.json"])["target_modules"] == sorted(targets)


def test_a_failed_run_leaves_no_adapter_folder(tiny_base, splits, tmp_path):
    bad = dict(SETTINGS, target_modules=["q_proj", "no_such_module"])
    with pytest.raises(
        StageError,
        match=r"model.lora_targets \['no_such_module'\] not found among the Linear layers of LlamaForCausalLM; it has \['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]",
    ):
        finetune("travel", bad, "cpu", tiny_base, splits, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
