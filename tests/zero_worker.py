"""Two gloo ranks train a tiny model a few steps through DeepSpeed ZeRO-2 at expert-parallel size EP,
with the training loop's parameter groups (``moe_param_groups``) and gradient clipping; rank 0 then
trains a plain model on both ranks' batches (loss averaged) and reports the largest weight difference.

``python zero_worker.py EP OUT``. EP 2: each expert lives on one rank, so its gradient must not be
averaged with the other rank's experts; EP 1: every rank holds every expert, so it must be.
"""

from __future__ import annotations

import json
import socket
import sys

import torch
import torch.distributed as dist

STEPS, CLIP = 3, 0.05


def _rank(rank: int, world: int, port: int, ep: int, out: str) -> None:
    from rank_share_worker import rank_env

    rank_env(rank, world, port)
    torch.set_num_threads(1)
    import deepspeed

    from diffmoe.model import LLaDAMoEModelLM, named_config
    from diffmoe.parallel import (
        build_training_model,
        init_distributed,
        initialize,
        moe_param_groups,
        published_state,
    )

    init_distributed("gloo")
    config = named_config("tiny", num_experts=8, num_experts_per_tok=2)
    model = build_training_model(config, ep).train()
    initialize(model, seed=5)
    optimizer = torch.optim.AdamW(moe_param_groups(model), lr=1e-2, weight_decay=0.0)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    data = torch.randint(
        0, config.vocab_size, (STEPS, world, 2, 24), generator=torch.Generator().manual_seed(11)
    )
    data[:, 1, 1, :12] = 5  # one rank's tokens crowd a few experts
    for step in range(STEPS):
        engine.backward(engine(data[step, rank]).logits.square().mean())
        engine.step()
    state = published_state(model)  # a collective: every rank takes part
    if rank == 0:
        plain = LLaDAMoEModelLM(config).train()
        initialize(plain, seed=5)
        reference = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.0)
        clipped = 0
        for step in range(STEPS):
            reference.zero_grad()
            loss = sum(plain(data[step, r]).logits.square().mean() for r in range(world)) / world
            loss.backward()
            clipped += float(torch.nn.utils.clip_grad_norm_(plain.parameters(), CLIP)) > CLIP
            reference.step()
        worst = max((float((state[k] - v).abs().max()), k) for k, v in plain.state_dict().items())
        with open(out, "w") as f:
            json.dump({"worst": worst[0], "worst_key": worst[1], "clipped_steps": clipped}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    ep, out = int(sys.argv[1]), sys.argv[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, ep, out), nprocs=2, join=True)
