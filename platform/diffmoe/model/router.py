"""The one MoE router: every model family and every caller (model forward, DeepSpeed gate,
expert-parallel serving) routes through ``route`` so trained weights mean the same everywhere.

Options cover both families: softmax (LLaDA-MoE) or sigmoid (LLaDA2) scores in fp32, an expert
bias that shifts *which* experts are chosen (auxiliary-loss-free balancing; LLaDA2 mixes with the
unbiased scores, while the published LLaDA-MoE code mixes with the biased ones), group-limited
top-k (groups ranked by the sum of their two best selection scores, as DeepSeek-V3 and LLaDA2
do), renormalisation of the chosen scores and a routed scaling factor. Load-balancing loss, z-loss
and load metrics read the experts actually chosen (``Routing.expert_idx``), never a recomputed
plain top-k, so they stay honest once bias or grouping changes the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

SCORE_FUNCTIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RouterOptions:
    """How one MoE layer turns router logits into (expert ids, weights); built by each family's
    config (``config.router_options()``) from its published field names."""

    num_experts: int
    top_k: int
    score_function: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    expert_bias: bool = False
    # True: the chosen experts are mixed with their biased scores (published LLaDA-MoE code);
    # False: the bias only selects (LLaDA2, DeepSeek-V3).
    bias_in_weights: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.score_function not in SCORE_FUNCTIONS:
            problems.append(f"score_function={self.score_function!r} (choose from {SCORE_FUNCTIONS})")
        if not 1 <= self.top_k <= self.num_experts:
            problems.append(
                f"num_experts_per_tok (top_k)={self.top_k} not in [1, num_experts={self.num_experts}]"
            )
        if self.n_group < 1 or self.num_experts % self.n_group:
            problems.append(f"num_experts={self.num_experts} not divisible into n_group={self.n_group}")
        elif not 1 <= self.topk_group <= self.n_group:
            problems.append(f"topk_group={self.topk_group} not in [1, n_group={self.n_group}]")
        elif self.top_k > self.topk_group * (self.num_experts // self.n_group):
            problems.append(
                f"num_experts_per_tok (top_k)={self.top_k} exceeds the {self.topk_group} kept groups' "
                f"{self.topk_group * (self.num_experts // self.n_group)} experts"
            )
        if problems:
            raise ValueError("invalid router options: " + "; ".join(problems))

    @property
    def grouped(self) -> bool:
        return self.n_group > 1 and self.topk_group < self.n_group


class Routing(NamedTuple):
    """One layer's routing of N tokens: fp32 ``logits`` [N, E], chosen ``expert_idx`` [N, k] and
    fp32 ``weights`` [N, k]. Unpacks like the (logits, ids, weights) tuple callers expect."""

    logits: torch.Tensor
    expert_idx: torch.Tensor
    weights: torch.Tensor


def gate_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gate logits in fp32 whatever the model dtype: bf16 logits flip near-tied expert choices."""
    return F.linear(x.float(), weight.float())


def scores(options: RouterOptions, logits: torch.Tensor) -> torch.Tensor:
    """Per-expert scores [N, E] from fp32 logits: softmax over experts, or independent sigmoids."""
    return logits.softmax(dim=-1) if options.score_function == "softmax" else logits.sigmoid()


def select_experts(
    options: RouterOptions, logits: torch.Tensor, expert_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [N, E] -> (expert ids [N, k], fp32 weights [N, k]).

    ``expert_bias`` is added to the scores to choose experts; weights are the chosen experts'
    unbiased scores (biased ones with ``bias_in_weights``), renormalised to sum to one if
    ``norm_topk_prob``, then scaled.
    """
    s = scores(options, logits)
    choice = s + expert_bias if expert_bias is not None else s
    mixed = choice if options.bias_in_weights else s
    if options.grouped:
        grouped = choice.view(logits.shape[0], options.n_group, -1)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep = group_score.topk(options.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_score).scatter_(1, keep, 1.0).bool()
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view_as(choice)
    expert_idx = choice.topk(options.top_k, dim=-1).indices
    weights = mixed.gather(1, expert_idx)
    if options.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return expert_idx, weights * options.routed_scaling_factor


def route(
    options: RouterOptions,
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_bias: torch.Tensor | None = None,
) -> Routing:
    """Tokens x [N, H] and the gate's weight [E, H] -> ``Routing`` (bias ignored unless enabled)."""
    logits = gate_logits(x, gate_weight)
    bias = expert_bias if options.expert_bias else None
    return Routing(logits, *select_experts(options, logits, bias))


def expert_counts(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert [E] (fp32), from the experts actually chosen."""
    return torch.bincount(expert_idx.reshape(-1), minlength=num_experts).float()


def score_distribution(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """Per-token distribution over experts [N, E]: softmax, or sigmoid scores normalised to sum
    to one (DeepSeek-V3's balance-loss convention), for the balance loss and router entropy."""
    if score_function == "softmax":
        return logits.softmax(dim=-1)
    s = logits.sigmoid()
    return s / (s.sum(-1, keepdim=True) + 1e-20)


def router_losses(
    router_logits,
    router_experts,
    token_mask: torch.Tensor | None = None,
    score_function: str = "softmax",
):
    """Switch load-balancing loss (1.0 at perfectly uniform load) and router z-loss, averaged
    over layers. The load term counts the experts each layer actually chose."""
    aux, z = [], []
    for logits, expert_idx in zip(router_logits, router_experts, strict=True):
        w = torch.ones(logits.shape[0], device=logits.device) if token_mask is None else token_mask
        denom = w.sum().clamp_min(1.0)
        chosen = torch.zeros_like(logits).scatter_(1, expert_idx, 1.0)
        load = (chosen * w[:, None]).sum(0) / (denom * expert_idx.shape[-1])
        importance = (score_distribution(logits, score_function) * w[:, None]).sum(0) / denom
        aux.append(logits.shape[-1] * (load * importance).sum())
        z.append((torch.logsumexp(logits, dim=-1).pow(2) * w).sum() / denom)
    return torch.stack(aux).mean(), torch.stack(z).mean()
