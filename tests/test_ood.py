"""The out-of-distribution trip_json rows (data/ood/): valid hand-written source data, never trained on, read by the
evaluate stage alone, and a bad line named by file and line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from olive_lab import paths
from olive_lab.data import _normalize, check_trip_json, prepare
from olive_lab.errors import StageError
from olive_lab.evaluate import OOD_KEY, json_results, read_ood
from olive_lab.scoring import TRIP_KEYS
from tests.helpers import ROOT, default_params, write_params
from tools.code_deps import code_deps, stage_entry

OOD = ROOT / paths.TRIP_JSON_OOD
TASKS = ["travel", "trip_json"]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def ood_rows() -> list[dict]:
    return read_ood(OOD)


# ---------------------------------------------------------------- the shipped file


def test_shipped_file_is_git_tracked_source_data_in_the_trip_json_schema():
    rows = ood_rows()
    assert len(rows) >= 40
    for row in rows:
        check_trip_json(row["response"])  # the data stage's own schema check: keys in order, types, real dates
        obj = json.loads(row["response"])
        assert row["response"] == json.dumps(obj, ensure_ascii=False), row  # written as data/trip_json.jsonl is
    # tracked and not ignored: a fresh clone has it, and no stage makes it
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(paths.TRIP_JSON_OOD)], cwd=ROOT)
    assert tracked.returncode == 0, f"{paths.TRIP_JSON_OOD} is not tracked in git"
    outs = [str(o if isinstance(o, str) else next(iter(o))) for s in STAGES.values() for o in s.get("outs", [])]
    assert not [o for o in outs if paths.TRIP_JSON_OOD.as_posix().startswith(o.rstrip("/") + "/")], outs


def test_shipped_file_covers_what_the_training_data_lacks():
    """The point of the file (data/README.md): relative or yearless dates, several places, other currencies, fields
    left open. Counted on the expected answers, so trimming the file below this mix fails."""
    objs = [json.loads(r["response"]) for r in ood_rows()]
    training_currencies = {"EUR", "USD", "GBP", "JPY", "CHF", "AUD", "CAD", "INR"}
    assert sum(1 for o in objs if o["destination"] and ", " in o["destination"]) >= 5  # several places
    assert sum(1 for o in objs if o["budget"] and o["budget"]["currency"] not in training_currencies) >= 5
    assert sum(1 for o in objs if o["destination"] is None) >= 3
    assert sum(1 for o in objs if all(o[k] is None for k in TRIP_KEYS)) >= 1
    assert sum(1 for o in objs if o["start_date"] is None) >= 25  # relative, yearless or no dates


# ---------------------------------------------------------------- never trained on


def overlap(ood: list[dict], split_dir: Path) -> set[str]:
    """Normalised OOD prompts (as the data stage's duplicate check normalises) found in any train or eval split."""
    seen = {
        _normalize(json.loads(line)["prompt"])
        for f in split_dir.glob("*/*.jsonl")
        for line in f.read_text(encoding="utf-8").splitlines()
        if line.strip()
    }
    return {_normalize(r["prompt"]) for r in ood} & seen


def test_no_ood_prompt_occurs_in_the_train_or_eval_splits(tmp_path):
    params = default_params()
    prepare(params["tasks"], params["data"], ROOT / "data", tmp_path / "split")  # what the data stage writes
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("split/*/*.jsonl")) == [
        f"split/{t}/{part}.jsonl" for t in sorted(params["tasks"]) for part in ("eval", "train")
    ]
    assert overlap(ood_rows(), tmp_path / "split") == set()
    # the check itself finds a leaked prompt, whatever its case and spacing
    leaked = ood_rows()[7]
    train = tmp_path / "split/trip_json/train.jsonl"
    row = {"prompt": "  " + leaked["prompt"].upper().replace(" ", "   "), "response": leaked["response"]}
    train.write_text(train.read_text() + json.dumps(row) + "\n")
    assert overlap(ood_rows(), tmp_path / "split") == {_normalize(leaked["prompt"])}


def test_only_the_evaluate_stage_depends_on_or_names_the_file():
    """dvc.yaml: the file is evaluate's dep alone. Code: no module of another stage names it (paths.py defines it)."""
    ood = paths.TRIP_JSON_OOD.as_posix()
    with_dep = {name for name, s in STAGES.items() if ood in s.get("do", s).get("deps", [])}
    assert with_dep == {"evaluate"}
    words = ("TRIP_JSON_OOD", "read_ood", "trip_json_ood", "data/ood")

    def naming(stage: str) -> set[str]:
        spec = STAGES[stage].get("do", STAGES[stage])
        files = code_deps(stage_entry(spec["cmd"]))
        return {f for f in files - {"olive_lab/paths.py"} if any(w in (ROOT / f).read_text() for w in words)}

    assert naming("evaluate") >= {"stages/evaluate.py", "olive_lab/evaluate.py"}  # the scan finds a reader
    for stage in set(STAGES) - {"evaluate"}:
        assert naming(stage) == set(), stage


RUNNER = """
import os, runpy, sys
opened = []
sys.addaudithook(lambda event, args: event == "open" and isinstance(args[0], (str, bytes, os.PathLike))
                 and opened.append(os.path.realpath(os.fsdecode(args[0]))))
log, module, *rest = sys.argv[1:]
sys.argv = [module, *rest]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    open(log, "w").write("\\n".join(opened))
"""


def opened_by(folder: Path, module: str, *args: str) -> set[str]:
    """Every file `python -m module args` opens in `folder` (Python's 'open' audit event), after it succeeded."""
    log = folder.parent / f"{folder.name}-{module}.opened"
    (folder.parent / "runner.py").write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(folder.parent)])}
    env.pop("STAGE_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, str(folder.parent / "runner.py"), str(log), module, *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(log.read_text().splitlines())


def test_the_data_and_finetune_stages_never_open_the_file(tmp_path, tiny_base):
    """Both stages run as DVC runs them, in a folder laid out like the repository with the OOD file in place."""
    work = tmp_path / "repo"
    (work / paths.TRIP_JSON_OOD).parent.mkdir(parents=True)
    for name in ("travel.jsonl", "trip_json.jsonl"):
        shutil.copy(ROOT / "data" / name, work / "data" / name)
    shutil.copy(OOD, work / paths.TRIP_JSON_OOD)
    shutil.copytree(tiny_base, work / paths.QUANTIZED)
    params = default_params()
    params["model"] = {**yaml.safe_load((ROOT / "conf/model/tiny.yaml").read_text()), "name": "tiny"}
    params["finetune"].update(max_steps=2, batch_size=2, max_seq_len=96, eval_batch_size=32, r=4, alpha=8)
    params["finetune"]["tasks"] = {}
    params["evaluate"]["max_seq_len"] = 96
    write_params(work, params)
    ood = str((work / paths.TRIP_JSON_OOD).resolve())

    data_opened = opened_by(work, "stages.data")
    assert str((work / "data/trip_json.jsonl").resolve()) in data_opened  # the hook sees the stage's reads
    assert ood not in data_opened, "the data stage opened the OOD file"
    tuned = opened_by(work, "stages.finetune", "trip_json")
    assert str((work / "data/split/trip_json/train.jsonl").resolve()) in tuned
    assert ood not in tuned, "the finetune stage opened the OOD file"
    assert (work / "models/adapters/trip_json/adapter_config.json").exists()
    # the same hook, on code that does read it
    (tmp_path / "reads_ood.py").write_text(
        "from olive_lab import paths\nfrom olive_lab.evaluate import read_ood\nread_ood(paths.TRIP_JSON_OOD)\n"
    )
    assert ood in opened_by(work, "reads_ood")


# ---------------------------------------------------------------- scoring it next to the eval split


def test_json_results_score_the_split_and_the_ood_rows_each_against_their_own_references():
    split, ood = ood_rows()[:2], ood_rows()[2:5]
    right = [r["response"] for r in split + ood]
    assert json_results(right, split, ood) == {
        "json_valid": 1.0,
        "field_accuracy": 1.0,
        OOD_KEY: {"json_valid": 1.0, "field_accuracy": 1.0},
    }
    # one OOD reply off by its destination only; the split's stay right
    wrong = json.loads(ood[1]["response"]) | {"destination": "Nowhere"}
    scores = json_results([*right[:3], json.dumps(wrong), right[4]], split, ood)
    assert scores["field_accuracy"] == 1.0
    assert scores[OOD_KEY] == {"json_valid": 1.0, "field_accuracy": round((3 - 1 / 7) / 3, 4)}
    # replies shifted by one row fail against the references
    assert json_results(right[1:] + right[:1], split, ood)[OOD_KEY]["field_accuracy"] < 1.0
    # no OOD rows: no OOD entry; a reply count that does not match the rows is an error, not a silent cut
    assert json_results(right[:2], split, []) == {"json_valid": 1.0, "field_accuracy": 1.0}
    with pytest.raises(ValueError):
        json_results(right[:4], split, ood)


# ---------------------------------------------------------------- a bad line


GOOD = json.dumps({"prompt": "Rome, a week", "response": json.dumps(dict.fromkeys(TRIP_KEYS) | {"duration_days": 7})})

BAD_LINES = [
    ('{"prompt": "Rome", "response": ', "not valid JSON (Expecting value at column "),
    ('["Rome"]', "a row must have exactly the keys 'prompt' and 'response', got list"),
    ('{"prompt": "Rome"}', "a row must have exactly the keys 'prompt' and 'response', got ['prompt']"),
    ('{"prompt": " ", "response": "{}"}', "field 'prompt' must be a non-empty string"),
    ('{"prompt": "Rome", "response": {"destination": "Rome"}}', "field 'response' must be a non-empty string"),
    ('{"prompt": "Rome", "response": "{destination: Rome}"}', "response is not valid JSON ("),
    (
        json.dumps({"prompt": "Rome", "response": json.dumps({"destination": "Rome"})}),
        f"response must be a JSON object with exactly the keys {TRIP_KEYS}, got ['destination']",
    ),
    (GOOD.replace("Rome, a week", "ROME,  a WEEK"), "duplicate prompt (same as line 1)"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_a_bad_line_names_file_and_line(tmp_path, line, reason):
    path = tmp_path / "ood.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD.replace('Rome', 'Oslo')}\n")  # the bad line is line 3
    with pytest.raises(StageError) as exc:
        read_ood(path)
    message = str(exc.value)
    assert message.startswith(f"{path}:3: {reason}"), message
    assert "\n" not in message


def test_a_missing_or_empty_file_is_one_line(tmp_path):
    with pytest.raises(StageError, match=r"ood.jsonl: not found \(a file tracked in git: `git checkout -- "):
        read_ood(tmp_path / "ood.jsonl")
    (tmp_path / "ood.jsonl").write_text("\n")
    with pytest.raises(StageError, match=r"ood.jsonl: no rows$"):
        read_ood(tmp_path / "ood.jsonl")
    (tmp_path / "ood.jsonl").write_bytes(GOOD.encode() + b"\n" + GOOD.replace("Rome", "R\xf4me").encode("latin-1"))
    with pytest.raises(StageError, match=r"ood.jsonl:2: not UTF-8"):
        read_ood(tmp_path / "ood.jsonl")


def test_evaluate_reports_ood_scores_wherever_it_reports_the_eval_splits(tiny_base, tiny_adapters, tiny_onnx):
    """On tiny models: every variant with JSON scores on the eval split has them on the OOD rows too, none other;
    with evaluate.max_prompts 0 neither."""
    from olive_lab.evaluate import Models, Upstream, evaluate_all

    rows = {t: [json.loads(x) for x in (ROOT / f"data/{t}.jsonl").read_text().splitlines()[:2]] for t in TASKS}
    models = Models(tiny_base, tiny_base, tiny_adapters["travel"].parent, tiny_onnx)
    losses = {"travel": 7.0, "trip_json": 6.0}
    upstream = Upstream(
        quantize={"task_eval_loss": {v: losses for v in ("fp32", "rtn", "awq", "quantized")}}, finetune={}, optimize={}
    )
    ev = {"max_prompts": 1, "max_new_tokens": 4, "max_seq_len": 64}
    results, _ = evaluate_all(models, upstream, rows, ev, "cpu", TASKS, ood_rows()[:3])
    scored = {name for name, m in results.items() if "json_valid" in m}
    assert len(scored) == 5 and "onnx+trip_json" in scored, scored
    assert {name for name, m in results.items() if OOD_KEY in m} == scored
    for name in scored:
        assert set(results[name][OOD_KEY]) == {"json_valid", "field_accuracy"}
        assert all(0 <= v <= 1 for v in results[name][OOD_KEY].values())
    results, _ = evaluate_all(models, upstream, rows, {**ev, "max_prompts": 0}, "cpu", TASKS, ood_rows()[:3])
    assert not [name for name, m in results.items() if "json_valid" in m or OOD_KEY in m]
