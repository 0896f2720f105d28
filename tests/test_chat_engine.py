"""chat.engine on a real ORT GenAI tiny model: streaming, stop, context fitting, adapters, errors.

The fixtures here are shared by the other tests/test_chat_*.py modules (they import them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from chat.engine import BASE, Engine, EngineError, ModelMissing, Sampling, collect, model_files

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Plan a day in Rome."}]


@pytest.fixture(scope="session")
def chat_model(tiny_onnx) -> Path:
    """conftest's tiny multi-LoRA model: model/ + adapters/{travel,trip_json}.onnx_adapter."""
    return Path(tiny_onnx)


@pytest.fixture(scope="session")
def engine(chat_model) -> Engine:
    eng = Engine(chat_model)
    eng.load()
    return eng


def model_with_adapters(src: Path, dest: Path, garbage: tuple[str, ...] = (), foreign: tuple[str, ...] = ()) -> Path:
    """A model dir sharing `src`'s model and adapters, plus broken adapters: `garbage` ones are not adapter files,
    `foreign` ones are valid adapter files made for a model twice as wide (they load, then fail on use)."""
    from olive_lab.onnx.lora import read_adapter, write_adapter

    (dest / "adapters").mkdir(parents=True)
    (dest / "model").symlink_to((src / "model").resolve())
    for adapter in (src / "adapters").glob("*.onnx_adapter"):
        (dest / "adapters" / adapter.name).symlink_to(adapter.resolve())
    for name in garbage:
        (dest / "adapters" / f"{name}.onnx_adapter").write_bytes(b"not an adapter" * 20)
    if foreign:
        weights = read_adapter(src / "adapters" / "travel.onnx_adapter")
        wide = {k: np.concatenate([w, w], axis=0 if ".lora_A" in k else 1) for k, w in weights.items()}
        for name in foreign:
            write_adapter(wide, dest / "adapters" / f"{name}.onnx_adapter")
    return dest


def test_missing_model_names_the_command(tmp_path):
    with pytest.raises(ModelMissing, match=r"dvc repro optimize.*dvc pull optimize"):
        model_files(tmp_path / "nothing")


def test_engine_imports_no_ui():
    code = (
        "import sys, chat.engine; bad = [m for m in sys.modules if m.split('.')[0] in ('textual', 'rich')]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_chat_template_and_tokens_match_hf(engine, chat_model):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(chat_model / "model"))
    expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert engine.render(MESSAGES) == expected
    assert engine.encode(MESSAGES) == hf(expected, add_special_tokens=False).input_ids


def test_stream_yields_text_and_stats(engine):
    stream = engine.generate(MESSAGES, BASE, Sampling(temperature=0.8, top_p=0.95, max_new_tokens=12))
    text, stats = collect(stream)
    assert text.strip()
    assert stats.adapter == BASE
    assert stats.prompt_tokens == len(engine.encode(MESSAGES))
    assert 1 <= stats.new_tokens <= 12
    assert stats.finish in ("done", "length")
    assert stats.ttft_s is not None and stats.ttft_s > 0
    if stats.finish == "length":
        assert stats.new_tokens == 12


def test_greedy_is_repeatable(engine):
    greedy = Sampling(temperature=0, top_p=1.0, max_new_tokens=16)
    first, _ = collect(engine.generate(MESSAGES, BASE, greedy))
    second, _ = collect(engine.generate(MESSAGES, BASE, greedy))
    assert first == second


def test_stop_event_ends_the_reply(engine):
    stop = threading.Event()
    stream = engine.generate(MESSAGES, BASE, Sampling(0.8, 0.95, 1000), stop)
    next(stream)
    stop.set()
    _, stats = collect(stream)
    assert stats.finish == "stopped"
    assert stats.new_tokens < 10  # stopped within a token or two, not at max_new_tokens
    assert not engine.lock.locked()


def test_long_history_drops_oldest_turns_but_keeps_system(engine):
    long = "word " * 700
    history = [MESSAGES[0]]
    for i in range(4):
        history += [{"role": "user", "content": f"q{i} {long}"}, {"role": "assistant", "content": f"a{i} {long}"}]
    history.append({"role": "user", "content": "last question"})
    ids, dropped = engine.fit(history, room=256)
    assert dropped > 0 and dropped % 2 == 0  # whole user/assistant turns
    assert len(ids) + 256 <= engine.context_length
    text = engine.render([history[0], *history[1 + dropped :]])
    assert len(engine.encode([history[0], *history[1 + dropped :]])) == len(ids)
    assert "Be brief." in text and "last question" in text


def test_prompt_longer_than_context_is_one_error(engine):
    huge = [{"role": "user", "content": "word " * (engine.context_length + 10)}]
    with pytest.raises(EngineError, match="context holds"):
        collect(engine.generate(huge, BASE, Sampling()))
    assert not engine.lock.locked()


@pytest.mark.parametrize(
    "sampling",
    [Sampling(temperature=-1), Sampling(top_p=0), Sampling(top_p=1.5), Sampling(max_new_tokens=0)],
)
def test_bad_sampling_is_rejected(engine, sampling):
    with pytest.raises(EngineError):
        collect(engine.generate(MESSAGES, BASE, sampling))


def test_garbage_adapter_file_is_one_line_error(chat_model, tmp_path):
    model_dir = model_with_adapters(chat_model, tmp_path / "m", garbage=("broken",))
    eng = Engine(model_dir)
    assert "broken" in eng.adapter_names
    eng.load()
    with pytest.raises(EngineError) as err:
        eng.prepare_adapter("broken")
    message = str(err.value)
    assert "broken.onnx_adapter" in message and "\n" not in message
    assert "valid lora parameter format" in message  # ORT's reason, without its C++ source location
    # still usable afterwards
    text, stats = collect(eng.generate(MESSAGES, BASE, Sampling(max_new_tokens=4)))
    assert stats.new_tokens >= 1


def test_adapter_for_another_model_fails_when_chosen(chat_model, tmp_path):
    eng = Engine(model_with_adapters(chat_model, tmp_path / "m", foreign=("wide",)))
    eng.load()
    with pytest.raises(EngineError, match=r"wide\.onnx_adapter: does not fit this model: .*lora_A") as err:
        eng.prepare_adapter("wide")
    assert "\n" not in str(err.value)
    eng.prepare_adapter("travel")  # the others still load and run
    _, stats = collect(eng.generate(MESSAGES, "travel", Sampling(max_new_tokens=4)))
    assert stats.adapter == "travel" and stats.new_tokens >= 1


def test_corrupt_model_is_one_line_error(chat_model, tmp_path):
    model = tmp_path / "m" / "model"
    model.mkdir(parents=True)
    for f in (chat_model / "model").iterdir():
        if f.is_file():
            (model / f.name).symlink_to(f.resolve())
    (model / "model.onnx").unlink()
    (model / "model.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(EngineError, match="cannot load the model") as err:
        Engine(tmp_path / "m").load()
    assert "\n" not in str(err.value)


def test_adapters_are_listed_and_used(engine, chat_model):
    assert engine.adapter_names == [BASE, "travel", "trip_json"]
    greedy = Sampling(temperature=0, top_p=1.0, max_new_tokens=8)
    replies = {}
    for name in engine.adapter_names:
        engine.prepare_adapter(name)
        replies[name], stats = collect(engine.generate(MESSAGES, name, greedy))
        assert stats.adapter == name and stats.new_tokens >= 1
    # the fixture's adapters are random and non-zero: each one steers greedy decoding somewhere else
    assert len(set(replies.values())) == 3, replies


def test_genai_config_ep_and_context(engine, chat_model):
    config = json.loads((chat_model / "model" / "genai_config.json").read_text())
    assert engine.context_length == config["model"]["context_length"]
    assert engine.ep == "cpu"
