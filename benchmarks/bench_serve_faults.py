"""Serving under faults, one run against the real Ray Serve app on loopback: hostile requests,
overload at 4x a replica's capacity, then a killed replica. Writes ``details.faults`` into
docs/benchmarks/serve.json (bench_serve.py keeps it when it rewrites the file).

    .venv/bin/python benchmarks/bench_serve_faults.py [--overload-s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import free_port  # noqa: E402
from common import OUT_DIR  # noqa: E402

VALID = {
    "model": "tiny",
    "prompt": "def parse(text):\n    ",
    "max_tokens": 16,
    "steps": 16,
    "block_length": 8,
}
# (body, content type): every one must get a 4xx, never a 5xx.
HOSTILE = [
    ('{"model": "tiny", "prompt": "\\ud800"}', "application/json"),
    ('{"model": "tiny", "prompt": "a", "seed": 1' + "0" * 40 + "}", "application/json"),
    ('{"model": "tiny", "prompt": "a", "max_tokens": ' + "9" * 5000 + "}", "application/json"),
    ('{"model": "tiny", "prompt": "a", "temperature": NaN}', "application/json"),
    ("[" * 100000, "application/json"),
    (json.dumps({"model": "tiny", "prompt": "x" * (2 << 20)}), "application/json"),
    ("model=tiny&prompt=a", "application/x-www-form-urlencoded"),
    ('{"model": "tiny", "prompt": "a", "block_length": 1000000000}', "application/json"),
    ('{"model": "tiny", "prompt": "a", "stop": ["1", "2", "3", "4", "5"]}', "application/json"),
    ('{"model": "tiny", "prompt": [1, 99999999]}', "application/json"),
    ('{"model": "tiny", "messages": []}', "application/json"),
    ('{"model": "gpt-4", "prompt": "a"}', "application/json"),
    ('{"model": "tiny", "prompt": "a", "max_tokens": "5"}', "application/json"),
]


async def send(client: httpx.AsyncClient, body: str, ctype: str = "application/json"):
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/completions", content=body, headers={"Content-Type": ctype})
        return r.status_code, time.perf_counter() - t0
    except httpx.HTTPError as err:
        return type(err).__name__, time.perf_counter() - t0


async def hostile(url: str, rounds: int) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        out = []
        for _ in range(rounds):
            out += await asyncio.gather(*[send(c, b, t) for b, t in HOSTILE], send(c, json.dumps(VALID)))
        return out


async def overload(url: str, concurrency: int, seconds: float) -> list:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        out, deadline = [], time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < deadline:
                out.append(await send(c, json.dumps(VALID)))

        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return out


async def recovery(url: str) -> tuple[float, list]:
    t0, seen = time.perf_counter(), []
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        while time.perf_counter() - t0 < 300:
            status, _ = await send(c, json.dumps(VALID))
            seen.append(status)
            if status == 200:
                break
            await asyncio.sleep(0.2)
    return time.perf_counter() - t0, seen


def p99(values: list[float]) -> float | None:
    v = sorted(values)
    return round(v[min(len(v) - 1, int(0.99 * len(v)))], 4) if v else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overload-s", type=float, default=10.0)
    ap.add_argument("--hostile-rounds", type=int, default=10)
    args = ap.parse_args()

    import ray
    from ray import serve

    from diffmoe.bench.tiny_model import make_tiny_model_dir
    from diffmoe.serve.app import run_app

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    model = make_tiny_model_dir(Path(tempfile.mkdtemp()) / "tiny")
    cfg = {
        "model": str(model),
        "model_name": "tiny",
        "http_port": free_port(),
        "num_replicas": 1,
        "max_batch_size": 4,
        "max_pending_requests": 4,
        "replica_cpus": 2,
        "log_requests": False,
    }
    url = run_app(cfg, name="faults")
    capacity = cfg["max_batch_size"] + cfg["max_pending_requests"]
    asyncio.run(overload(url, 2, 2.0))  # warm-up
    bad = asyncio.run(hostile(url, args.hostile_rounds))
    load = asyncio.run(overload(url, 4 * capacity, args.overload_s))
    replica = [a for a in ray.util.list_named_actors(all_namespaces=True) if "REPLICA" in a["name"].upper()]
    ray.kill(ray.get_actor(replica[0]["name"], namespace=replica[0]["namespace"]), no_restart=True)
    recover_s, during = asyncio.run(recovery(url))
    serve.shutdown()
    ray.shutdown()

    sent = bad + load
    codes = Counter(s for s, _ in sent)
    rejected = [t for s, t in load if s in (429, 503)]
    faults = {
        "setup": f"1 replica (2 CPUs, max_batch_size 4 + max_pending_requests 4 = capacity {capacity}), "
        f"tiny random model; {len(HOSTILE)} hostile bodies + 1 valid x {args.hostile_rounds} rounds, then a "
        f"closed loop of {4 * capacity} clients (4x capacity) for {args.overload_s:.0f} s of 16-token "
        "completions, then ray.kill of the replica",
        "requests_sent": len(sent),
        "status_counts": {str(k): v for k, v in sorted(codes.items(), key=str)},
        "count_5xx": sum(v for k, v in codes.items() if isinstance(k, int) and k >= 500),
        "count_4xx": sum(v for k, v in codes.items() if isinstance(k, int) and 400 <= k < 500),
        "hostile_all_4xx": all(
            isinstance(s, int) and 400 <= s < 500
            for i, (s, _) in enumerate(bad)
            if i % (len(HOSTILE) + 1) != len(HOSTILE)
        ),
        "overload_answered_ok": sum(1 for s, _ in load if s == 200),
        "overload_rejected": len(rejected),
        "overload_rejection_p99_s": p99(rejected),
        "overload_max_latency_s": round(max(t for _, t in load), 4),
        "recovery_after_replica_kill_s": round(recover_s, 2),
        "answers_while_recovering": [str(s) for s in during],
    }
    path = OUT_DIR / "serve.json"
    data = json.loads(path.read_text())
    data.setdefault("details", {})["faults"] = faults
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(faults, indent=2))


if __name__ == "__main__":
    main()
