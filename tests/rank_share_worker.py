"""Runs one expert-parallel rank outside pytest's process (process groups are process-global).

``python rank_share_worker.py fake 1:0,4:3 OUT``: fake process groups (no peers; torch's ``fake``
backend), for what one rank (here rank 0 of 1, rank 3 of 4) allocates and initialises.
``python rank_share_worker.py gloo 2 OUT``: two real gloo ranks, for load/initialise/stream parity.
Results go to OUT as JSON (fake) or assertion failures (gloo).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist


def _config():
    from diffmoe.model import named_config

    return named_config("tiny", num_experts=8, num_experts_per_tok=2)


def _reset_groups() -> None:
    import deepspeed.comm as ds_comm
    from deepspeed.utils import groups

    groups._EXPERT_PARALLEL_GROUP.clear()
    groups._EXPERT_DATA_PARALLEL_GROUP.clear()
    ds_comm.destroy_process_group()
    ds_comm.comm.cdb = None


def fake(shapes: list[tuple[int, int]], out: str) -> None:
    """For each (world, rank): what that rank allocates, and whether its init is EP 1's slice."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from diffmoe.model import LLaDAMoEModelLM
    from diffmoe.parallel import build_training_model, init_distributed, initialize
    from diffmoe.parallel.weights import published_views

    config = _config()
    plain = LLaDAMoEModelLM(config)
    initialize(plain, seed=7)
    want = plain.state_dict()
    results = []
    for world, rank in shapes:
        dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
        init_distributed("gloo")
        model = build_training_model(config, world)
        initialize(model, seed=7)
        mine = published_views(model)
        sizes = {"expert": 0, "dense": 0}
        for p in model.parameters():
            sizes["expert" if getattr(p, "allreduce", True) is False else "dense"] += (
                p.numel() * p.element_size()
            )
        results.append(
            {
                "world": world,
                "rank": rank,
                "expert_bytes": sizes["expert"],
                "dense_bytes": sizes["dense"],
                "keys": sorted(mine),
                "equal_to_plain_init": all(torch.equal(v, want[k]) for k, v in mine.items()),
            }
        )
        _reset_groups()
    with open(out, "w") as f:
        json.dump(results, f)


def rank_env(rank: int, world: int, port: int) -> None:
    """The environment torch.distributed reads for rank ``rank`` of ``world`` on this machine."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )


def _gloo_rank(rank: int, world: int, port: int, directory: str) -> None:
    rank_env(rank, world, port)
    from diffmoe.model import LLaDAMoEModelLM
    from diffmoe.model.checkpoint import save_pretrained
    from diffmoe.parallel import (
        build_training_model,
        init_distributed,
        initialize,
        iter_published_state,
        load_published_directory,
    )

    init_distributed("gloo")
    config = _config()
    torch.manual_seed(0)  # the same plain model on both ranks
    plain = LLaDAMoEModelLM(config)
    with torch.no_grad():  # anything but the seeded init
        for p in plain.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    if rank == 0:
        save_pretrained(plain, directory, max_shard_size=20_000)  # many small shards
    dist.barrier()
    model = build_training_model(config, world)
    load_published_directory(model, directory)
    streamed = dict(iter_published_state(model))
    want = plain.state_dict()
    assert list(streamed) == sorted(want), "stream is not every published key in sorted order"
    for key, value in want.items():
        torch.testing.assert_close(streamed[key], value, rtol=0, atol=0, msg=key)
    _refuses_a_checkpoint_with_more_experts(model, plain)
    _sorted_dispatch_parity(model, plain, rank, world)
    initialize(model, seed=3)
    initialize(plain, seed=3)
    for key, value in iter_published_state(model):
        torch.testing.assert_close(value, plain.state_dict()[key], rtol=0, atol=0, msg=key)
    dist.destroy_process_group()


def _refuses_a_checkpoint_with_more_experts(model, plain) -> None:
    """An expert beyond the config's num_experts is an error, not another rank's expert."""
    from diffmoe.parallel import load_published_state

    state = dict(plain.state_dict())
    extra = f"model.layers.0.mlp.experts.{plain.config.num_experts}.down_proj.weight"
    state[extra] = state["model.layers.0.mlp.experts.0.down_proj.weight"]
    try:
        load_published_state(model, state)
    except ValueError as err:
        assert "beyond this model's num_experts=8" in str(err), err
    else:
        raise AssertionError("a checkpoint with more experts than the config loaded")


def _published_grads(model) -> dict:
    """Each parameter's gradient under the published key of the weight (this rank's share)."""
    from diffmoe.parallel.weights import published_views

    weights = {p: p.data for p in model.parameters()}
    for p in weights:
        p.data = p.grad
    grads = {k: v.clone() for k, v in published_views(model).items()}
    for p, data in weights.items():
        p.data = data
    return grads


def _sorted_dispatch_parity(model, plain, rank: int, world: int) -> None:
    """EP=2 (sorted all-to-all dispatch) computes the EP=1 model's outputs and gradients. Each rank
    feeds its own rows; the plain model takes every rank's rows with the sum of the ranks' losses,
    so its gradients are what the ranks' gradients add up to: summed over ranks for replicated
    weights (what data-parallel reduction does), complete on their owner for expert weights."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, plain.config.vocab_size, (world, 2, 24), generator=gen)
    ids[1, 1, :12] = 5  # one token repeated: a hot expert, uneven loads across ranks
    model.train(), plain.train()
    got = model(ids[rank]).logits
    want = plain(ids.reshape(-1, ids.shape[-1])).logits.view(world, 2, 24, -1)
    torch.testing.assert_close(got, want[rank], rtol=1e-5, atol=1e-5)
    got.square().mean().backward()
    want.square().mean(dim=(1, 2, 3)).sum().backward()
    mine, full = _published_grads(model), _published_grads(plain)
    assert any(".mlp.experts." in k for k in mine)
    for key, grad in mine.items():
        if ".mlp.experts." not in key:
            dist.all_reduce(grad)
        torch.testing.assert_close(grad, full[key], rtol=1e-4, atol=1e-7, msg=key)
    model.zero_grad(set_to_none=True), plain.zero_grad(set_to_none=True)


def gloo(world: int, out: str) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_gloo_rank, args=(world, port, directory), nprocs=world, join=True)
    open(out, "w").write("ok")


if __name__ == "__main__":
    kind, arg, out = sys.argv[1:4]
    torch.set_num_threads(1)
    if kind == "fake":  # arg: "world:rank,world:rank,..."
        fake([tuple(int(x) for x in pair.split(":")) for pair in arg.split(",")], out)
    else:
        gloo(int(arg), out)
