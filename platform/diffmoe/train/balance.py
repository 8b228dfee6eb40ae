"""Auxiliary-loss-free MoE balancing (LLaDA2 / DeepSeek-V3): nudge the expert bias that selects experts.

After each optimizer step every MoE layer's ``expert_bias`` moves by ``rate`` towards the experts
the step's forwards under-used: ``bias += rate * sign(mean load - load)``, with the load counted
over every micro-batch of the step (``count_expert_load`` after each) and over all ranks. The bias
is not trained by gradient, so balance costs no loss term that competes with language modelling
(in LLaDA2 it only selects experts; LLaDA-MoE, as published, also mixes with it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from diffmoe.model.router import expert_counts
from diffmoe.parallel import gates


def bias_step(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """In place: raise the bias of experts below the mean load, lower it above; ties stay."""
    bias.add_(rate * torch.sign(load.float().mean() - load.float()))


def _biased_gates(model):
    return [g for g in gates(model) if getattr(g, "routing_bias", None) is not None]


@torch.no_grad()
def count_expert_load(model) -> None:
    """Add the last forward's routing to each biased gate's load since the last update (call after
    every micro-batch, so a step with gradient accumulation counts all of its tokens)."""
    for gate in _biased_gates(model):
        if gate.routing is None:
            continue
        counts = expert_counts(gate.routing.expert_idx, gate.routing_bias.numel()).to(torch.float64)
        pending = getattr(gate, "pending_load", None)
        gate.pending_load = counts if pending is None else pending + counts


@torch.no_grad()
def update_expert_bias(model, rate: float) -> int:
    """One update of every gate that has a selection bias (``routing_bias``), from the load
    ``count_expert_load`` counted since the last update; collective over the default group when one
    is up (every rank calls it). Returns the number of layers updated."""
    updated = 0
    for gate in _biased_gates(model):
        load, gate.pending_load = getattr(gate, "pending_load", None), None
        if load is None:
            continue
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load)
        bias_step(gate.routing_bias, load, rate)
        updated += 1
    return updated
