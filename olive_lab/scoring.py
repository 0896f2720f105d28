"""How replies are scored: the trip_json answer format and the metric names every variant reports.

Kept apart from the data validator so that editing the validator re-runs only the data stage.
"""

from __future__ import annotations

import json
import math

TRIP_KEYS = ["destination", "start_date", "end_date", "duration_days", "travelers", "budget", "interests"]
JSON_TASK = "trip_json"  # the task whose replies are scored as JSON


def score_trip_json(reply: str, reference: str) -> tuple[bool, float]:
    """(reply is one JSON object with exactly the trip fields, share of fields equal to the reference's)."""
    try:
        obj = json.loads(reply)
    except json.JSONDecodeError:
        return False, 0.0
    if not isinstance(obj, dict) or set(obj) != set(TRIP_KEYS):
        return False, 0.0
    ref = json.loads(reference)
    return True, sum(obj[k] == ref[k] for k in TRIP_KEYS) / len(TRIP_KEYS)


def json_scores(replies: list[str], rows: list[dict]) -> dict:
    """JSON-valid rate and mean field accuracy of `replies` against the rows' reference responses."""
    scores = [score_trip_json(reply, row["response"]) for reply, row in zip(replies, rows, strict=True)]
    return {
        "json_valid": round(sum(v for v, _ in scores) / len(scores), 4),
        "field_accuracy": round(sum(f for _, f in scores) / len(scores), 4),
    }


def perplexity(loss: float) -> float:
    return round(math.exp(loss), 4)


def loss_entries(task_losses: dict[str, float]) -> dict:
    """{task}_loss and {task}_ppl for each task's mean loss: the metric names every variant reports."""
    out = {}
    for task, loss in task_losses.items():
        out[f"{task}_loss"], out[f"{task}_ppl"] = loss, perplexity(loss)
    return out
