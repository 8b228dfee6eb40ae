"""The masked-diffusion objective (LLaDA / MDLM) as pure functions of tensors.

Forward process: draw t ~ U(0, 1) per sequence (antithetic draws spread t over the batch), mask
each token independently with p = (1 - eps) t + eps. The model predicts every masked token from the
whole noisy sequence; CE on masked tokens weighted by 1/p upper-bounds the negative log-likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..config import AUTOREGRESSIVE, BLOCK_DIFFUSION, StrictModel, model_family
from .blocks import BlockObjectiveConfig, block_diffusion_loss, block_validation_nats
from .noise import forward_process, sample_mask_prob


class ObjectiveConfig(StrictModel):
    """Knobs of the training objective (defaults: the LLaDA / LLaDA-MoE recipe)."""

    eps: float = 1e-3  # smallest mask probability, keeps 1/p bounded
    antithetic: bool = True  # t_i = (u + i/B) mod 1: lower-variance loss estimates
    random_length_prob: float = 0.01  # share of pretraining batches cropped to a random length
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    z_loss_coef: float = 0.001  # router z-loss
    # MoE balance. aux_loss: the two terms above. expert_bias: LLaDA2's auxiliary-loss-free way,
    # after every optimizer step each MoE layer's expert bias (selection-only in LLaDA2) moves by
    # bias_update_rate towards under-loaded experts (sign of mean load - load); no aux/z terms.
    # none: neither (the expert bias stays as loaded: dFactory's LLaDA2 SFT); loads still logged.
    balance: Literal["aux_loss", "expert_bias", "none"] = "aux_loss"
    bias_update_rate: float = Field(1e-3, gt=0)
    # Block diffusion (LLaDA2.x models and conversion from an AR model); ignored by other families.
    block: BlockObjectiveConfig = BlockObjectiveConfig()
    # Block-size schedule of a conversion run: [[steps, block_length], ...] phases in order, e.g. a
    # warm-up ladder [[50, 1], [50, 4], [200, 32], [50, 8]]; the steps add up to train.max_steps.
    # Empty: block.block_length throughout.
    block_schedule: list[tuple[int, int]] = []

    def block_length_at(self, step: int) -> int:
        """Block length of optimizer step ``step`` (0-based) under ``block_schedule``."""
        done = 0
        for steps, length in self.block_schedule:
            done += steps
            if step < done:
                return length
        return self.block_schedule[-1][1] if self.block_schedule else self.block.block_length

    @property
    def router_loss_coefs(self) -> tuple[float, float]:
        """(aux, z) loss coefficients in effect: none unless ``balance`` is aux_loss."""
        if self.balance != "aux_loss":
            return 0.0, 0.0
        return self.aux_loss_coef, self.z_loss_coef


def random_length(length: int, prob: float, generator=None) -> int:
    """LLaDA's trick: with probability ``prob`` train on a random prefix length in [1, L]."""
    device = generator.device if generator is not None else None  # draw where the generator lives
    if prob > 0 and torch.rand(1, generator=generator, device=device).item() < prob:
        return int(torch.randint(1, length + 1, (1,), generator=generator, device=device).item())
    return length


def _masked_ce(logits, input_ids, masked):
    """CE at masked positions; ``logits`` is [B, L, V] or already gathered [M, V]."""
    if logits.dim() == 3:
        logits = logits[masked]
    if logits.shape[0] != int(masked.sum()):
        raise ValueError(f"logits cover {logits.shape[0]} positions but {int(masked.sum())} are masked")
    return F.cross_entropy(logits.float(), input_ids[masked], reduction="none")


def pretrain_loss(logits, input_ids, masked, p):
    """sum over masked tokens of CE / p, divided by B * L: the per-token NLL bound."""
    ce = _masked_ce(logits, input_ids, masked)
    weight = (1.0 / p)[:, None].expand_as(masked)[masked]
    return (ce * weight).sum() / masked.numel(), ce


def sft_loss(logits, input_ids, masked, p, response_mask):
    """Response-only: sum of CE / p over masked response tokens / response length, batch mean."""
    if bool((masked & ~response_mask.bool()).any()):
        raise ValueError("SFT masked a prompt token: pass maskable=response_mask to forward_process")
    ce = _masked_ce(logits, input_ids, masked)
    answer_len = response_mask.sum(1, keepdim=True).clamp_min(1).float()
    weight = (1.0 / (p[:, None] * answer_len)).expand_as(masked)[masked]
    return (ce * weight).sum() / input_ids.shape[0], ce


def crop_attention_mask(attention_mask, keep: int):
    """The mask for the first ``keep`` tokens: a 2-D key mask [B, L] or a 4-D mask [B, h, L, L]."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        return attention_mask[:, :, :keep, :keep]
    return attention_mask[:, :keep]


@dataclass
class LossTerms:
    total: torch.Tensor  # what backward() runs on
    diffusion: torch.Tensor  # the weighted diffusion loss (a bound on NLL per token)
    masked_ce: torch.Tensor  # plain mean CE over masked tokens (easier to read than the bound)
    num_masked: int
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


def diffusion_loss(
    model,
    input_ids: torch.Tensor,
    *,
    mask_id: int,
    objective: ObjectiveConfig | None = None,
    response_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> LossTerms:
    """One noisy forward + loss. Pretraining when ``response_mask`` is None, SFT otherwise.

    When the model exposes ``.model`` and ``.lm_head`` (LLaDAMoEModelLM), logits are computed only
    at masked positions: with a 157k vocabulary that is most of the head's cost saved.
    """
    obj = objective or ObjectiveConfig()
    b, length = input_ids.shape
    if response_mask is None:
        keep = random_length(length, obj.random_length_prob, generator)
        if keep < length:
            input_ids = input_ids[:, :keep]
            attention_mask = crop_attention_mask(attention_mask, keep)
    p = sample_mask_prob(b, obj.eps, obj.antithetic, generator, input_ids.device)
    # a 2-D key mask marks padding (never masked); a 4-D mask (documents) says who sees whom
    padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    maskable = response_mask if response_mask is not None else padding
    noisy, masked = forward_process(input_ids, mask_id, p, maskable, generator)
    aux_coef, z_coef = obj.router_loss_coefs
    want_router = aux_coef > 0 or z_coef > 0
    if hasattr(model, "lm_head") and hasattr(model, "model"):
        out = model.model(noisy, attention_mask=attention_mask, output_router_logits=want_router)
        logits = model.lm_head(out.last_hidden_state[masked])
    else:
        out = model(noisy, attention_mask=attention_mask, output_router_logits=want_router)
        logits = out.logits
    if response_mask is None:
        loss, ce = pretrain_loss(logits, input_ids, masked, p)
    else:
        loss, ce = sft_loss(logits, input_ids, masked, p, response_mask)
    total = loss
    if out.aux_loss is not None:
        total = total + aux_coef * out.aux_loss + z_coef * out.z_loss
    masked_ce = ce.mean() if ce.numel() else ce.sum()
    return LossTerms(total, loss, masked_ce, int(masked.sum()), out.aux_loss, out.z_loss)


def next_token_loss(
    model,
    input_ids: torch.Tensor,
    *,
    objective: ObjectiveConfig | None = None,
    response_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> LossTerms:
    """The autoregressive twin's objective (``config.causal``): mean next-token NLL, on response
    tokens only for SFT. Exact NLL per token, comparable to the diffusion bound above."""
    obj = objective or ObjectiveConfig()
    aux_coef, z_coef = obj.router_loss_coefs
    want_router = aux_coef > 0 or z_coef > 0
    out = model.model(input_ids, attention_mask=attention_mask, output_router_logits=want_router)
    scored = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    if response_mask is not None:
        scored = response_mask[:, 1:].bool()
    elif attention_mask is not None and attention_mask.dim() == 2:
        scored = attention_mask[:, 1:].bool()
    logits = model.lm_head(out.last_hidden_state[:, :-1][scored])
    ce = F.cross_entropy(logits.float(), input_ids[:, 1:][scored], reduction="none")
    loss = ce.mean() if ce.numel() else ce.sum()
    total = loss
    if out.aux_loss is not None:
        total = total + aux_coef * out.aux_loss + z_coef * out.z_loss
    return LossTerms(total, loss, loss.detach(), int(scored.sum()), out.aux_loss, out.z_loss)


def training_loss(model, input_ids, *, mask_id: int, block_length: int | None = None, **kwargs):
    """The model family's objective: masked diffusion (LLaDA-MoE), next-token loss (its causal AR
    twin) or block diffusion (LLaDA2.x: ``blocks.block_diffusion_loss`` with ``objective.block``,
    its block length replaced by ``block_length`` when given, e.g. from a conversion schedule).
    Block diffusion takes packed documents as ``document_ids`` instead of a 4-D ``attention_mask``."""
    family = model_family(model.config)
    document_ids = kwargs.pop("document_ids", None)
    if family == BLOCK_DIFFUSION:
        obj = kwargs.get("objective") or ObjectiveConfig()
        block = (
            obj.block if block_length is None else obj.block.model_copy(update={"block_length": block_length})
        )
        if kwargs.get("attention_mask") is not None:
            raise ValueError("block diffusion takes document_ids, not an attention_mask")
        aux_coef, z_coef = obj.router_loss_coefs
        return block_diffusion_loss(
            model,
            input_ids,
            mask_id=mask_id,
            objective=block,
            response_mask=kwargs.get("response_mask"),
            document_ids=document_ids,
            generator=kwargs.get("generator"),
            aux_loss_coef=aux_coef,
            z_loss_coef=z_coef,
        )
    if family == AUTOREGRESSIVE:
        kwargs.pop("generator", None)
        return next_token_loss(model, input_ids, **kwargs)
    return diffusion_loss(model, input_ids, mask_id=mask_id, **kwargs)


def scored_tokens(input_ids, response_mask=None, attention_mask=None) -> torch.Tensor:
    """Which tokens a validation loss scores [B, L]: the response (SFT), else every real token of
    a 2-D padding mask, else all of them (a 4-D document mask hides no token)."""
    if response_mask is not None:
        return response_mask.bool()
    if attention_mask is not None and attention_mask.dim() == 2:
        return attention_mask.bool()
    return torch.ones_like(input_ids, dtype=torch.bool)


def validation_loss_sum(
    model,
    input_ids: torch.Tensor,
    *,
    mask_id: int,
    response_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    draws: int = 1,
    objective: ObjectiveConfig | None = None,
) -> tuple[torch.Tensor, int]:
    """The one validation loss (training-time validation, jobs/evaluate.py, the benchmarks), as
    (nats summed over the batch's scored tokens, number of scored tokens). A split's loss per
    token is sum(nats) / sum(tokens) over all its batches and ranks: every scored token weighs
    the same, whatever its row's length (unlike the SFT training loss, which averages rows).

    Scored tokens: see ``scored_tokens``. For the diffusion model the nats are the masked-diffusion
    bound: for each of ``draws`` mask draws (p per row as in training, never a random-length crop),
    sum over masked scored tokens of CE / p, averaged over the draws; its expectation upper-bounds
    the NLL of the scored tokens. For the causal AR twin (``config.causal``) they are the exact
    next-token NLL of the scored tokens after position 0 (the first token has no context). For a
    block-diffusion model they are the block-diffusion bound (``blocks.block_validation_nats``).
    ``model`` is an LLaDAMoEModelLM (``.model`` + ``.lm_head``); call under ``torch.no_grad()``.
    """
    obj = objective or ObjectiveConfig()
    scored = scored_tokens(input_ids, response_mask, attention_mask)
    family = model_family(model.config)
    if family == BLOCK_DIFFUSION:
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("block-diffusion validation takes a 2-D padding mask (or none)")
        nats = block_validation_nats(
            model, input_ids, mask_id, scored, generator, draws, obj.eps, obj.block.attention
        )
        return nats, int(scored.sum())
    if family == AUTOREGRESSIVE:
        target = scored[:, 1:]
        out = model.model(input_ids, attention_mask=attention_mask, output_router_logits=False)
        logits = model.lm_head(out.last_hidden_state[:, :-1][target])
        nats = F.cross_entropy(logits.float(), input_ids[:, 1:][target], reduction="sum")
        return nats, int(target.sum())
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    nats = torch.zeros((), dtype=torch.float32, device=input_ids.device)
    for _ in range(draws):
        p = sample_mask_prob(input_ids.shape[0], obj.eps, obj.antithetic, generator, input_ids.device)
        noisy, masked = forward_process(input_ids, mask_id, p, scored, generator)
        out = model.model(noisy, attention_mask=attention_mask, output_router_logits=False)
        logits = model.lm_head(out.last_hidden_state[masked])
        ce = _masked_ce(logits, input_ids, masked)
        nats = nats + (ce / p[:, None].expand_as(masked)[masked]).sum()
    return nats / draws, int(scored.sum())
