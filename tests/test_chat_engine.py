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


@pytest.fixture(scope="session")
def sharp_engine(tmp_path_factory) -> Engine:
    """The tiny model with a wider random init (std 0.3, not 0.02) and a travel adapter. The conftest model's
    greedy reply is "\n" repeated whatever the context, so it cannot tell a wrong KV cache from a right one; this
    one's greedy tokens depend on every earlier token."""
    from olive_lab.base_model import materialize
    from olive_lab.lora import random_adapter
    from olive_lab.onnx.export import build_onnx
    from tests.conftest import tiny_model_params

    root = tmp_path_factory.mktemp("sharp")
    params = tiny_model_params()
    params["arch"] = {**params["arch"], "initializer_range": 0.3}
    materialize(params, root / "base")
    adapters = {"travel": random_adapter(root / "base", root / "travel", 0)}
    build_onnx(root / "base", root / "onnx", adapters, precision="int4", block_size=32, execution_provider="cpu")
    eng = Engine(root / "onnx")
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


# ---------------------------------------------------------------- the KV cache across turns
GREEDY = Sampling(temperature=0, top_p=1.0, max_new_tokens=12)
QUESTIONS = ["Plan a day in Rome.", "And in Paris?", "What should I eat there?", "Thanks. Berlin next?", "And Oslo?"]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def converse(engine: Engine, adapter: str, fresh: bool, system: str = "Be brief.") -> list[tuple[list[int], object]]:
    """A greedy conversation over QUESTIONS: each turn's (ids the generator saw, stats). `fresh` drops the cache
    before every turn, so each reply comes from a full prefill of its history."""
    engine.drop_cache()
    messages = [{"role": "system", "content": system}]
    turns = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        if fresh:
            engine.drop_cache()
        text, stats = collect(engine.generate(messages, adapter, GREEDY))
        turns.append((engine.cached_tokens, stats))
        messages.append({"role": "assistant", "content": text})
    return turns


@pytest.mark.parametrize("adapter", [BASE, "travel"])
def test_cached_turns_give_the_same_greedy_tokens_as_a_fresh_prefill(sharp_engine, adapter):
    engine = sharp_engine
    engine.prepare_adapter(adapter)
    cached = converse(engine, adapter, fresh=False)
    fresh = converse(engine, adapter, fresh=True)
    assert len({tuple(ids[-GREEDY.max_new_tokens :]) for ids, _ in fresh}) == len(QUESTIONS)  # replies differ
    for turn, ((ids, stats), (fresh_ids, fresh_stats)) in enumerate(zip(cached, fresh, strict=True)):
        assert ids == fresh_ids, f"turn {turn + 1}"
        assert fresh_stats.prefill_tokens == fresh_stats.prompt_tokens and not fresh_stats.cache_reused
        if turn:
            assert stats.cache_reused and stats.prefill_tokens < stats.prompt_tokens, f"turn {turn + 1}"


def test_turn_n_prefills_only_the_tokens_after_the_cache(engine):
    engine.drop_cache()
    messages = [{"role": "system", "content": "Be brief."}]
    previous: list[int] = []  # what the generator saw last turn; its last (sampled) token has no KV yet
    prompt_len = 0
    for turn, question in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": question})
        ids = engine.encode(messages)
        before = engine.prefilled_tokens
        text, stats = collect(engine.generate(messages, BASE, GREEDY))
        expected = len(ids) - common_prefix(ids, previous[:-1])
        assert stats.prefill_tokens == expected == engine.prefilled_tokens - before, f"turn {turn + 1}"
        if turn:  # only what the previous prompt did not hold (its reply and the new message), and at most the
            # one token before: the prompt's last "\n" can merge with a reply that starts with whitespace
            assert stats.prefill_tokens <= len(ids) - prompt_len + 1
            assert stats.cache_reused
        prompt_len = len(ids)
        previous = engine.cached_tokens
        messages.append({"role": "assistant", "content": text})


def _switch_adapter(engine, messages, state):
    state["adapter"] = "travel"


def _change_system_prompt(engine, messages, state):
    messages[0] = {"role": "system", "content": "Answer in French."}


def _change_sampling(engine, messages, state):
    state["sampling"] = Sampling(temperature=0.5, top_p=0.9, max_new_tokens=12)


def _edit_history(engine, messages, state):
    messages[1] = {"role": "user", "content": "Plan a day in Milan."}


def _stop_a_reply(engine, messages, state):
    stop = threading.Event()
    stream = engine.generate(messages, state["adapter"], Sampling(0, 1.0, 50), stop)
    next(stream)
    stop.set()
    text, stats = collect(stream)
    assert stats.finish == "stopped"
    messages.append({"role": "assistant", "content": text})
    messages.append({"role": "user", "content": "Go on."})


@pytest.mark.parametrize(
    "change", [_switch_adapter, _change_system_prompt, _change_sampling, _edit_history, _stop_a_reply]
)
def test_what_rebuilds_the_cache(engine, change):
    engine.prepare_adapter("travel")
    engine.drop_cache()
    state = {"adapter": BASE, "sampling": GREEDY}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[0]}]
    text, _ = collect(engine.generate(messages, BASE, GREEDY))
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": QUESTIONS[1]}]
    _, kept = collect(engine.generate(messages, BASE, GREEDY))
    assert kept.cache_reused and kept.prefill_tokens < kept.prompt_tokens  # unchanged: the cache is extended
    messages.append({"role": "assistant", "content": "Sure."})
    messages.append({"role": "user", "content": QUESTIONS[2]})
    change(engine, messages, state)
    builds = engine.cache_builds
    _, rebuilt = collect(engine.generate(messages, state["adapter"], state["sampling"]))
    assert not rebuilt.cache_reused and rebuilt.prefill_tokens == rebuilt.prompt_tokens == len(engine.encode(messages))
    assert engine.cache_builds == builds + 1
    assert rebuilt.adapter == state["adapter"]


def test_outgrowing_the_context_drops_turns_and_rebuilds_once(engine):
    engine.drop_cache()
    long = "word " * 150
    messages = [{"role": "system", "content": "Be brief."}]
    drops, reused = [], []
    for i in range(16):  # ~300 tokens a turn: the 2048-token context overflows after about 6 turns
        messages.append({"role": "user", "content": f"q{i} {long}"})
        _, stats = collect(engine.generate(messages, BASE, GREEDY))
        assert stats.prompt_tokens + GREEDY.max_new_tokens <= engine.context_length
        drops.append(stats.dropped_messages)
        reused.append(stats.cache_reused)
        messages.append({"role": "assistant", "content": f"a{i} {long}"})
    first = next(i for i, d in enumerate(drops) if d)
    assert not reused[first]  # the turn that overflows rebuilds the cache...
    assert reused[first + 1] and drops[first + 1] == drops[first]  # ...and the next one extends the rebuilt cache
    # the rebuild left a quarter of the context free: a rebuild every few turns, not at every turn
    rebuilds = [i for i in range(first, len(drops)) if not reused[i]]
    assert len(rebuilds) <= (len(drops) - first) // 2, (drops, reused)


def test_a_reload_forgets_the_cache_and_the_loaded_adapters(chat_model):
    """The chat app loads the engine it is given (a bench shares one engine between app sessions): after a reload the
    old model's generator and adapters must not be used."""
    eng = Engine(chat_model)
    eng.load()
    eng.prepare_adapter("travel")
    collect(eng.generate(MESSAGES, "travel", GREEDY))
    assert eng.cached_tokens
    eng.load()
    assert not eng.cached_tokens
    eng.prepare_adapter("travel")
    _, stats = collect(eng.generate(MESSAGES, "travel", GREEDY))
    assert stats.adapter == "travel" and stats.new_tokens >= 1 and not stats.cache_reused


def test_max_context_caps_the_history_and_the_cache(chat_model):
    """A long-context model (Phi-3.5-mini: 131072 tokens) must not allocate its whole context for the cache: the
    engine's context is capped, and history beyond it drops as with any context."""
    eng = Engine(chat_model, max_context=256)
    assert eng.model_context_length == 2048 and eng.context_length == 256
    eng.load()
    long = "word " * 60
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(4):
        messages += [{"role": "user", "content": f"q{i} {long}"}, {"role": "assistant", "content": f"a{i} {long}"}]
    messages.append({"role": "user", "content": "last question"})
    _, stats = collect(eng.generate(messages, BASE, GREEDY))
    assert stats.dropped_messages > 0 and stats.prompt_tokens + GREEDY.max_new_tokens <= 256
