"""Engine and request metrics, exported through Ray's Prometheus endpoint (``ray.util.metrics``).

Ray Serve exports its own (``ray_serve_*``: requests, latencies, replicas); these add what only the
diffusion engine knows: output tokens, forward passes per token, batch size and queue length.
Every metric carries ``model`` and Serve's ``replica`` tag so replicas are told apart.
"""

from __future__ import annotations

import time

from ray.util import metrics as m

LATENCY_BOUNDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class EngineMetrics:
    def __init__(self, model: str):
        self.tags = {"model": model}
        keys = ("model",)
        self.requests = m.Counter(
            "diffmoe_requests", "finished requests", tag_keys=keys + ("endpoint", "status")
        )
        self.output_tokens = m.Counter("diffmoe_output_tokens", "answer tokens returned", tag_keys=keys)
        self.prompt_tokens = m.Counter("diffmoe_prompt_tokens", "prompt tokens received", tag_keys=keys)
        self.forwards = m.Counter("diffmoe_forward_passes", "model forward passes", tag_keys=keys)
        self.latency = m.Histogram(
            "diffmoe_request_latency_s", "request latency", boundaries=LATENCY_BOUNDS, tag_keys=keys
        )
        self.ttft = m.Histogram(
            "diffmoe_time_to_first_token_s", "time to first token", boundaries=LATENCY_BOUNDS, tag_keys=keys
        )
        self.tokens_per_s = m.Gauge(
            "diffmoe_tokens_per_s", "answer tokens per second (last interval)", tag_keys=keys
        )
        self.forwards_per_token = m.Gauge(
            "diffmoe_forwards_per_token", "forward passes per answer token (last interval)", tag_keys=keys
        )
        self.batch_size = m.Gauge("diffmoe_batch_size", "requests decoding together", tag_keys=keys)
        self.queue_length = m.Gauge(
            "diffmoe_queue_length", "requests waiting for a batch slot", tag_keys=keys
        )
        self._last = (time.monotonic(), 0, 0)
        self.total_tokens = 0
        self.cancelled = 0
        self.errors: dict[str, int] = {}  # error answers by status tag, shown in /health

    def finished(self, endpoint: str, status: str, prompt_tokens: int, tokens: int, latency: float, ttft):
        self.requests.inc(1, {**self.tags, "endpoint": endpoint, "status": status})
        self.prompt_tokens.inc(prompt_tokens, self.tags)
        if tokens:
            self.output_tokens.inc(tokens, self.tags)
        self.total_tokens += tokens
        self.latency.observe(latency, self.tags)
        if ttft is not None:
            self.ttft.observe(ttft, self.tags)
        if status == "cancelled":
            self.cancelled += 1

    def rejected(self, endpoint: str, http_status: int) -> str:
        """Count an error answer (4xx or 5xx); returns its ``status`` tag."""
        if http_status in (429, 503):
            kind = "overloaded"
        elif http_status == 504:
            kind = "timeout"
        else:
            kind = "rejected" if http_status < 500 else "error"
        self.requests.inc(1, {**self.tags, "endpoint": endpoint, "status": kind})
        self.errors[kind] = self.errors.get(kind, 0) + 1
        return kind

    def sample(self, engine) -> dict:
        """Update the gauges from the engine (called every second by the replica)."""
        now, forwards = time.monotonic(), engine.forwards
        t0, f0, k0 = self._last
        dt, df, dk = now - t0, forwards - f0, self.total_tokens - k0
        self._last = (now, forwards, self.total_tokens)
        if df:
            self.forwards.inc(df, self.tags)
        stats = {
            "active": len(engine.active),
            "pending": len(engine._pending),
            "forwards": forwards,
            "tokens": self.total_tokens,
            "cancelled": self.cancelled,
            "errors": dict(self.errors),
            "tokens_per_s": dk / dt if dt > 0 else 0.0,
            "forwards_per_token": df / dk if dk else 0.0,
        }
        self.tokens_per_s.set(stats["tokens_per_s"], self.tags)
        self.forwards_per_token.set(stats["forwards_per_token"], self.tags)
        self.batch_size.set(stats["active"], self.tags)
        self.queue_length.set(stats["pending"], self.tags)
        return stats
