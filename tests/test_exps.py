"""make exps (tools/exps.py): the key columns of `dvc exp show`, readable in a 120-column terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.helpers import ROOT
from tools.exps import KEY_COLUMNS, table


def exps(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.exps", *args], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )  # fmt: skip


def test_the_committed_run_shows_its_method_and_ratio_within_120_columns():
    proc = exps(ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["experiment", "model", "quantize", "int8", "layers", "ppl/fp32", "travel", "loss",
                                "trip", "fields", "OOD", "fields", "tok/s"]  # fmt: skip
    workspace = next(line for line in lines if line.startswith("workspace"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    quantize = json.loads((ROOT / "metrics/quantize.json").read_text())
    cells = workspace.split()
    assert params["model"]["name"] in cells and params["quantize"]["method"] in cells, workspace
    assert str(quantize["ppl_over_fp32"]) in cells, workspace
    assert "-" not in cells, f"a key column DVC no longer has: {workspace}"
    assert max(len(line) for line in lines) <= 120, proc.stdout


def test_a_column_dvc_lacks_is_a_dash():
    csv_text = "Experiment,rev,model.name,ppl_over_fp32\n,workspace,tiny,1.5\nexp-1,abc,tiny,1.2\n"
    rows = table(csv_text).splitlines()
    assert rows[1].split() == ["workspace", "tiny", *["-"] * 2, "1.5", *["-"] * (len(KEY_COLUMNS) - 4)]
    assert rows[2].split()[0] == "exp-1"


def test_outside_a_dvc_repository_it_fails_in_one_line(tmp_path):
    proc = exps(tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exps: dvc exp show failed: ERROR: you are not inside of a DVC"), (
        lines
    )
