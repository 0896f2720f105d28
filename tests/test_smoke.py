"""The real default model end to end with a reduced budget (experiment=smoke): slow, run once by `make test`."""

from __future__ import annotations

import json

import pytest

from tests.pipeline import copy_repo, ran_stages, sh

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # the real model end to end: minutes


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("smoke-repo"), ["experiment=smoke"])
    sh(repo, "dvc", "repro", timeout=2400)
    return repo


def metrics(repo, name):
    return json.loads((repo / "metrics" / name).read_text())


def test_base_model_answers_sensibly_with_its_chat_template(smoke_repo):
    from olive_lab.lm import greedy_replies, load_model, load_tokenizer

    base = smoke_repo / "models/base"
    [reply] = greedy_replies(load_model(base), load_tokenizer(base), ["What is the capital of France?"], 24)
    assert "Paris" in reply, reply


def test_quantized_model_did_not_collapse(smoke_repo):
    q = metrics(smoke_repo, "quantize.json")
    # autoawq on CPU once wrote a checkpoint with loss 13 vs 3: perplexity would explode far past this bound.
    assert q["ppl_over_fp32"] < 1.5, q
    assert q["rtn_over_fp32"] < 2.0, q


def test_adapters_learn_their_task(smoke_repo):
    for task in ("travel", "trip_json"):
        m = metrics(smoke_repo, f"finetune/{task}.json")
        assert m["adapter_eval_loss"] < m["base_eval_loss"], m


def test_quantized_beats_round_to_nearest(smoke_repo):
    """The quantize method's point: a lower loss than plain RTN int4, overall and on every task."""
    q = metrics(smoke_repo, "quantize.json")
    assert q["ppl"] < q["rtn_ppl"], q
    for task, loss in q["task_eval_loss"]["quantized"].items():
        assert loss < q["task_eval_loss"]["rtn"][task], (task, q["task_eval_loss"])


def test_onnx_model_serves_every_adapter_and_agrees_with_torch(smoke_repo):
    """The bounds optimize enforces (olive_lab/onnx/check.py), and the margins the real model keeps from them."""
    from olive_lab.onnx.check import MAX_GRID_REL, MAX_LOSS_ABS, MAX_LOSS_REL, MIN_ARGMAX_AGREEMENT

    opt = metrics(smoke_repo, "optimize.json")
    for task in ("travel", "trip_json"):
        assert (smoke_repo / f"models/onnx/adapters/{task}.onnx_adapter").exists()
    assert set(opt["agreement"]) == {"base", "travel", "trip_json"}
    for variant, m in opt["agreement"].items():
        assert m["argmax_agreement"] >= max(MIN_ARGMAX_AGREEMENT, 0.95), (variant, m)
        assert abs(m["loss_onnx"] - m["loss_torch"]) <= MAX_LOSS_REL * m["loss_torch"] + MAX_LOSS_ABS, (variant, m)
        assert abs(m["loss_ratio"] - 1) <= 0.01 or abs(m["loss_diff"]) <= MAX_LOSS_ABS, (variant, m)
    assert opt["int4_grid_error"]["max_rel"] <= MAX_GRID_REL, opt["int4_grid_error"]
    assert opt["int4_grid_error"]["moved_share"] == 0, opt["int4_grid_error"]  # the quantize stage's grid itself


def test_onnx_trip_json_adapter_answers_in_json(smoke_repo):
    """Greedy answers of the ONNX model with the trip_json adapter (evaluate, through ORT GenAI) are valid trip JSON;
    without the adapter they are not."""
    ev = metrics(smoke_repo, "eval.json")
    tuned, base = ev["onnx+trip_json"], ev["onnx"]
    assert tuned["json_valid"] >= 0.75, tuned
    assert tuned["json_valid"] > base["json_valid"] and tuned["field_accuracy"] > base["field_accuracy"], (tuned, base)
    assert abs(tuned["json_valid"] - ev["quantized+trip_json"]["json_valid"]) <= 0.25, ev  # ONNX answers like torch


def test_onnx_speed_is_measured(smoke_repo):
    perf = metrics(smoke_repo, "perf/evaluate.json")
    for name in ("onnx", "onnx+travel", "onnx+trip_json"):
        assert perf[name]["decode_tok_s"] > 0 and perf[name]["ttft_ms"] > 0, perf[name]


def test_og_tokenizer_equals_transformers_on_every_eval_prompt(smoke_repo):
    """The optimize stage refuses a model whose og.Tokenizer differs from transformers; it checked every eval prompt
    (chat-formatted) and response plus the non-ASCII sample."""
    from olive_lab.tokenizer import MULTILINGUAL_SAMPLE

    rows = sum(
        len((smoke_repo / f"data/split/{t}/eval.jsonl").read_text().splitlines()) for t in ("travel", "trip_json")
    )
    assert metrics(smoke_repo, "optimize.json")["tokenizer_texts_checked"] == 2 * rows + len(MULTILINGUAL_SAMPLE)


def test_plain_ort_genai_api_on_the_real_model(smoke_repo):
    from tests.test_genai_interop import plain_genai_replies

    base, tuned = plain_genai_replies(smoke_repo / "models/onnx", "trip_json", max_new_tokens=48)
    assert base.strip() and tuned.strip()
    assert tuned != base, "the adapter changed nothing through the plain og API"


def test_upload_dry_run_and_second_repro_is_a_no_op(smoke_repo):
    receipt = json.loads((smoke_repo / "models/upload/receipt.json").read_text())
    assert receipt["uploaded"] is False
    assert ran_stages(sh(smoke_repo, "dvc", "repro").stdout) == set()
