"""The chat model without any UI: load the ONNX Runtime GenAI model, list its LoRA adapters, stream replies, stop.

Layout (what the optimize stage writes):
    <model_dir>/model/genai_config.json, model.onnx, tokenizer files
    <model_dir>/adapters/<name>.onnx_adapter

Text, the chat template and streaming decode all go through ORT GenAI's own tokenizer: the optimize stage checks
that it gives the same ids as the transformers tokenizer the adapters were trained with, and it is faster than
Hugging Face `tokenizers` here (encode 0.02-0.05 ms against 0.23-0.30 ms for a 99-token prompt, streaming decode
0.7-1.4 against 1.5-4.6 us per token, 2 cores). Replies stop at the model's end-of-turn tokens, which the
optimize stage writes into genai_config.json (eos_token_id) from the model's own tokenizer and generation config.
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

    def __init__(self, model_dir: Path | str):
        self.model_dir = Path(model_dir)
        self.model_path = model_files(self.model_dir)
        self.adapter_files = find_adapters(self.model_dir)
        try:
            self.genai_config = json.loads((self.model_path / "genai_config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EngineError(f"{self.model_path / 'genai_config.json'}: not readable JSON ({one_line(exc)})") from exc
        model_cfg = self.genai_config.get("model", {})
        self.context_length = int(model_cfg.get("context_length") or self.genai_config["search"]["max_length"])
        self.ep = execution_provider(self.genai_config)
        self.lock = threading.Lock()
        self.model = None
        self.load_s: float | None = None
        self._tokenizer = None
        self._adapters = None
        self._loaded_adapters: set[str] = set()
        self._stop_ids: set[int] = set()

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
        self.load_s = time.perf_counter() - start
        return self.load_s

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

    def fit(self, messages: list[dict[str, str]], room: int) -> tuple[list[int], int]:
        """Prompt ids for `messages`, dropping the oldest turns (never the system prompt or the last message)
        until `room` new tokens fit in the context. Returns (ids, how many messages were dropped)."""
        head = [m for m in messages[:1] if m["role"] == "system"]
        body = messages[len(head) :]
        dropped = 0
        while True:
            ids = self.encode(head + body[dropped:])
            if len(ids) + room <= self.context_length or dropped >= len(body) - 1:
                break
            dropped += 1
            while dropped < len(body) - 1 and body[dropped]["role"] != "user":  # keep turns paired
                dropped += 1
        if len(ids) >= self.context_length:
            raise EngineError(f"the prompt is {len(ids)} tokens; the model's context holds {self.context_length}")
        return ids, dropped

    def context_used(self, messages: list[dict[str, str]]) -> int:
        return len(self.encode(messages)) if self.loaded and messages else 0

    def generate(
        self, messages: list[dict[str, str]], adapter: str, sampling: Sampling, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """Stream the reply's text. The returned generator's StopIteration value is the ReplyStats;
        `stop.set()` ends it before the next token."""
        import onnxruntime_genai as og

        self._require_loaded()
        sampling.check()
        stop = stop or threading.Event()
        with self.lock:
            started = time.perf_counter()  # TTFT counts templating and tokenizing too: the user waits for them
            ids, dropped = self.fit(messages, room=min(sampling.max_new_tokens, self.context_length // 4))
            stats = ReplyStats(adapter=adapter, prompt_tokens=len(ids), dropped_messages=dropped)
            try:
                params = og.GeneratorParams(self.model)
                greedy = sampling.temperature == 0
                params.set_search_options(
                    max_length=min(len(ids) + int(sampling.max_new_tokens), self.context_length),
                    do_sample=not greedy,
                    temperature=sampling.temperature if not greedy else 1.0,
                    top_p=sampling.top_p,
                )
                generator = og.Generator(self.model, params)
                if adapter != BASE:
                    if adapter not in self._loaded_adapters:
                        raise EngineError(f"adapter '{adapter}' is not loaded")
                    generator.set_active_adapter(self._adapters, adapter)
                generator.append_tokens(ids)
                decoder = self._tokenizer.create_stream()  # drops special tokens, as a reply should
                first_at = None
                while not generator.is_done():
                    if stop.is_set():
                        stats.finish = "stopped"
                        break
                    generator.generate_next_token()
                    token = int(generator.get_next_tokens()[0])
                    if first_at is None:
                        first_at = time.perf_counter()
                        stats.ttft_s = first_at - started
                    if token in self._stop_ids:
                        break
                    stats.new_tokens += 1
                    piece = decoder.decode(token)
                    if piece:
                        yield piece
                else:  # ran into max_length without an end-of-turn token
                    stats.finish = "length"
            except EngineError:
                raise
            except Exception as exc:
                raise EngineError(f"generation failed: {one_line(exc)}") from exc
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
