"""Shared helpers for benchmarks: machine description and the result-file format.

Every benchmark writes ``docs/benchmarks/<name>.json`` with the keys ``benchmark``, ``machine``,
``command``, ``baseline``, ``ratio`` (ours / baseline, higher is better), ``target`` and ``details``.
"""

from __future__ import annotations

import json
import os
import platform as _stdlib_platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "benchmarks"


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu": _stdlib_platform.processor() or _stdlib_platform.machine(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


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
