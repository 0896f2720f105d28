"""evaluate: trip_json scoring, the metric names, which upstream losses it reuses, greedy stops; a tiny-model run."""

from __future__ import annotations

import json
import math

import pytest

from olive_lab.errors import StageError
from olive_lab.evaluate import Models, Upstream, evaluate_all, onnx_losses, optimize_losses
from olive_lab.scoring import TRIP_KEYS, json_scores, loss_entries, perplexity, score_trip_json
from tests.helpers import ROOT

REFERENCE = {
    "destination": "Porto",
    "start_date": "2026-05-01",
    "end_date": "2026-05-03",
    "duration_days": 3,
    "travelers": 2,
    "budget": {"amount": 800, "currency": "EUR"},
    "interests": ["food", "wine"],
}
TASKS = ["travel", "trip_json"]


def rows_of(task: str, n: int) -> list[dict]:
    lines = (ROOT / f"data/{task}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


# ---------------------------------------------------------------- trip_json scoring


def test_exact_answer_scores_valid_and_every_field():
    assert score_trip_json(json.dumps(REFERENCE), json.dumps(REFERENCE)) == (True, 1.0)
    # key order and whitespace do not matter; values are compared as JSON values
    shuffled = json.dumps(dict(reversed(list(REFERENCE.items()))), indent=2)
    assert score_trip_json(shuffled, json.dumps(REFERENCE)) == (True, 1.0)


def test_wrong_fields_count_per_field():
    reply = dict(REFERENCE, destination="Lisbon", travelers=None, budget={"amount": 800, "currency": "USD"})
    valid, accuracy = score_trip_json(json.dumps(reply), json.dumps(REFERENCE))
    assert valid and accuracy == pytest.approx(4 / 7)


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "Sure! Here is your trip: " + json.dumps(REFERENCE),  # prose around the object
        json.dumps(REFERENCE)[:-1],  # cut off before the closing brace (max_new_tokens)
        json.dumps([REFERENCE]),  # a list, not one object
        json.dumps({k: v for k, v in REFERENCE.items() if k != "interests"}),  # a key missing
        json.dumps({**REFERENCE, "notes": "x"}),  # an extra key
        "null",
    ],
)
def test_anything_but_one_object_with_exactly_the_trip_keys_is_invalid(reply):
    assert score_trip_json(reply, json.dumps(REFERENCE)) == (False, 0.0)


def test_json_scores_average_over_rows_and_need_one_reply_per_row():
    rows = [{"prompt": "p", "response": json.dumps(REFERENCE)}] * 4
    half_right = json.dumps(dict(REFERENCE, **dict.fromkeys(TRIP_KEYS[:3], "wrong"), duration_days=3))
    replies = [json.dumps(REFERENCE), half_right, "not json", json.dumps([1])]
    # valid: 2 of 4; fields: (7/7 + 4/7 + 0 + 0) / 4
    assert json_scores(replies, rows) == {"json_valid": 0.5, "field_accuracy": round((1 + 4 / 7) / 4, 4)}
    with pytest.raises(ValueError):
        json_scores(replies[:3], rows)


# ---------------------------------------------------------------- metric names


def test_loss_entries_name_each_tasks_loss_and_perplexity():
    assert loss_entries({"travel": 3.0, "trip_json": 0.5}) == {
        "travel_loss": 3.0,
        "travel_ppl": round(math.exp(3.0), 4),
        "trip_json_loss": 0.5,
        "trip_json_ppl": round(math.exp(0.5), 4),
    }
    assert perplexity(0.0) == 1.0
    assert loss_entries({}) == {}


# ---------------------------------------------------------------- reuse by row count


def optimize_metrics(rows_by_task: dict[str, int], base_loss: float = 9.0, own_loss: float = 8.0) -> dict:
    """metrics/optimize.json's agreement section as the optimize stage writes it, with sentinel losses."""
    return {
        "agreement": {
            "base": {"by_task": {t: {"loss_onnx": base_loss, "rows": n} for t, n in rows_by_task.items()}},
            **{t: {"loss_onnx": own_loss, "rows": n} for t, n in rows_by_task.items()},
        }
    }


def test_optimize_losses_are_reused_only_for_the_same_number_of_rows():
    rows = {"travel": rows_of("travel", 3), "trip_json": rows_of("trip_json", 2)}
    same = optimize_losses(optimize_metrics({"travel": 3, "trip_json": 2}), rows, TASKS)
    assert same == {
        (None, "travel"): 9.0,
        ("travel", "travel"): 8.0,
        (None, "trip_json"): 9.0,
        ("trip_json", "trip_json"): 8.0,
    }
    # optimize.eval_rows cut travel to 2 rows: its travel losses are not evaluate's
    fewer = optimize_losses(optimize_metrics({"travel": 2, "trip_json": 2}), rows, TASKS)
    assert set(fewer) == {(None, "trip_json"), ("trip_json", "trip_json")}
    assert optimize_losses({}, rows, TASKS) == {}
    # an entry without its loss is not reused either
    partial = optimize_metrics({"travel": 3, "trip_json": 2})
    del partial["agreement"]["travel"]["loss_onnx"]
    assert ("travel", "travel") not in optimize_losses(partial, rows, TASKS)


def test_onnx_losses_measure_exactly_the_pairs_optimize_did_not(tiny_onnx):
    rows = {"travel": rows_of("travel", 3), "trip_json": rows_of("trip_json", 2)}
    measured = onnx_losses(tiny_onnx, {}, rows, 128, TASKS)
    assert set(measured) == {"onnx", "onnx+travel", "onnx+trip_json"}
    # same rows: the sentinels come back; travel on 2 rows only: measured again, equal to the fresh measurement
    reused = onnx_losses(tiny_onnx, optimize_metrics({"travel": 2, "trip_json": 2}), rows, 128, TASKS)
    assert reused["onnx"]["trip_json_loss"] == 9.0 and reused["onnx+trip_json"]["trip_json_loss"] == 8.0
    assert reused["onnx"]["travel_loss"] == measured["onnx"]["travel_loss"] != 9.0
    assert reused["onnx+travel"]["travel_loss"] == measured["onnx+travel"]["travel_loss"] != 8.0
    # the other task's loss under an adapter is never in optimize's metrics
    assert reused["onnx+trip_json"]["travel_loss"] == measured["onnx+trip_json"]["travel_loss"]
    assert reused["onnx"]["trip_json_ppl"] == perplexity(9.0)


# ---------------------------------------------------------------- greedy stops


@pytest.fixture(scope="module")
def og_model(tiny_onnx):
    import onnxruntime_genai as og

    model = og.Model(str(tiny_onnx / "model"))
    return model, og.Adapters(model)


def test_ort_greedy_stops_before_the_first_stop_token(og_model):
    from olive_lab.decode import ort_greedy

    model, adapters = og_model
    prompt = [1, 2, 3, 4, 5]
    free, stamps = ort_greedy(model, adapters, prompt, None, 12, exact=True)
    assert len(free) == len(stamps) == 12
    stop = free[4]
    first = free.index(stop)
    cut, stamps = ort_greedy(model, adapters, prompt, None, 12, stops=[stop], exact=True)
    assert cut == free[:first]  # up to, not including, the stop token
    assert len(stamps) == first + 1  # the stop token was generated (and timed), then dropped
    assert stamps == sorted(stamps)


def test_decode_speed_leaves_the_prefill_out():
    from olive_lab.decode import decode_tok_s

    # first token at 0.5 s (prefill), then 4 tokens every 0.1 s: 4 tokens in 0.4 s
    assert decode_tok_s([0.5, 0.6, 0.7, 0.8, 0.9]) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="at least 2 token stamps, got 1"):
        decode_tok_s([0.5])


def test_torch_greedy_replies_stop_at_the_end_token_per_prompt(tiny_base, tiny_adapters):
    """greedy_replies batches prompts with left padding: one reply ending early must not cut or shift the other."""
    from peft import PeftModel

    from olive_lab.lm import greedy_replies, load_model, load_tokenizer, prompt_text

    tok = load_tokenizer(tiny_base)
    # the random base alone answers only newlines; with a random adapter the replies differ per prompt
    model = PeftModel.from_pretrained(load_model(tiny_base), str(tiny_adapters["travel"])).eval()
    prompts = ["Two days in Porto?", "A week in Japan in spring, what to see?"]
    free = []
    for prompt in prompts:
        enc = tok([prompt_text(tok, prompt)], return_tensors="pt", add_special_tokens=False)
        out = model.generate(
            **enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None
        )
        free.append(out[0, enc.input_ids.shape[1] :].tolist())
    # the first token of reply 0 (after its first) that reply 1 never emits becomes the end token
    stop_at = next(i for i, t in enumerate(free[0]) if i > 0 and t not in free[1])
    tok.eos_token_id = free[0][stop_at]
    replies = greedy_replies(model, tok, prompts, 10)
    assert replies[0] == tok.decode(free[0][: stop_at + 1], skip_special_tokens=True).strip()
    assert replies[1] == tok.decode(free[1], skip_special_tokens=True).strip()
    assert replies[0] != tok.decode(free[0], skip_special_tokens=True).strip()


# ---------------------------------------------------------------- the whole evaluate on tiny models


def quantize_metrics(losses: dict[str, float]) -> dict:
    return {"task_eval_loss": {v: dict(losses) for v in ("fp32", "rtn", "quantized")}}


def test_evaluate_all_reports_every_variant_and_reuses_upstream_losses(tiny_base, tiny_adapters, tiny_onnx):
    rows = {"travel": rows_of("travel", 3), "trip_json": rows_of("trip_json", 2)}
    models = Models(tiny_base, tiny_base, tiny_adapters["travel"].parent, tiny_onnx)
    upstream = Upstream(
        quantize=quantize_metrics({"travel": 7.0, "trip_json": 6.0}),
        # travel's adapter was measured on 3 rows (reused); trip_json's on 5 (not these rows: measured again)
        finetune={
            "travel": {"adapter_eval_loss": 5.0, "eval_rows": 3},
            "trip_json": {"adapter_eval_loss": 4.0, "eval_rows": 5},
        },
        optimize=optimize_metrics({"travel": 3, "trip_json": 2}),
    )
    ev = {"max_prompts": 2, "max_new_tokens": 8, "max_seq_len": 128}
    results, perf = evaluate_all(models, upstream, rows, ev, "cpu", TASKS)
    assert list(results) == [
        "fp32",
        "rtn",
        "quantized",
        "quantized+travel",
        "quantized+trip_json",
        "onnx",
        "onnx+travel",
        "onnx+trip_json",
    ]
    for name, m in results.items():
        for task in TASKS:
            assert m[f"{task}_ppl"] == perplexity(m[f"{task}_loss"]), name
        assert m["size_mb"] > 0
    assert results["fp32"]["travel_loss"] == 7.0 and results["quantized"]["trip_json_loss"] == 6.0
    assert results["quantized+travel"]["travel_loss"] == 5.0
    assert results["quantized+trip_json"]["trip_json_loss"] != 4.0  # row count differs: measured here
    assert results["onnx+travel"]["travel_loss"] == 8.0 and results["onnx"]["trip_json_loss"] == 9.0
    # JSON scores where a variant answers trip_json prompts; never for RTN (the perplexity control) or travel
    scored = {name for name, m in results.items() if "json_valid" in m}
    assert scored == {"fp32", "quantized", "quantized+trip_json", "onnx", "onnx+trip_json"}
    assert all(0 <= results[n]["json_valid"] <= 1 and 0 <= results[n]["field_accuracy"] <= 1 for n in scored)
    # speed apart from quality
    assert set(perf) == {"onnx", "onnx+travel", "onnx+trip_json", "seconds"}
    assert all(perf[n]["decode_tok_s"] > 0 and perf[n]["peak_rss_mb"] > 0 for n in perf if n != "seconds")
    assert not any("decode_tok_s" in m for m in results.values())


def test_missing_quantize_losses_fail_in_one_line(tiny_base, tiny_adapters, tiny_onnx):
    rows = {"travel": rows_of("travel", 2)}
    models = Models(tiny_base, tiny_base, tiny_adapters["travel"].parent, tiny_onnx)
    upstream = Upstream(quantize=quantize_metrics({"trip_json": 1.0}), finetune={}, optimize={})
    ev = {"max_prompts": 2, "max_new_tokens": 8, "max_seq_len": 128}
    with pytest.raises(
        StageError, match=r"^metrics/quantize.json: no per-task losses for 'fp32' \(run `dvc repro quantize`\)$"
    ):
        evaluate_all(models, upstream, rows, ev, "cpu", ["travel"])
