"""Async HTTP load generator for OpenAI-compatible servers (bounded in count and time).

Closed loop (``run_level``): ``c`` clients each send streamed completions back to back until
``requests`` have been sent or ``duration_s`` has passed. Open loop (``run_open_loop``): requests
arrive as a Poisson process at a set rate whatever the server does, as users do, so a rate past
the server's capacity shows as growing latency (the queue) rather than as a fixed number of
clients waiting politely. Per request: latency, time to first streamed token, output tokens (from
the usage chunk). Used by ``benchmarks/bench_serve.py`` and the dLLM-vs-AR load sweep; reusable
for other servers (vLLM, ...).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Result:
    ok: bool
    latency: float
    ttft: float | None = None
    tokens: int = 0
    error: str | None = None
    text: str = ""


@dataclass
class LevelStats:
    concurrency: int  # closed loop: clients; open loop: the most requests in flight at once
    requests: int
    errors: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    latency_s: dict = field(default_factory=dict)
    ttft_s: dict = field(default_factory=dict)
    error_rate: float = 0.0
    sample_errors: list = field(default_factory=list)
    correct: int | None = None  # answers equal to the expected ones (when given), under this load
    correct_answers_per_s: float | None = None
    offered_rps: float | None = None  # open loop: the Poisson arrival rate asked for


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)

    def q(p):  # nearest-rank
        return v[min(len(v) - 1, max(0, int(round(p / 100 * len(v) + 0.5)) - 1))]

    return {"p50": q(50), "p95": q(95), "p99": q(99), "mean": statistics.fmean(v), "max": v[-1]}


async def one_request(client: httpx.AsyncClient, path: str, body: dict) -> Result:
    t0 = time.perf_counter()
    ttft, tokens, pieces = None, 0, []
    try:
        async with client.stream(
            "POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}}
        ) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:200]
                return Result(False, time.perf_counter() - t0, error=f"{r.status_code}: {text}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return Result(False, time.perf_counter() - t0, error=str(data["error"])[:200])
                for ch in data.get("choices", []):
                    piece = ch.get("text") or (ch.get("delta") or {}).get("content")
                    if piece:
                        pieces.append(piece)
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        return Result(False, time.perf_counter() - t0, error=f"{type(err).__name__}: {err}"[:200])
    return Result(True, time.perf_counter() - t0, ttft, tokens, text="".join(pieces))


async def run_level(
    base_url: str,
    body: dict | list[dict],
    concurrency: int,
    requests: int,
    duration_s: float,
    path: str = "/v1/completions",
    headers: dict | None = None,
    timeout_s: float = 120.0,
    expected: list[str] | None = None,
) -> LevelStats:
    """Run one concurrency level; never more than ``requests`` requests or ``duration_s`` of sending.
    ``body`` may be a list: request k sends ``body[k % len(body)]`` (the same order on every run).
    ``expected``: the right answer per body; answers are then scored (exact match, whitespace
    stripped), so accuracy is measured under load, not assumed from an offline run."""
    bodies = body if isinstance(body, list) else [body]
    results: list[Result] = []
    asked: list[int] = []
    sent = 0
    deadline = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout_s, limits=limits
    ) as client:

        async def worker():
            nonlocal sent
            while sent < requests and time.perf_counter() < deadline:
                k, sent = sent, sent + 1
                result = await one_request(client, path, bodies[k % len(bodies)])
                results.append(result)
                asked.append(k)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return _summarize(results, asked, wall, bodies, expected, concurrency=concurrency)


async def run_open_loop(
    base_url: str,
    body: dict | list[dict],
    rate: float,
    requests: int,
    duration_s: float,
    path: str = "/v1/completions",
    headers: dict | None = None,
    timeout_s: float = 120.0,
    expected: list[str] | None = None,
    seed: int = 0,
) -> LevelStats:
    """Poisson arrivals at ``rate`` requests/s (seeded exponential gaps, the same schedule on every
    run) until ``requests`` were sent or ``duration_s`` passed; then waits for the ones in flight.
    Throughput is over the whole wall time, so a rate the server cannot keep up with shows a
    lower achieved rate and a growing latency."""
    import random

    bodies = body if isinstance(body, list) else [body]
    gaps = random.Random(seed)
    results: list[Result] = []
    asked: list[int] = []
    in_flight = peak = 0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)

    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout_s, limits=limits
    ) as client:

        async def send(k: int) -> None:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                results.append(await one_request(client, path, bodies[k % len(bodies)]))
                asked.append(k)
            finally:
                in_flight -= 1

        t0 = time.perf_counter()
        tasks, due = [], t0
        for k in range(requests):
            due += gaps.expovariate(rate)
            if due - t0 > duration_s:
                break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.ensure_future(send(k)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    stats = _summarize(results, asked, wall, bodies, expected, concurrency=peak)
    stats.offered_rps = rate
    return stats


def _summarize(results, asked, wall, bodies, expected, concurrency: int) -> LevelStats:
    good = [r for r in results if r.ok]
    correct = None
    if expected:
        correct = sum(
            r.ok and r.text.strip() == expected[k % len(bodies)].strip() for r, k in zip(results, asked)
        )
    return LevelStats(
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(good),
        wall_s=wall,
        requests_per_s=len(good) / wall,
        output_tokens_per_s=sum(r.tokens for r in good) / wall,
        latency_s=percentiles([r.latency for r in good]),
        ttft_s=percentiles([r.ttft for r in good if r.ttft is not None]),
        error_rate=(len(results) - len(good)) / max(1, len(results)),
        sample_errors=[r.error for r in results if not r.ok][:3],
        correct=correct,
        correct_answers_per_s=None if correct is None else correct / wall,
    )
