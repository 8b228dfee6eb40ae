"""Sorted expert-parallel dispatch: tokens grouped by destination rank and expert around one
all-to-all each way, and the model's grouped-matmul kernel on the receiving rank.

DeepSpeed's MOELayer pads every expert to the group's largest load (``capacity``) and ships the
padded [ep, E_local, C, H] block both ways, so one hot expert makes every rank send and compute
mostly zeros. Here each rank sorts its (token, choice) pairs by global expert, which groups them by
destination rank too, tells the others how many rows each of their experts will get (an all-to-all
of E counts), and sends exactly those rows (``all_to_all_single`` with split sizes). The receiver
runs ``Experts`` (sorted grouped matmul, the serving kernel) on what it got and sends the rows back
the same way; the sender weights them by the router and sums each token's k choices. Same function
as the EP=1 path, outputs and gradients (tests/test_rank_share.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from diffmoe.model.grouped_mm import dispatch, unsort
from diffmoe.model.layers import Experts
from diffmoe.model.router import Routing


def _spread(n: int, splits: list[int], device) -> torch.Tensor:
    """Where the rows of ``splits``-sized chunks land when each chunk is followed by one spare row."""
    chunk = torch.repeat_interleave(
        torch.arange(len(splits), device=device), torch.tensor(splits, device=device)
    )
    return torch.arange(n, device=device) + chunk


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """``all_to_all_single`` by split sizes with one spare row per rank each way, dropped on
    arrival, so no chunk is ever empty even when a rank's experts got no rows."""
    ranks = len(in_splits)
    send = x.new_zeros((x.shape[0] + ranks, *x.shape[1:]))
    send[_spread(x.shape[0], in_splits, x.device)] = x
    recv = x.new_empty((sum(out_splits) + ranks, *x.shape[1:]))
    dist.all_to_all_single(recv, send, [n + 1 for n in out_splits], [n + 1 for n in in_splits], group=group)
    return recv[_spread(sum(out_splits), out_splits, x.device)]


class _AllToAll(torch.autograd.Function):
    """Rows to ranks by split sizes; the backward sends the gradients back along the same splits."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def sorted_expert_parallel(x: torch.Tensor, routing: Routing, experts: Experts, group, ep_size: int):
    """x [N, H] routed to global experts (routing.expert_idx [N, k]) of which this rank holds
    ``experts`` (its E/ep_size, in rank order) -> [N, H], the weighted sum of each token's k experts.
    Collective over ``group``: every rank calls it once per MoE layer."""
    n, k = routing.expert_idx.shape
    local = experts.num_experts
    flat = routing.expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    send = dispatch(x, order, inverse, k)  # [N*k, H], grouped by destination rank, then expert
    counts = torch.bincount(flat, minlength=local * ep_size)
    incoming = torch.empty_like(counts)
    dist.all_to_all_single(incoming, counts, group=group)  # [source rank, my local expert]
    in_splits = counts.view(ep_size, local).sum(1).tolist()
    out_splits = incoming.view(ep_size, local).sum(1).tolist()
    received = _AllToAll.apply(send, out_splits, in_splits, group)
    local_ids = torch.arange(local, device=x.device).repeat(ep_size).repeat_interleave(incoming)
    ones = torch.ones(local_ids.numel(), 1, device=x.device, dtype=torch.float32)
    # A rank whose experts got no rows still takes part in both exchanges (``Experts`` cannot shape
    # an empty batch; the rows' absence is the whole answer).
    computed = experts(received, local_ids[:, None], ones) if received.shape[0] else received * 0
    returned = _AllToAll.apply(computed, in_splits, out_splits, group)
    weights = routing.weights.reshape(-1)[order].to(returned.dtype)
    return unsort(returned * weights[:, None], order, inverse).view(n, k, -1).sum(1)
