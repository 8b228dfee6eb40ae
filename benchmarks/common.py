"""Shared helpers for benchmarks: machine description and the result-file format.

Every benchmark writes ``docs/benchmarks/<name>.json`` with the keys ``benchmark``, ``machine``,
``command``, ``baseline``, ``ratio`` (ours / baseline, higher is better), ``target`` and ``details``.
"""

from __future__ import annotations

import json
import time
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
    details: dict[str, Any],
) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": name,
        "machine": machine(),
        "command": command,
        "baseline": baseline,
        "ratio": round(float(ratio), 4),
        "target": target,
        "details": details,
        "date": time.strftime("%Y-%m-%d"),
    }
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"benchmark": name, "ratio": result["ratio"], "target": target}))
    return path
