"""Auxiliary-loss-free MoE balancing (LLaDA2 / DeepSeek-V3): nudge the expert bias that selects experts.

After each optimizer step every MoE layer's ``expert_bias`` moves by ``rate`` towards the experts
the last forward under-used: ``bias += rate * sign(mean load - load)``, with the load counted over
all ranks. The bias changes only which experts are chosen, never the weights of the chosen ones,
so balance costs no gradient term that competes with the language-modelling loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from diffmoe.model.router import expert_counts
from diffmoe.parallel import gates


def bias_step(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """In place: raise the bias of experts below the mean load, lower it above; ties stay."""
    bias.add_(rate * torch.sign(load.float().mean() - load.float()))


@torch.no_grad()
def update_expert_bias(model, rate: float) -> int:
    """One update of every gate that has a selection bias (``routing_bias``); collective over the default group
    when one is up (every rank calls it). Returns the number of layers updated."""
    updated = 0
    for gate in gates(model):
        bias = getattr(gate, "routing_bias", None)
        if bias is None or gate.routing is None:
            continue
        load = expert_counts(gate.routing.expert_idx, bias.numel()).to(torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load)
        bias_step(bias, load, rate)
        updated += 1
    return updated
