"""The status bar: model, adapter, device (EP), speed of the last reply, context used."""

from __future__ import annotations

from textual.content import Content
from textual.reactive import reactive
from textual.widgets import Static


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


class StatusBar(Static):
    model = reactive("")
    adapter = reactive("base")
    device = reactive("")
    state = reactive("loading model…")
    tokens_per_s: reactive[float | None] = reactive(None)
    ttft_s: reactive[float | None] = reactive(None)
    context_used = reactive(0)
    context_max = reactive(0)

    def render(self) -> Content:
        ttft = "–" if self.ttft_s is None else f"{self.ttft_s * 1000:.0f} ms"
        return Content(
            f" {self.state} │ {self.model} │ adapter {self.adapter} │ {self.device} │ "
            f"{_num(self.tokens_per_s, '.1f')} tok/s │ TTFT {ttft} │ context {self.context_used}/{self.context_max}"
        )
