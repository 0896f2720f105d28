"""Chat settings: defaults from params.yaml `chat.*`, edited at run time in the settings screen."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chat.engine import EngineError, Sampling

KEYS = ("model_dir", "system_prompt", "temperature", "top_p", "max_new_tokens")


@dataclass
class ChatSettings:
    model_dir: Path
    system_prompt: str = ""
    sampling: Sampling = field(default_factory=Sampling)


def from_params(params: dict[str, Any], source: str = "params.yaml") -> ChatSettings:
    """Read `chat.*`; a missing or bad value is one error naming the key."""
    chat = params.get("chat")
    if not isinstance(chat, dict):
        raise EngineError(f"{source}: missing section 'chat'")
    for key in KEYS:
        if key not in chat:
            raise EngineError(f"{source}: missing key 'chat.{key}'")
    try:
        sampling = Sampling(float(chat["temperature"]), float(chat["top_p"]), int(chat["max_new_tokens"]))
        sampling.check()
    except (TypeError, ValueError, EngineError) as exc:
        raise EngineError(f"{source}: chat: {exc}") from exc
    return ChatSettings(Path(chat["model_dir"]), str(chat["system_prompt"] or ""), sampling)
