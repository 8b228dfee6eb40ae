"""Shared helpers for benchmarks: machine description and the result-file format.

Every benchmark writes ``docs/benchmarks/<name>.json`` with the keys ``benchmark``, ``machine``,
``command``, ``baseline``, ``ratio`` (ours / baseline, higher is better), ``target`` (the goal in
words), ``target_ratio`` (the number ``ratio`` must reach), ``checks`` (the target's other
conditions, each measured: name -> bool), ``met`` (``ratio >= target_ratio`` and every check),
``details`` and ``date``. ``met`` is computed here from the measurement, never written by hand.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "benchmarks"


def machine() -> dict[str, Any]:
    """CPU, cores, torch, GPU, memory and load average: the library's description, shared with
    the dLLM-vs-AR report so every result file describes its machine the same way."""
    from diffmoe.bench.report import machine as describe

    return describe()


def write_result(
    name: str,
    *,
    command: str,
    baseline: str,
    ratio: float,
    target: str,
    target_ratio: float,
    details: dict[str, Any],
    checks: dict[str, bool] | None = None,
) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    checks = {k: bool(v) for k, v in (checks or {}).items()}
    result = {
        "benchmark": name,
        "machine": machine(),
        "command": command,
        "baseline": baseline,
        "ratio": round(float(ratio), 4),
        "target": target,
        "target_ratio": float(target_ratio),
        "checks": checks,
        "met": is_met(round(float(ratio), 4), float(target_ratio), checks),
        "details": details,
        "date": time.strftime("%Y-%m-%d"),
    }
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: result[k] for k in ("benchmark", "ratio", "target_ratio", "met")}
    print(json.dumps(summary))
    return path


def is_met(ratio: float, target_ratio: float, checks: dict[str, bool]) -> bool:
    """The target is met when the measured ratio reaches it and every other measured condition holds
    (NaN, from a failed measurement, never meets a target)."""
    return bool(ratio >= target_ratio and all(checks.values()))


def run_on_local_ray(config_cls, bench, script: str, description: str, argv=None, num_cpus: int = 4) -> int:
    """A benchmark that trains or serves through Ray, as a job: ``--config`` / ``--set`` parsed by
    ``diffmoe.jobs.run_job``, a local Ray head on loopback around ``bench(cfg, command)``, where
    ``command`` is the command line that reproduces the run (for the result file)."""
    from diffmoe.jobs import run_job

    def wrapped(cfg, args):
        import ray

        ray.init(
            num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1"
        )
        sets = " ".join(f"--set {shlex.quote(o)}" for o in args.overrides)
        try:
            return bench(cfg, f".venv/bin/python benchmarks/{script} {sets}".rstrip())
        finally:
            ray.shutdown()

    os.chdir(ROOT)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_job(config_cls, wrapped, description=description, argv=argv)


def run_interleaved(sides: dict, repeats: int) -> tuple[dict, dict]:
    """Run each side (a callable returning ``(seconds, *result)``) ``repeats`` times, interleaved so
    that drift on a shared machine hits every side. Returns per side the seconds of every run and
    the result of its last run."""
    times: dict = {k: [] for k in sides}
    results: dict = {}
    for _ in range(repeats):
        for key, run in sides.items():
            seconds, *result = run()
            times[key].append(seconds)
            results[key] = tuple(result)
    return times, results


@contextmanager
def expert_parallel_model(m, workers: int = 2):
    """A local Ray head on loopback and an expert-parallel model of ``m`` on ``workers`` Ray actors
    (1 CPU each, experts split between them, gloo all-to-all); both stopped afterwards."""
    import ray

    from diffmoe.serve.expert_parallel import ExpertParallelModel

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        with tempfile.TemporaryDirectory() as d:
            m.save_pretrained(d)
            ep = ExpertParallelModel.start(m.config, workers, d, None, worker_cpus=1.0)
        try:
            yield ep
        finally:
            ep.shutdown()
    finally:
        ray.shutdown()
