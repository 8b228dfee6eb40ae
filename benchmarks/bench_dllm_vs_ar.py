"""Diffusion MoE vs its autoregressive twin at the full settings (jobs/configs/benchmark_dllm_vs_ar.yaml):
three sides (masked diffusion, block diffusion converted from the trained AR twin, the AR twin), same
backbone, data and Ray Serve stack; quality, a threshold sweep per diffusion side, a closed-loop load
sweep at concurrency 1..64 and an open-loop Poisson sweep. Writes docs/benchmarks/dllm_vs_ar.json,
.md and PNG plots; logs every side to MLflow (experiment dllm_vs_ar, sqlite:///mlflow.db unless
MLFLOW_TRACKING_URI is set).

    .venv/bin/python benchmarks/bench_dllm_vs_ar.py [--set train.steps=600 ...]
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    from diffmoe.bench import CompareConfig
    from diffmoe.jobs import run_job

    def compare(cfg: CompareConfig, args) -> dict:
        import ray

        from diffmoe.bench import run_comparison

        ray.init(
            num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1"
        )
        sets = " ".join(f"--set {shlex.quote(o)}" for o in args.overrides)
        command = f".venv/bin/python benchmarks/bench_dllm_vs_ar.py {sets}".rstrip()
        try:
            result = run_comparison(cfg, command=command if sets else f"make bench  # or: {command}")
        finally:
            ray.shutdown()
        return {"benchmark": "dllm_vs_ar", "headline": result["headline"], "seconds": result["seconds"]}

    os.chdir(ROOT)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_job(
        CompareConfig,
        compare,
        description=__doc__,
        argv=argv,
        default_config="jobs/configs/benchmark_dllm_vs_ar.yaml",
        add_args=lambda p: p.add_argument(
            "--num-cpus",
            type=int,
            default=8,
            help="logical CPUs of the local Ray cluster (each side's replica takes load.replica_cpus)",
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
