"""Benchmarks that are products of their own: ``dllm_vs_ar`` compares the masked-diffusion model
with its autoregressive twin (same backbone, data, token budget, server) on quality and under load.
Imports Ray, Serve and MLflow lazily; ``jobs/benchmark.py`` and ``benchmarks/`` are thin wrappers."""

from .config import CompareConfig

__all__ = ["CompareConfig", "run_comparison"]


def run_comparison(cfg: CompareConfig, command: str | None = None):
    from .dllm_vs_ar import run_comparison as run

    return run(cfg, command)
