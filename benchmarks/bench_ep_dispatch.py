"""Expert-parallel MoE layer, forward + backward at EP 2 over gloo: sorted dispatch vs DeepSpeed's.

Two ranks, each holding 32 of 64 experts (top-8, hidden 256, expert width 128, 2048 tokens per
rank), run the training model's MoE layer (``ExpertParallelMoE``, our router) two ways on the same
weights and tokens: ours (``dispatch.sorted_expert_parallel``: exactly the routed rows, one
all-to-all each way, the grouped-matmul kernel) and DeepSpeed's MOELayer (every expert padded to
the group's largest load, [ep, E_local, C, H] blocks both ways). Balanced routing (random
tokens) and skewed routing (a quarter of the tokens identical: one hot set of experts, as happens
early in training). Medians over interleaved repetitions; ratio = our tokens/s / DeepSpeed's, balanced.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

E, K, H, WIDTH, TOKENS, REPS = 64, 8, 256, 128, 2048, 15


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from diffmoe.model import named_config
    from diffmoe.parallel import ExpertParallelMoE, init_distributed

    init_distributed("gloo")
    config = named_config(
        "tiny", hidden_size=H, num_experts=E, num_experts_per_tok=K, expert_intermediate_size=WIDTH
    )
    torch.manual_seed(0)
    layer = ExpertParallelMoE(config, world)
    layer.moe.set_deepspeed_parallelism()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02)
    gen = torch.Generator().manual_seed(1 + rank)
    balanced = torch.randn(1, TOKENS, H, generator=gen)
    skewed = balanced.clone()
    skewed[0, : TOKENS // 4] = balanced[0, 0]

    def ours(x):
        return layer(x)[0]

    def deepspeed(x):
        return layer.moe(x)[0]

    def step(fn, x):
        x = x.clone().requires_grad_(True)
        dist.barrier()
        start = time.perf_counter()
        fn(x).square().mean().backward()
        dist.barrier()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {}
    for rep in range(REPS + 2):
        for data_name, x in (("balanced", balanced), ("skewed", skewed)):
            for side, fn in (("sorted", ours), ("deepspeed", deepspeed)):
                seconds = step(fn, x)
                if rep >= 2:  # warm-up
                    times.setdefault(f"{data_name}/{side}", []).append(seconds)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({k: statistics.median(v) for k, v in times.items()}, f)
    dist.destroy_process_group()


def main() -> int:
    from common import write_result

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(_rank, args=(2, port, out), nprocs=2, join=True)
        with open(out) as f:
            median = json.load(f)
    tokens_per_s = {k: round(2 * TOKENS / v, 1) for k, v in median.items()}
    ratio = tokens_per_s["balanced/sorted"] / tokens_per_s["balanced/deepspeed"]
    skew_ratio = tokens_per_s["skewed/sorted"] / tokens_per_s["skewed/deepspeed"]
    write_result(
        "ep_dispatch",
        command="python benchmarks/bench_ep_dispatch.py",
        baseline="DeepSpeed MOELayer capacity-padded dispatch (same layer, weights, router and tokens), EP 2 over gloo",
        ratio=ratio,
        target=">= 1x DeepSpeed's padded dispatch with balanced routing, and faster with skewed routing",
        target_ratio=1.0,
        checks={"faster_than_deepspeed_when_skewed": skew_ratio > 1.0},
        details={
            "shape": {
                "experts": E,
                "top_k": K,
                "hidden": H,
                "expert_width": WIDTH,
                "tokens_per_rank": TOKENS,
            },
            "ranks": 2,
            "threads_per_rank": 1,
            "seconds_fwd_bwd_median": median,
            "tokens_per_s": tokens_per_s,
            "ratio_skewed": round(skew_ratio, 3),
            "reps": REPS,
        },
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
