"""Task data: validate each task's JSONL (`prompt`/`response`) and split it into train/eval.

A bad row stops with `file:line: reason`; nothing is written then.
"""

from __future__ import annotations

import json
import logging
import random
import re
from datetime import date
from pathlib import Path
from typing import Any

from olive_lab.errors import StageError
from olive_lab.files import atomic_dir, prompt_response_rows, write_jsonl
from olive_lab.scoring import TRIP_KEYS

log = logging.getLogger(__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _iso_date(v: Any, field: str) -> date | None:
    if v is None:
        return None
    if not isinstance(v, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
        raise ValueError(f"trip_json field '{field}' must be YYYY-MM-DD or null, got {v!r}")
    try:
        return date.fromisoformat(v)
    except ValueError:
        raise ValueError(f"trip_json field '{field}' is not a real date: {v!r}") from None


def check_trip_json(response: str) -> None:
    """The trip_json answer must be one JSON object with exactly TRIP_KEYS, in that order, well typed."""
    try:
        obj = json.loads(response)
    except json.JSONDecodeError as exc:
        raise ValueError(f"response is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(obj, dict):
        raise ValueError("response must be a JSON object")
    if list(obj) != TRIP_KEYS:
        raise ValueError(f"response keys must be {TRIP_KEYS} in that order, got {list(obj)}")
    if obj["destination"] is not None and not (isinstance(obj["destination"], str) and obj["destination"].strip()):
        raise ValueError("trip_json field 'destination' must be a non-empty string or null")
    start, end = _iso_date(obj["start_date"], "start_date"), _iso_date(obj["end_date"], "end_date")
    if start and end and end < start:
        raise ValueError("trip_json 'end_date' is before 'start_date'")
    for field in ("duration_days", "travelers"):
        if obj[field] is not None and not (_is_int(obj[field]) and obj[field] > 0):
            raise ValueError(f"trip_json field '{field}' must be a positive integer or null")
    budget = obj["budget"]
    if budget is not None and not (
        isinstance(budget, dict)
        and list(budget) == ["amount", "currency"]
        and isinstance(budget["amount"], int | float)
        and budget["amount"] > 0
        and isinstance(budget["currency"], str)
        and re.fullmatch(r"[A-Z]{3}", budget["currency"])
    ):
        raise ValueError("trip_json field 'budget' must be null or {amount: >0, currency: ISO code}")
    interests = obj["interests"]
    if interests is not None and not (
        isinstance(interests, list) and interests and all(isinstance(i, str) and i.strip() for i in interests)
    ):
        raise ValueError("trip_json field 'interests' must be a non-empty list of strings or null")


TASK_CHECKS = {"trip_json": check_trip_json}


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def load_task(path: Path, task: str, max_prompt: int, max_response: int) -> list[dict[str, str]]:
    """Read and validate one task file; the first bad row raises StageError('file:line: reason')."""
    if not path.exists():
        raise StageError(f"{path}: not found (every task in params 'tasks' needs data/<task>.jsonl)")
    rows: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    check = TASK_CHECKS.get(task)
    for where, lineno, row in prompt_response_rows(path):
        for field, limit in (("prompt", max_prompt), ("response", max_response)):
            value = row[field]
            if not isinstance(value, str):
                raise StageError(f"{where}: field '{field}' must be a string")
            if not value.strip():
                raise StageError(f"{where}: field '{field}' is empty")
            if len(value) > limit:
                raise StageError(f"{where}: field '{field}' has {len(value)} characters, over the limit of {limit}")
        key = _normalize(row["prompt"])
        if key in seen:
            raise StageError(f"{where}: duplicate prompt (same as line {seen[key]})")
        seen[key] = lineno
        if check:
            try:
                check(row["response"])
            except ValueError as exc:
                raise StageError(f"{where}: {exc}") from None
        rows.append(row)
    if len(rows) < 2:
        raise StageError(f"{path}: needs at least 2 rows to split, has {len(rows)}")
    return rows


def split(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not 0 < eval_fraction < 1:
        raise StageError(f"params.yaml: data.eval_fraction must be between 0 and 1, got {eval_fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * eval_fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def prepare(tasks: list[str], data_params: dict, data_dir: Path, out: Path) -> dict[str, dict]:
    """Validate every task file, then write `out`/<task>/{train,eval}.jsonl atomically; returns row counts."""
    loaded = {
        task: load_task(
            data_dir / f"{task}.jsonl", task, data_params["max_prompt_chars"], data_params["max_response_chars"]
        )
        for task in tasks
    }
    counts = {}
    with atomic_dir(out) as tmp:
        for task, rows in loaded.items():
            train, held = split(rows, data_params["eval_fraction"], data_params["seed"])
            (tmp / task).mkdir()
            write_jsonl(tmp / task / "train.jsonl", train)
            write_jsonl(tmp / task / "eval.jsonl", held)
            counts[task] = {"rows": len(rows), "train": len(train), "eval": len(held)}
            log.info("%s: %d rows -> %d train / %d eval", task, len(rows), len(train), len(held))
    return counts
