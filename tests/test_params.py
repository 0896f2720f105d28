"""params.yaml is what `dvc exp run` would compose from conf/, so plain `dvc repro` and experiments agree."""

from __future__ import annotations

import yaml

from olive_lab.params import compose_params
from tests.helpers import ROOT


def test_params_yaml_equals_the_composition_of_conf(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "params.yaml"
    compose_params(out, [], ROOT / "conf")
    assert out.read_text() == (ROOT / "params.yaml").read_text(), "params.yaml drifted from conf/: run `make params`"


def test_overrides_compose_like_dvc_exp_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "params.yaml"
    compose_params(out, ["model=phi35_mini", "finetune.max_steps=50", "device=cuda"], ROOT / "conf")
    params = yaml.safe_load(out.read_text())
    assert params["model"]["hub_id"] == "microsoft/Phi-3.5-mini-instruct"
    assert params["model"]["group_size"] == 32 and params["optimize"]["block_size"] == 32
    assert params["model"]["lora_targets"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert params["finetune"]["max_steps"] == 50
    assert params["device"]["execution_provider"] == "cuda"


def test_every_task_has_data_and_finetune_settings():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert len(params["tasks"]) >= 2
    for task in params["tasks"]:
        assert (ROOT / "data" / f"{task}.jsonl").exists()
        assert task in params["finetune"]["tasks"]


def test_the_gpu_scale_params_equal_the_composition_their_script_names(tmp_path, monkeypatch):
    """bench/gpu/params-phi35-shape.yaml travels to the offline GPU host, which has no Hydra: a conf/ change (a new
    stage param) must show up in it too, or the stages fail there after a paid-for machine start."""
    import re
    import shlex

    monkeypatch.chdir(ROOT)
    script = (ROOT / "bench/gpu/run_phi35_shape.sh").read_text()
    command = re.search(
        r"params-phi35-shape\.yaml params\.yaml\s+# composed with: python -m tools\.params (.+)", script
    )
    assert command, "run_phi35_shape.sh no longer says how its params file was composed"
    out = tmp_path / "params.yaml"
    compose_params(out, shlex.split(command.group(1)), ROOT / "conf")
    assert out.read_text() == (ROOT / "bench/gpu/params-phi35-shape.yaml").read_text(), (
        f"bench/gpu/params-phi35-shape.yaml drifted from conf/: python -m tools.params {command.group(1)} "
        "--out bench/gpu/params-phi35-shape.yaml"
    )
