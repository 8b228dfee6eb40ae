"""Diffusion MoE vs its autoregressive twin at the full settings (jobs/configs/benchmark_dllm_vs_ar.yaml):
same backbone, data, token budget and Ray Serve stack; quality and a load sweep at concurrency
1..32. Writes docs/benchmarks/dllm_vs_ar.json, .md and PNG plots; logs both sides to MLflow
(experiment dllm_vs_ar, sqlite:///mlflow.db unless MLFLOW_TRACKING_URI is set).

    .venv/bin/python benchmarks/bench_dllm_vs_ar.py [--set train.steps=600 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    args = parser.parse_args()
    os.chdir(ROOT)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from diffmoe.bench import CompareConfig, run_comparison
    from diffmoe.config import load

    cfg = load(CompareConfig, ROOT / "jobs/configs/benchmark_dllm_vs_ar.yaml", args.overrides)
    ray.init(
        num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1"
    )
    sets = " ".join(f"--set {shlex.quote(o)}" for o in args.overrides)
    command = f".venv/bin/python benchmarks/bench_dllm_vs_ar.py {sets}".rstrip()
    if not sets:
        command = f"make bench  # or: {command}"
    try:
        result = run_comparison(cfg, command=command)
    finally:
        ray.shutdown()
    print(
        json.dumps({"benchmark": "dllm_vs_ar", "headline": result["headline"], "seconds": result["seconds"]})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
