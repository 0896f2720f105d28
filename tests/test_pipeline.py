"""The real DVC pipeline on the tiny profile: runs end to end, re-runs only what a param change touches."""

from __future__ import annotations

import json

import pytest

from tests.pipeline import copy_repo, ran_stages, set_param, sh


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("tiny-repo"), ["experiment=tiny"])
    sh(repo, "dvc", "repro")
    return repo


def test_tiny_pipeline_runs_and_a_second_repro_does_nothing(tiny_repo):
    assert (tiny_repo / "models/quantized/config.json").exists()
    for task in ("travel", "trip_json"):
        assert (tiny_repo / f"models/adapters/{task}/adapter_config.json").exists()
        assert json.loads((tiny_repo / f"metrics/finetune/{task}.json").read_text())["adapter_eval_loss"] > 0
    again = sh(tiny_repo, "dvc", "repro")
    assert ran_stages(again.stdout) == set(), again.stdout
    assert "up to date" in sh(tiny_repo, "dvc", "status").stdout


def test_rerunning_quantize_with_identical_outputs_leaves_finetune_up_to_date(tiny_repo):
    """Wall-clock figures live in metrics/perf/, which nothing depends on: an identical quantize stops there."""
    forced = sh(tiny_repo, "dvc", "repro", "--force", "--single-item", "quantize")
    assert ran_stages(forced.stdout) == {"quantize"}, forced.stdout
    status = json.loads(sh(tiny_repo, "dvc", "status", "--json").stdout)
    assert status == {}, f"an identical quantize re-run made these stale: {status}"
    assert ran_stages(sh(tiny_repo, "dvc", "repro").stdout) == set()


def test_editing_one_task_param_reruns_only_that_task(tiny_repo):
    set_param(tiny_repo, "finetune.tasks.travel", {"max_steps": 2})
    status = json.loads(sh(tiny_repo, "dvc", "status", "--json").stdout)
    assert set(status) == {"finetune@travel"}, status
    ran = ran_stages(sh(tiny_repo, "dvc", "repro").stdout)
    assert "finetune@travel" in ran
    assert not ran & {"base", "data", "quantize", "finetune@trip_json"}, ran


def test_editing_a_shared_param_reruns_its_stage_and_nothing_upstream(tiny_repo):
    set_param(tiny_repo, "data.eval_fraction", 0.2)
    status = json.loads(sh(tiny_repo, "dvc", "status", "--json").stdout)
    assert set(status) == {"data"}, status


def test_a_broken_row_fails_the_stage_and_caches_nothing(tmp_path):
    repo = copy_repo(tmp_path, ["experiment=tiny"])
    path = repo / "data/trip_json.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"response": "{', '"response": "{{', 1)
    path.write_text("\n".join(lines) + "\n")
    proc = sh(repo, "dvc", "repro", "data", check=False)
    assert proc.returncode != 0
    assert "data: error: data/trip_json.jsonl:3: response is not valid JSON" in proc.stderr + proc.stdout
    assert not (repo / "data/split").exists()
    cache = repo / ".dvc/cache"
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))
