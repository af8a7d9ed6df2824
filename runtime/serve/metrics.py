"""`GET /metrics`: the server's counters in Prometheus' text format (version 0.0.4), no dependency.

    Engine.chat --observe(Result)--> Metrics (sums) --render(engine)--> text a Prometheus scrape reads

Requests by outcome (Engine.stats), the queue now, tokens (prompt, generated, restored from the KV
cache), image-cache hits, and first-token / prefill / decode times as summaries (`_sum` and `_count`).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine, Result

PREFIX = "tinygptv"


class Metrics:
    """Sums over finished answers (observed in the worker thread, read by the event loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sums: Counter = Counter()

    def observe(self, r: Result) -> None:
        t = r.timings
        with self._lock:
            s = self.sums
            s["answers"] += 1
            s["prompt_tokens"] += r.prompt_tokens
            s["completion_tokens"] += r.completion_tokens
            s["cached_tokens"] += r.cached_tokens
            s["prefill_tokens"] += t.get("prefill_tokens", 0)
            s["prefill_seconds"] += t.get("prefill_ms", 0.0) / 1e3
            s["decode_tokens"] += t.get("decode_tokens", 0)
            s["decode_seconds"] += t.get("decode_ms", 0.0) / 1e3
            s["first_token_seconds"] += t.get("first_token_ms", 0.0) / 1e3
            s["images"] += t.get("images", 0)
            s["images_cached"] += t.get("images_cached", 0)

    def render(self, engine: Engine) -> str:
        with self._lock:
            s = Counter(self.sums)
        h = engine.health()
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {PREFIX}_{name} {help_}")
            lines.append(f"# TYPE {PREFIX}_{name} {kind}")
            for labels, value in samples:
                lines.append(f"{PREFIX}_{name}{labels} {_num(value)}")

        outcomes = ("completed", "cancelled", "timed_out", "refused", "rejected", "failed")
        metric(
            "requests_total",
            "counter",
            "Requests by outcome (refused: queue full; rejected: 4xx found while running).",
            [(f'{{outcome="{k}"}}', h[k]) for k in outcomes],
        )
        metric("requests_running", "gauge", "Requests being answered now (0 or 1).", [("", h["running"])])
        metric("requests_queued", "gauge", "Requests waiting behind the running one.", [("", h["queue"])])
        metric("ready", "gauge", "1 when the model is loaded and answering.", [("", h["status"] == "ok")])
        metric(
            "prompt_tokens_total",
            "counter",
            "Prompt positions of finished answers.",
            [("", s["prompt_tokens"])],
        )
        metric(
            "prompt_tokens_cached_total",
            "counter",
            "Prompt positions reused from the KV cache or a snapshot instead of evaluated (cache hits).",
            [("", s["cached_tokens"])],
        )
        metric(
            "prompt_tokens_evaluated_total",
            "counter",
            "Prompt positions evaluated.",
            [("", s["prefill_tokens"])],
        )
        metric("tokens_predicted_total", "counter", "Generated tokens.", [("", s["completion_tokens"])])
        metric("images_total", "counter", "Images in finished answers' prompts.", [("", s["images"])])
        metric(
            "images_cached_total",
            "counter",
            "Images whose embeddings came from the image cache (cache hits).",
            [("", s["images_cached"])],
        )
        for name, key, count, help_ in (
            ("first_token_seconds", "first_token_seconds", "answers", "Request start to first token."),
            ("prefill_seconds", "prefill_seconds", "answers", "Prompt evaluation time."),
            ("decode_seconds", "decode_seconds", "answers", "Generation time after the first token."),
        ):
            metric(name, "summary", help_, [("_sum", s[key]), ("_count", s[count])])
        decode_s = s["decode_seconds"]
        metric(
            "decode_tokens_per_second",
            "gauge",
            "Mean generation speed over all finished answers.",
            [("", s["decode_tokens"] / decode_s if decode_s > 0 else 0.0)],
        )
        return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))
