"""Load: every side deployed side by side by the same Serve app (``run_app``, loopback), the same
load generator, the same prompts in the same order and the same answer caps at every concurrency.

Levels alternate sides (dLLM, AR, block at each level) so a busy machine hurts all alike. Cost per
1k output tokens is measured, not assumed: the CPU time (user + system, all threads) that the
replica process used over the level, from ``psutil``; the whole machine's busy CPU time (proxy,
controller and load generator included) is reported beside it. GPU-seconds = replica GPUs x wall
time, reported only when the replicas hold a GPU.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import asdict

from .config import CompareConfig
from .quality import block_length_of, decoding_for, eval_prompts, machine_busy_s, stop_ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_args(
    cfg: CompareConfig,
    side: str,
    model_dir: str,
    port: int,
    stops: list[int],
    threshold: float | None = None,
    block_length: int | None = None,
) -> dict:
    """Serve args of one side: its swept ``threshold`` (default ``decoding.threshold``) and, for a
    block-diffusion side, its decoding block."""
    d, ld = cfg.decoding, cfg.load
    return {
        "model": model_dir,
        "model_name": side,
        "http_port": port,
        "route_prefix": f"/{side}",
        "num_replicas": 1,
        "max_batch_size": ld.max_batch_size,
        "max_ongoing_requests": max(64, 2 * max(ld.concurrency)),
        "replica_cpus": ld.replica_cpus,
        "replica_gpus": ld.replica_gpus,
        "max_tokens_limit": cfg.task.seq_len,
        "log_requests": False,
        "decoding": {
            "gen_length": block_length or 8,
            "block_length": block_length or 8,
            "threshold": d.threshold if threshold is None else threshold,
            "cache": d.cache,
            "temperature": d.temperature,
            "stop_token_ids": stops,
        },
    }


def request_bodies(
    cfg: CompareConfig, side: str, prompts: list[list[int]], block_length: int | None = None
) -> list[dict]:
    """One completion per prompt (token ids): answer cap = canvas = the rest of a training row
    (rounded up to whole blocks for a block-diffusion side)."""
    bodies = []
    for p in prompts:
        dec = decoding_for(cfg, len(p), [], block_length)
        bodies.append(
            {
                "model": side,
                "prompt": p,
                "max_tokens": dec.gen_length,
                "gen_length": dec.gen_length,
                "block_length": dec.block_length,
                "temperature": cfg.decoding.temperature,
                "ignore_eos": cfg.load.ignore_eos,
            }
        )
    return bodies


def replica_process(app: str):
    """The Serve replica's process (its title names the app), for CPU accounting."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if f"ServeReplica:{app}:" in cmd:
            return proc
    return None


def _cpu_s(proc) -> float | None:
    if proc is None:
        return None
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except Exception:  # noqa: BLE001 - the replica may have been replaced
        return None


def measure_level(
    url: str,
    bodies: list[dict],
    c: int,
    n: int,
    duration: float,
    proc,
    gpus: float,
    expected=None,
    rate: float | None = None,
) -> dict:
    """One level: closed loop with ``c`` clients, or open loop (Poisson at ``rate`` requests/s)."""
    from .loadgen import run_level, run_open_loop

    cpu0, busy0, t0 = _cpu_s(proc), machine_busy_s(), time.perf_counter()
    if rate is None:
        run = run_level(url, bodies, c, n, duration, expected=expected)
    else:
        run = run_open_loop(url, bodies, rate, n, duration, expected=expected)
    stats = asdict(asyncio.run(run))
    wall = time.perf_counter() - t0
    cpu1, busy1 = _cpu_s(proc), machine_busy_s()
    tokens = stats["output_tokens_per_s"] * stats["wall_s"]
    stats["output_tokens"] = round(tokens)
    per_1k = 1000.0 / tokens if tokens else float("nan")
    if cpu0 is not None and cpu1 is not None:
        stats["replica_cpu_s"] = cpu1 - cpu0
        stats["replica_cpu_s_per_1k_tokens"] = (cpu1 - cpu0) * per_1k
    stats["machine_cpu_s"] = busy1 - busy0
    stats["machine_cpu_s_per_1k_tokens"] = (busy1 - busy0) * per_1k
    if gpus:
        stats["gpu_s_per_1k_tokens"] = gpus * wall * per_1k
    if stats["correct"] is not None:
        ok = stats["requests"] - stats["errors"]
        stats["served_accuracy"] = stats["correct"] / ok if ok else float("nan")
        if cpu0 is not None and cpu1 is not None and stats["correct"]:
            stats["replica_cpu_s_per_1k_correct"] = (cpu1 - cpu0) * 1000.0 / stats["correct"]
    return stats


def run_load(
    cfg: CompareConfig,
    model_dirs: dict[str, str],
    thresholds: dict[str, float | None] | None = None,
    log=print,
) -> dict[str, dict[str, list[dict]]]:
    """Deploy every side (at its swept threshold, default ``decoding.threshold``; a block side in
    its blocks), sweep the closed-loop concurrency levels then the open-loop Poisson rates, tear
    Serve down; per side {"load": closed-loop level stats, "open_loop": per-rate stats}."""
    import ray

    names = list(model_dirs)
    thresholds = thresholds or {}
    needed, have = len(names) * cfg.load.replica_cpus, ray.cluster_resources().get("CPU", 0.0)
    if needed > have:  # Serve would wait forever for a replica that cannot be placed
        raise ValueError(
            f"load.replica_cpus={cfg.load.replica_cpus} x {len(names)} sides needs {needed:g} CPUs but the "
            f"Ray cluster has {have:g}: lower load.replica_cpus or start Ray with more (logical) CPUs"
        )
    from ray import serve

    from diffmoe.serve.app import run_app
    from diffmoe.serve.host import load_tokenizer_dir

    ld = cfg.load
    tok, _ = load_tokenizer_dir(model_dirs[names[0]])
    stops = stop_ids(tok)
    examples, prompts = eval_prompts(cfg, tok, ld.prompts)
    answers = [ex.answer for ex in examples]
    port = ld.http_port or free_port()
    urls, procs, bodies = {}, {}, {}
    results: dict[str, list[dict]] = {side: [] for side in names}
    open_loop: dict[str, list[dict]] = {side: [] for side in names}
    try:
        for side in names:
            block = block_length_of(cfg, side)
            args = serve_args(cfg, side, model_dirs[side], port, stops, thresholds.get(side), block)
            urls[side] = run_app(args, name=side)
            procs[side] = replica_process(side)
            bodies[side] = request_bodies(cfg, side, prompts, block)
            if ld.warmup_requests:
                measure_level(urls[side], bodies[side], 4, ld.warmup_requests, ld.duration_s, None, 0)
        for c in ld.concurrency:
            n = max(ld.min_requests, ld.requests_per_client * c)
            for side in names:
                stats = measure_level(
                    urls[side], bodies[side], c, n, ld.duration_s, procs[side], ld.replica_gpus, answers
                )
                results[side].append(stats)
                log(
                    f"{side:5s} c={c:2d} n={stats['requests']:3d} rps={stats['requests_per_s']:.2f} "
                    f"tok/s={stats['output_tokens_per_s']:.1f} p50={stats['latency_s'].get('p50', 0):.3f} "
                    f"p99={stats['latency_s'].get('p99', 0):.3f} ttft50={stats['ttft_s'].get('p50', 0):.3f} "
                    f"cpu_s/1k={stats.get('replica_cpu_s_per_1k_tokens', float('nan')):.2f} "
                    f"correct={stats['correct']}/{stats['requests']} "
                    f"errors={stats['errors']}"
                )
        for rate in ld.poisson_rates:
            n = max(1, int(rate * ld.poisson_duration_s * 2))  # the duration, not n, ends the level
            for side in names:
                stats = measure_level(
                    urls[side], bodies[side], 0, n, ld.poisson_duration_s, procs[side],
                    ld.replica_gpus, answers, rate=rate,
                )  # fmt: skip
                open_loop[side].append(stats)
                log(
                    f"{side:5s} poisson {rate:g}/s: served {stats['requests_per_s']:.2f}/s "
                    f"p50={stats['latency_s'].get('p50', 0):.3f} p99={stats['latency_s'].get('p99', 0):.3f} "
                    f"peak in flight={stats['concurrency']} correct={stats['correct']}/{stats['requests']} "
                    f"errors={stats['errors']}"
                )
    finally:
        serve.shutdown()
    for side in names:
        for stats in results[side] + open_loop[side]:
            stats["replica_found"] = procs.get(side) is not None
    return {side: {"load": results[side], "open_loop": open_loop[side]} for side in names}
