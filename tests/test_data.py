"""Data stage: the shipped datasets are valid, the split is deterministic, and a bad row names file:line."""

from __future__ import annotations

import json
import shutil

import pytest

from olive_lab.data import check_trip_json, load_task, prepare
from olive_lab.scoring import TRIP_KEYS, score_trip_json
from tests.helpers import ROOT, default_params, error_lines, run_stage, write_params

DATA = default_params()["data"]


@pytest.mark.parametrize("task", default_params()["tasks"])
def test_shipped_datasets_are_valid_and_large_enough(task):
    rows = load_task(ROOT / "data" / f"{task}.jsonl", task, DATA["max_prompt_chars"], DATA["max_response_chars"])
    assert len(rows) >= 250


def test_split_is_deterministic_and_disjoint(tmp_path):
    a = prepare(["travel", "trip_json"], DATA, ROOT / "data", tmp_path / "a")
    b = prepare(["travel", "trip_json"], DATA, ROOT / "data", tmp_path / "b")
    assert a == b
    for task in a:
        for part in ("train", "eval"):
            assert (tmp_path / "a" / task / f"{part}.jsonl").read_bytes() == (
                tmp_path / "b" / task / f"{part}.jsonl"
            ).read_bytes()
        train = {json.loads(x)["prompt"] for x in (tmp_path / "a" / task / "train.jsonl").read_text().splitlines()}
        held = {json.loads(x)["prompt"] for x in (tmp_path / "a" / task / "eval.jsonl").read_text().splitlines()}
        assert not train & held and len(train) + len(held) == a[task]["rows"]
        assert a[task]["eval"] == round(a[task]["rows"] * DATA["eval_fraction"])


GOOD_TRIP = json.dumps(dict.fromkeys(TRIP_KEYS) | {"destination": "Lisbon", "travelers": 2})

BAD_ROWS = [
    ("travel", '{"prompt": "Where to?", "response": "Lisbon"', "not valid JSON"),
    ("travel", '{"prompt": "Where to?"}', "exactly the keys 'prompt' and 'response'"),
    ("travel", '{"prompt": "  ", "response": "Lisbon"}', "field 'prompt' is empty"),
    ("travel", json.dumps({"prompt": "Where to?", "response": "x" * 5000}), "over the limit"),
    ("travel", '{"prompt": "Where to?", "response": 3}', "field 'response' must be a string"),
    ("trip_json", json.dumps({"prompt": "A week in Rome", "response": "{destination: Rome}"}), "not valid JSON"),
    ("trip_json", json.dumps({"prompt": "A week in Rome", "response": '{"destination": "Rome"}'}), "keys must be"),
    (
        "trip_json",
        json.dumps({"prompt": "Rome", "response": GOOD_TRIP.replace('"travelers": 2', '"travelers": -1')}),
        "'travelers' must be a positive integer",
    ),
]


@pytest.mark.parametrize(("task", "row", "reason"), BAD_ROWS)
def test_a_bad_row_stops_the_stage_with_file_line_reason(tmp_path, task, row, reason):
    (tmp_path / "data").mkdir()
    for t in ("travel", "trip_json"):
        shutil.copy(ROOT / "data" / f"{t}.jsonl", tmp_path / "data" / f"{t}.jsonl")
    path = tmp_path / "data" / f"{task}.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(4, row)  # becomes line 5
    path.write_text("\n".join(lines) + "\n")
    write_params(tmp_path, default_params())
    proc = run_stage("data", tmp_path, timeout=60)
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert line.startswith(f"data: error: data/{task}.jsonl:5: ") and reason in line, line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "split").exists(), "a failed run left outputs behind"


def test_a_byte_that_is_not_utf8_names_file_and_line(tmp_path):
    """Seen by hand: a Latin-1 byte used to end in a bare UnicodeDecodeError with a byte offset."""
    (tmp_path / "data").mkdir()
    for t in ("travel", "trip_json"):
        shutil.copy(ROOT / "data" / f"{t}.jsonl", tmp_path / "data" / f"{t}.jsonl")
    path = tmp_path / "data" / "travel.jsonl"
    lines = path.read_bytes().splitlines()
    lines[6] = lines[6].replace(b"e", b"\xe9", 1)  # Latin-1 e-acute on line 7
    path.write_bytes(b"\n".join(lines) + b"\n")
    write_params(tmp_path, default_params())
    proc = run_stage("data", tmp_path, timeout=60)
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert line.startswith("data: error: data/travel.jsonl:7: not UTF-8 (byte 0xe9 at column "), line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "split").exists()


def test_duplicate_prompt_names_both_lines(tmp_path):
    path = tmp_path / "travel.jsonl"
    row = json.dumps({"prompt": "Best time to visit Kyoto?", "response": "Spring and autumn."})
    path.write_text("\n".join([row, json.dumps({"prompt": "other", "response": "x"}), row.replace("Best", "best ")]))
    with pytest.raises(Exception, match=r"travel.jsonl:3: duplicate prompt \(same as line 1\)"):
        load_task(path, "travel", 1000, 1000)


def test_trip_json_checks_and_scores():
    check_trip_json(GOOD_TRIP)
    with pytest.raises(ValueError, match="before"):
        check_trip_json(
            GOOD_TRIP.replace('"start_date": null', '"start_date": "2027-05-10"').replace(
                '"end_date": null', '"end_date": "2027-05-01"'
            )
        )
    assert score_trip_json(GOOD_TRIP, GOOD_TRIP) == (True, 1.0)
    assert score_trip_json("not json", GOOD_TRIP) == (False, 0.0)
    assert score_trip_json('{"destination": "Lisbon"}', GOOD_TRIP) == (False, 0.0)
    wrong_dest = GOOD_TRIP.replace("Lisbon", "Porto")
    assert score_trip_json(wrong_dest, GOOD_TRIP) == (True, pytest.approx(6 / 7))
