"""Peak host memory of one expert-parallel training rank at the real model sizes, measured.

``python benchmarks/rank_memory.py [config ...]`` builds rank 0 of an 8-rank expert-parallel world
(torch's ``fake`` process-group backend stands in for the other 7 ranks: no peers, no traffic) for
``llada-moe-7b-a1b`` and ``llada2-mini``, exactly as a training worker does
(``build_training_model`` on the meta device, this rank's share allocated in bf16, then
``initialize``), in a fresh process per config, and records peak RSS (``ru_maxrss``) beside the
arithmetic: the rank's parameters x 2 bytes, and what the previous path held (the whole model in
fp32, then the rank's copy). Writes docs/benchmarks/memory/rank_share.json. Not part of
``make bench``: it measures memory, not speed, and needs ~6 GB of free RAM.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks" / "memory" / "rank_share.json"
CONFIGS = ("llada-moe-7b-a1b", "llada2-mini")
WORLD = 8


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def measure(name: str) -> dict:
    """One config, in this process (run in a fresh one per config)."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from diffmoe.model import lm_class, named_config
    from diffmoe.model.llada2_configuration import llada2_named_config
    from diffmoe.parallel import build_training_model, init_distributed, initialize

    torch.set_num_threads(2)
    dist.init_process_group("fake", rank=0, world_size=WORLD, store=FakeStore())
    init_distributed("gloo")
    config = llada2_named_config(name) if name.startswith("llada2") else named_config(name)
    with torch.device("meta"):
        total = sum(p.numel() for p in lm_class(config)(config).parameters())
    before = _rss_gb()
    started = time.perf_counter()
    model = build_training_model(config, WORLD, dtype=torch.bfloat16)
    initialize(model, seed=0)
    seconds = time.perf_counter() - started
    share = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for p in model.parameters() if getattr(p, "allreduce", True) is False)
    return {
        "config": name,
        "ep_size": WORLD,
        "rank": 0,
        "total_parameters": total,
        "rank_parameters": share,
        "rank_expert_parameters": experts,
        "rank_bf16_gb_arithmetic": round(share * 2 / 1e9, 3),
        "peak_rss_gb_after_imports": round(before, 3),
        "peak_rss_gb": round(_rss_gb(), 3),
        "peak_rss_gb_model_only": round(_rss_gb() - before, 3),
        "previous_path_fp32_gb_arithmetic": round((total + share) * 4 / 1e9, 1),
        "build_and_initialize_s": round(seconds, 1),
    }


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2])))
        return 0
    rows = []
    for name in sys.argv[1:] or CONFIGS:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name], capture_output=True, text=True, cwd=ROOT
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import machine

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "measurement": "peak host RSS of expert-parallel rank 0 of 8, bf16, built and initialised",
                "command": "python benchmarks/rank_memory.py",
                "machine": machine(),
                "date": time.strftime("%Y-%m-%d"),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
