"""The chat model without any UI: load the ONNX Runtime GenAI model, list its LoRA adapters, stream replies, stop.

Layout (what the optimize stage writes):
    <model_dir>/model/genai_config.json, model.onnx, tokenizer files
    <model_dir>/adapters/<name>.onnx_adapter

Text, the chat template and streaming decode all go through ORT GenAI's own tokenizer: the optimize stage checks
that it gives the same ids as the transformers tokenizer the adapters were trained with, and it is faster than
Hugging Face `tokenizers` here (encode 0.02-0.05 ms against 0.23-0.30 ms for a 99-token prompt, streaming decode
0.7-1.4 against 1.5-4.6 us per token, 2 cores). Replies stop at the model's end-of-turn tokens, which the
optimize stage writes into genai_config.json (eos_token_id) from the model's own tokenizer and generation config.

The KV cache lives across turns: one ORT GenAI generator, created with the model's whole context as its max_length
(ORT GenAI fixes max_length, and with it the size of the shared past/present buffer, at creation), is kept after a
reply. When the next request uses the same adapter and search options and its messages extend the previous ones,
only the tokens after the longest common prefix are appended (`rewind_to` first: the last generated token has no
KV yet, and a reply's text may re-tokenize differently from the tokens that were sampled). Anything else (another
adapter, a system-prompt, temperature or top_p change, an edited or other conversation, a stopped or failed reply,
the history outgrowing the context) starts a new generator and prefills the whole prompt once. max_new_tokens is
counted here, per reply, and changes nothing in the generator. One cache, not one per
adapter: the buffer is allocated and zero-filled for the whole context (about 360 MB for SmolLM2-135M's 8192
tokens in fp32), so a switch costs one prefill of the history instead.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BASE = "base"  # the selector's name for "no adapter"
ADAPTER_SUFFIX = ".onnx_adapter"
# The longest history a chat keeps, in tokens, when the model allows more: the KV cache kept across turns is
# allocated for its whole length at once (SmolLM2-135M: 8192, about 360 MB in fp32; Phi-3.5-mini's 131072 would
# need about 48 GB in fp16). Engine(max_context=...) changes it.
MAX_CONTEXT = 8192
BUILD_HINT = "build it with `dvc repro optimize` or fetch it with `dvc pull optimize`"
# C0 control characters other than tab and newlines: a byte-level vocabulary may have no token for them (ORT GenAI
# encodes those to -1, an id the model cannot take), and no chat message needs them.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class EngineError(Exception):
    """A problem to show the user as one line; the engine stays usable."""


class ModelMissing(EngineError):
    """No model at the configured path: nothing to chat with."""


def one_line(exc: BaseException, limit: int = 240) -> str:
    """ORT errors are multi-line and start with a C++ source location; make them one readable line."""
    text = " ".join(ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()) or type(exc).__name__
    # "/onnxruntime_src/...cc:93 const Foo* Bar(...) The buffer does not ..." -> the part after the signature
    text = re.sub(r"^/\S+:\d+ .*?\) (?=[A-Z])", "", text)
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256

    def check(self) -> Sampling:
        if not 0 <= self.temperature <= 5:
            raise EngineError(f"temperature must be between 0 and 5, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], not {self.top_p}")
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be a whole number >= 1, not {self.max_new_tokens}")
        return self


@dataclass
class ReplyStats:
    adapter: str
    prompt_tokens: int
    new_tokens: int = 0
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    finish: str = "done"  # done | length | stopped
    dropped_messages: int = 0  # oldest turns left out to fit the context
    prefill_tokens: int = 0  # prompt tokens run through the model for this reply (the rest came from the cache)
    cache_reused: bool = False  # False: a new generator (first turn, or the cache was rebuilt)


@dataclass
class _Cache:
    """The live generator and what its KV cache holds."""

    generator: object  # og.Generator
    adapter: str
    search: tuple[bool, float, float]  # do_sample, temperature, top_p: fixed at creation
    messages: list[dict[str, str]]  # the request the last reply answered (the app's whole history)
    dropped: int  # messages left out of it to fit the context
    tokens: list[int]  # prompt + reply ids; the last one has no KV yet when the reply ended on a sampled token
    computed: int  # how many of `tokens` have their KV in the generator


def model_files(model_dir: Path | str) -> Path:
    """The ORT GenAI model folder inside `model_dir`, or ModelMissing saying how to build it."""
    model_dir = Path(model_dir)
    config = model_dir / "model" / "genai_config.json"
    if not config.is_file():
        raise ModelMissing(f"{model_dir}: no ONNX model here ({config} missing); {BUILD_HINT}")
    return config.parent


def find_adapters(model_dir: Path | str) -> dict[str, Path]:
    folder = Path(model_dir) / "adapters"
    return {p.name.removesuffix(ADAPTER_SUFFIX): p for p in sorted(folder.glob(f"*{ADAPTER_SUFFIX}"))}


def execution_provider(genai_config: dict) -> str:
    """The EP genai_config asks for (its provider_options list is empty for CPU)."""
    options = genai_config.get("model", {}).get("decoder", {}).get("session_options", {}).get("provider_options", [])
    names = [name for entry in options for name in entry]
    return names[0] if names else "cpu"


class Engine:
    """One model, its adapters, one reply at a time (the lock); safe to drive from a worker thread."""

    def __init__(self, model_dir: Path | str, max_context: int = MAX_CONTEXT):
        self.model_dir = Path(model_dir)
        self.model_path = model_files(self.model_dir)
        self.adapter_files = find_adapters(self.model_dir)
        try:
            self.genai_config = json.loads((self.model_path / "genai_config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EngineError(f"{self.model_path / 'genai_config.json'}: not readable JSON ({one_line(exc)})") from exc
        model_cfg = self.genai_config.get("model", {})
        self.model_context_length = int(model_cfg.get("context_length") or self.genai_config["search"]["max_length"])
        # the chat's context: the live generator's buffer is allocated for all of it at once
        self.context_length = min(self.model_context_length, int(max_context))
        self.ep = execution_provider(self.genai_config)
        self.lock = threading.Lock()
        self.model = None
        self.load_s: float | None = None
        self._tokenizer = None
        self._adapters = None
        self._loaded_adapters: set[str] = set()
        self._stop_ids: set[int] = set()
        self._cache: _Cache | None = None
        self.prefilled_tokens = 0  # prompt tokens run through the model, all replies: what the cache saves
        self.cache_builds = 0  # generators created for replies (first turns and rebuilds)

    @property
    def name(self) -> str:
        return self.model_dir.name

    @property
    def adapter_names(self) -> list[str]:
        return [BASE, *self.adapter_files]

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> float:
        """Load model and tokenizer (seconds taken). Errors become one EngineError line."""
        import onnxruntime_genai as og

        start = time.perf_counter()
        with self.lock:
            try:
                model = og.Model(str(self.model_path))
                self._adapters = og.Adapters(model)
            except Exception as exc:
                raise EngineError(f"{self.model_path}: cannot load the model: {one_line(exc)}") from exc
            try:
                self._tokenizer = og.Tokenizer(model)
            except Exception as exc:
                raise EngineError(f"{self.model_path}: cannot load the tokenizer: {one_line(exc)}") from exc
            eos = self.genai_config.get("model", {}).get("eos_token_id", [])
            self._stop_ids = set(eos if isinstance(eos, list) else [eos])
            self.model = model
            self._cache = None  # a reload: the old model's generator and adapters go with it
            self._loaded_adapters = set()
        self.load_s = time.perf_counter() - start
        return self.load_s

    def close(self) -> None:
        """Free the model and the cache (EngineProcess ends its child here); `load()` works again after."""
        with self.lock:
            self._cache, self.model, self._adapters, self._tokenizer = None, None, None, None
            self._loaded_adapters = set()

    def _require_loaded(self) -> None:
        if self.model is None:
            raise EngineError("the model is not loaded")

    def prepare_adapter(self, name: str) -> None:
        """Load an adapter file once, so a broken one fails here (when chosen) rather than mid-reply."""
        self._require_loaded()
        if name == BASE or name in self._loaded_adapters:
            return
        path = self.adapter_files.get(name)
        if path is None:
            raise EngineError(f"adapter '{name}' not found in {self.model_dir / 'adapters'}")
        with self.lock:
            if name in self._loaded_adapters:  # loaded by another thread while this one waited
                return
            try:
                self._adapters.load(str(path), name)
            except Exception as exc:
                raise EngineError(f"{path}: not a usable adapter: {one_line(exc)}") from exc
            problem = self._probe(name)
            if problem:
                self._adapters.unload(name)
                raise EngineError(f"{path}: does not fit this model: {problem}")
            self._loaded_adapters.add(name)

    def _probe(self, name: str) -> str | None:
        """An adapter made for another model loads fine and fails only on the first forward pass: run one now.
        Returns the problem as one line (not the exception: its traceback would keep the generator, and with it
        the adapter, in use)."""
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=2)
        generator = og.Generator(self.model, params)
        try:
            generator.set_active_adapter(self._adapters, name)
            generator.append_tokens([0])  # any id: the point is one forward pass with the adapter's weights
        except Exception as exc:
            return one_line(exc)
        finally:
            del generator
        return None

    def render(self, messages: list[dict[str, str]]) -> str:
        """Chat messages as the model's prompt text, ending where the assistant's reply starts."""
        self._require_loaded()
        try:
            clean = [{**m, "content": CONTROL_CHARS.sub("", m["content"])} for m in messages]
            return self._tokenizer.apply_chat_template(json.dumps(clean), add_generation_prompt=True)
        except Exception as exc:
            raise EngineError(f"cannot apply the model's chat template: {one_line(exc)}") from exc

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        return self._tokenizer.encode(self.render(messages)).tolist()

    def fit(self, messages: list[dict[str, str]], room: int, slack: int = 0) -> tuple[list[int], int]:
        """Prompt ids for `messages`, dropping the oldest turns (never the system prompt or the last message)
        until `room` new tokens fit in the context, and `slack` more once any turn has to go. Returns (ids, how many
        messages were dropped)."""
        head = [m for m in messages[:1] if m["role"] == "system"]
        body = messages[len(head) :]
        dropped = 0
        while True:
            ids = self.encode(head + body[dropped:])
            limit = self.context_length - (slack if dropped else 0)
            if len(ids) + room <= limit or dropped >= len(body) - 1:
                break
            dropped += 1
            while dropped < len(body) - 1 and body[dropped]["role"] != "user":  # keep turns paired
                dropped += 1
        if len(ids) >= self.context_length:
            raise EngineError(f"the prompt is {len(ids)} tokens; the model's context holds {self.context_length}")
        return ids, dropped

    def context_used(self, messages: list[dict[str, str]]) -> int:
        return len(self.encode(messages)) if self.loaded and messages else 0

    def drop_cache(self) -> None:
        """Forget the live generator: the next reply prefills its whole prompt."""
        with self.lock:
            self._cache = None

    @property
    def cached_tokens(self) -> list[int]:
        """The ids the live generator has seen (prompt + reply), for tests and benches."""
        return list(self._cache.tokens) if self._cache else []

    def _reusable(self, messages, adapter: str, search: tuple, room: int) -> tuple[list[int], int] | None:
        """Prompt ids (and dropped count) when `messages` extend the cached request on the same adapter and search
        options and still fit the context with the same oldest turns left out; else None."""
        cache = self._cache
        if cache is None or cache.adapter != adapter or cache.search != search:
            return None
        if messages[: len(cache.messages)] != cache.messages:
            return None
        head = [m for m in messages[:1] if m["role"] == "system"]
        ids = self.encode(head + messages[len(head) + cache.dropped :])
        if len(ids) + room > self.context_length:
            return None
        return ids, cache.dropped

    def _generator(self, ids: list[int], cache: _Cache | None, adapter: str, search: tuple, stats: ReplyStats):
        """The generator to continue from, with `ids` appended: the cache's (after a rewind to the longest common
        prefix) or a new one."""
        import onnxruntime_genai as og

        if cache is not None:
            common = 0
            limit = min(cache.computed, len(ids) - 1)  # at least one new token, for the next logits
            while common < limit and cache.tokens[common] == ids[common]:
                common += 1
            if common < cache.generator.token_count():
                cache.generator.rewind_to(common)
            generator = cache.generator
        else:
            do_sample, temperature, top_p = search
            params = og.GeneratorParams(self.model)
            # the whole context: the generator lives across turns and its max_length cannot grow
            params.set_search_options(
                max_length=self.context_length, do_sample=do_sample, temperature=temperature, top_p=top_p
            )
            generator = og.Generator(self.model, params)
            if adapter != BASE:
                if adapter not in self._loaded_adapters:
                    raise EngineError(f"adapter '{adapter}' is not loaded")
                generator.set_active_adapter(self._adapters, adapter)
            common = 0
            self.cache_builds += 1
        generator.append_tokens(ids[common:])
        stats.prefill_tokens = len(ids) - common
        self.prefilled_tokens += stats.prefill_tokens
        return generator

    def generate(
        self, messages: list[dict[str, str]], adapter: str, sampling: Sampling, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """Stream the reply's text. The returned generator's StopIteration value is the ReplyStats;
        `stop.set()` ends it before the next token."""
        self._require_loaded()
        sampling.check()
        stop = stop or threading.Event()
        with self.lock:
            started = time.perf_counter()  # TTFT counts templating and tokenizing too: the user waits for them
            greedy = sampling.temperature == 0
            search = (not greedy, sampling.temperature if not greedy else 1.0, sampling.top_p)
            room = min(sampling.max_new_tokens, self.context_length // 4)
            reuse = self._reusable(messages, adapter, search, room)
            if reuse is None:
                # when turns must go, a quarter of the context more goes with them, so the next turns can extend
                # the rebuilt cache instead of dropping (and rebuilding) again at every turn
                ids, dropped = self.fit(messages, room, slack=self.context_length // 4)
            else:
                ids, dropped = reuse
            stats = ReplyStats(
                adapter=adapter, prompt_tokens=len(ids), dropped_messages=dropped, cache_reused=reuse is not None
            )
            tokens = list(ids)
            # only a reply that ends cleanly leaves a cache to extend; a rebuild frees the old buffer first
            cache, self._cache = (self._cache if reuse is not None else None), None
            try:
                generator = self._generator(ids, cache, adapter, search, stats)
                del cache
                decoder = self._tokenizer.create_stream()  # drops special tokens, as a reply should
                first_at = None
                while True:
                    if stats.new_tokens >= sampling.max_new_tokens or generator.is_done():
                        stats.finish = "length"  # max new tokens, or the end of the context
                        break
                    if stop.is_set():
                        stats.finish = "stopped"
                        break
                    generator.generate_next_token()
                    token = int(generator.get_next_tokens()[0])
                    tokens.append(token)
                    if first_at is None:
                        first_at = time.perf_counter()
                        stats.ttft_s = first_at - started
                    if token in self._stop_ids:
                        break
                    stats.new_tokens += 1
                    piece = decoder.decode(token)
                    if piece:
                        yield piece
            except EngineError:
                raise
            except Exception as exc:
                raise EngineError(f"generation failed: {one_line(exc)}") from exc
            if stats.finish != "stopped":  # a stopped reply leaves no cache: the next turn rebuilds it
                computed = len(tokens) - 1 if len(tokens) > len(ids) else len(tokens)  # the last sampled one: no KV
                self._cache = _Cache(generator, adapter, search, list(messages), dropped, tokens, computed)
            if first_at is not None and stats.new_tokens > 1:  # decode speed: tokens after the first
                stats.tokens_per_s = (stats.new_tokens - 1) / max(time.perf_counter() - first_at, 1e-9)
        return stats


def collect(stream: Iterator[str]) -> tuple[str, ReplyStats]:
    """Drain a `generate` stream: (text, stats). For scripts and benches."""
    parts = []
    while True:
        try:
            parts.append(next(stream))
        except StopIteration as done:
            return "".join(parts), done.value
