"""The block-diffusion objective (LLaDA2.x) and confidence-aware parallel (CAP) training, as pure
functions of tensors.

One forward sees the noisy copy and the clean sequence side by side, ``[x_t ; x_0]`` (length 2L,
positions 0..L-1 twice), under LLaDA2's three-part mask:

- noisy -> noisy: block-diagonal (a noisy block sees itself, bidirectionally);
- noisy -> clean: strictly earlier clean blocks (the exact prefix a decoder has when it decodes
  that block);
- clean -> clean: block-causal; clean never sees noisy.

So every block is trained in the condition it is decoded in, all blocks in one pass. Packed rows
keep to their documents (``document_ids``: no attention across documents). The loss is on masked
positions of the noisy half, either the LLaDA ELBO (CE / p summed, divided by the scored tokens) or
the dFactory-style mean CE per masked token (``weighting``). CAP adds ``confidence_beta`` times the
mean entropy of the prediction at masked positions the model already gets right, which sharpens
those predictions so that more of them clear a decoding threshold (more tokens per forward).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import StrictModel
from .noise import forward_process, sample_mask_prob


class BlockObjectiveConfig(StrictModel):
    """Knobs of block-diffusion training (defaults: SFT in the LLaDA2 recipe's spirit)."""

    block_length: int = 32
    t_min: float = 0.001  # mask probability drawn per row from U(t_min, t_max); SFT often 0.3..0.8
    t_max: float = 1.0
    # token_mean: plain mean CE over masked tokens (dFactory); elbo: CE / p (the LLaDA bound). With p
    # down to t_min the elbo's rare 1/p weights dominate the gradient: from scratch on the sort task
    # (bench_ar_to_diffusion) token_mean reached 0.97 exact match in 500 steps, elbo 0.82.
    weighting: Literal["elbo", "token_mean"] = "token_mean"
    confidence_beta: float = 0.0  # CAP: weight of the entropy term on correctly predicted masked tokens
    # dense: a [B, 1, 2L, 2L] mask through SDPA; flex: a block-sparse BlockMask through flex attention
    # (never materialised; compiled into one kernel on GPU); auto: flex on GPU, dense elsewhere.
    attention: Literal["auto", "dense", "flex"] = "auto"


def block_diffusion_mask(
    length: int, block_length: int, document_ids: torch.Tensor | None = None, device=None
):
    """Bool [B or 1, 1, 2L, 2L]: who may attend to whom in ``[x_t ; x_0]`` (see the module docstring).
    ``document_ids`` [B, L] additionally keeps every position inside its own document."""
    if block_length < 1:
        raise ValueError(f"block_length={block_length} must be >= 1")
    block = torch.arange(length, device=device) // block_length
    q, k = block[:, None], block[None, :]
    noisy_noisy = q == k
    noisy_clean = k < q
    clean_clean = k <= q
    none = torch.zeros(length, length, dtype=torch.bool, device=device)
    mask = torch.cat([torch.cat([noisy_noisy, noisy_clean], 1), torch.cat([none, clean_clean], 1)], 0)[
        None, None
    ]
    if document_ids is not None:
        doc = torch.cat([document_ids, document_ids], 1)
        mask = mask & (doc[:, None, :, None] == doc[:, None, None, :])
    return mask


def block_diffusion_block_mask(
    length: int, block_length: int, document_ids: torch.Tensor | None = None, device=None
):
    """The same mask as ``block_diffusion_mask``, as a flex-attention ``BlockMask``: only which
    (128 x 128) tiles are full, partial or empty is stored, plus the rule for the partial ones."""
    from torch.nn.attention.flex_attention import create_block_mask

    if block_length < 1:
        raise ValueError(f"block_length={block_length} must be >= 1")

    def may_attend(b, h, q, k):
        q_clean, k_clean = q >= length, k >= length
        qb, kb = (q % length) // block_length, (k % length) // block_length
        allowed = torch.where(q_clean, k_clean & (kb <= qb), torch.where(k_clean, kb < qb, kb == qb))
        if document_ids is not None:
            allowed = allowed & (document_ids[b, q % length] == document_ids[b, k % length])
        return allowed

    device = device if device is not None else "cpu"
    rows = 1 if document_ids is None else document_ids.shape[0]
    compiled = torch.device(device).type == "cuda"  # builds the tiles without an [2L, 2L] grid
    return create_block_mask(may_attend, rows, None, 2 * length, 2 * length, device=device, _compile=compiled)


def use_flex(attention: str, device) -> bool:
    """``attention`` (auto | dense | flex) resolved for tensors on ``device``."""
    return attention == "flex" or (attention == "auto" and torch.device(device).type == "cuda")


def _two_half_mask(length, block_length, document_ids, device, attention: str, batch: int):
    flex = use_flex(attention, device)
    if document_ids is None:  # the same mask every micro-batch: built once
        mask = _mask_without_documents(length, block_length, str(torch.device(device)), flex)
    elif flex:
        mask = block_diffusion_block_mask(length, block_length, document_ids, device)
    else:
        mask = block_diffusion_mask(length, block_length, document_ids, device)
    return mask if flex else mask.expand(batch, -1, -1, -1)


@functools.lru_cache(maxsize=16)
def _mask_without_documents(length: int, block_length: int, device: str, flex: bool):
    """Shared, never written to: SDPA and flex attention only read their masks."""
    build = block_diffusion_block_mask if flex else block_diffusion_mask
    return build(length, block_length, None, device)


@dataclass
class BlockLossTerms:
    total: torch.Tensor  # what backward() runs on
    diffusion: torch.Tensor  # the weighted block-diffusion loss
    masked_ce: torch.Tensor  # plain mean CE over masked tokens
    confidence: torch.Tensor  # CAP entropy term (before confidence_beta); 0 when nothing is right
    num_masked: int
    aux_loss: torch.Tensor | None = None  # router losses when requested (aux_loss_coef / z_loss_coef)
    z_loss: torch.Tensor | None = None


def block_diffusion_loss(
    model,
    input_ids: torch.Tensor,
    *,
    mask_id: int,
    objective: BlockObjectiveConfig | None = None,
    response_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    aux_loss_coef: float = 0.0,
    z_loss_coef: float = 0.0,
) -> BlockLossTerms:
    """One forward over ``[x_t ; x_0]`` and the loss on the noisy half's masked tokens. SFT when
    ``response_mask`` is given: the prompt is never masked and only the response is scored. With
    router loss coefficients > 0 the MoE load-balancing and z-losses (over all 2L tokens) are added.
    A model with ``.model`` + ``.lm_head`` gets the head only at masked positions (most of a large
    vocabulary's cost)."""
    obj = objective or BlockObjectiveConfig()
    if not 0 < obj.t_min <= obj.t_max <= 1:
        raise ValueError(f"need 0 < t_min <= t_max <= 1 (t_min={obj.t_min}, t_max={obj.t_max})")
    b, length = input_ids.shape
    u = torch.rand(b, generator=generator, device=input_ids.device)
    p = obj.t_min + (obj.t_max - obj.t_min) * u
    noisy, masked = forward_process(input_ids, mask_id, p, response_mask, generator)
    ids = torch.cat([noisy, input_ids], 1)
    positions = torch.arange(length, device=input_ids.device).repeat(2)[None].expand(b, -1)
    mask = _two_half_mask(length, obj.block_length, document_ids, input_ids.device, obj.attention, b)
    want_router = aux_loss_coef > 0 or z_loss_coef > 0
    kwargs = dict(attention_mask=mask, position_ids=positions)
    if hasattr(model, "lm_head") and hasattr(model, "model"):
        out = model.model(ids, output_router_logits=want_router, **kwargs)
        logits = model.lm_head(out.last_hidden_state[:, :length][masked]).float()
    else:
        out = model(ids, output_router_logits=want_router, **kwargs)
        logits = out.logits[:, :length][masked].float()
    targets = input_ids[masked]
    ce = F.cross_entropy(logits, targets, reduction="none")
    scored = response_mask.sum() if response_mask is not None else torch.tensor(masked.numel())
    if obj.weighting == "elbo":
        weight = (1.0 / p)[:, None].expand_as(masked)[masked]
        loss = (ce * weight).sum() / scored.clamp_min(1).to(ce.dtype)
    else:
        loss = ce.mean() if ce.numel() else ce.sum()
    right = logits.argmax(-1) == targets
    if bool(right.any()):
        logp = logits[right].log_softmax(-1)
        confidence = -(logp.exp() * logp).sum(-1).mean()
    else:
        confidence = logits.sum() * 0.0
    total = loss + obj.confidence_beta * confidence if obj.confidence_beta else loss
    aux = getattr(out, "aux_loss", None)
    if want_router and aux is not None:
        total = total + aux_loss_coef * aux + z_loss_coef * out.z_loss
    masked_ce = ce.mean() if ce.numel() else ce.sum()
    return BlockLossTerms(
        total, loss, masked_ce, confidence, int(masked.sum()), aux, getattr(out, "z_loss", None)
    )


def block_validation_nats(
    model,
    input_ids,
    mask_id: int,
    scored,
    generator=None,
    draws: int = 1,
    eps: float = 1e-3,
    attention: str = "auto",
):
    """Validation nats of a block-diffusion model: per draw, p per row as in masked diffusion
    (never a crop), scored tokens masked with p in the noisy half of ``[x_t ; x_0]``, and the sum of
    CE / p over them, averaged over ``draws``. Each block's term bounds its NLL given the clean
    blocks before it, so the sum upper-bounds the NLL of the scored tokens. Block length: the
    model config's ``block_length`` if it has one, else 32 (LLaDA2's)."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    b, length = input_ids.shape
    block_length = int(getattr(model.config, "block_length", 32) or 32)
    mask = _two_half_mask(length, block_length, None, input_ids.device, attention, b)
    positions = torch.arange(length, device=input_ids.device).repeat(2)[None].expand(b, -1)
    nats = torch.zeros((), dtype=torch.float32, device=input_ids.device)
    for _ in range(draws):
        p = sample_mask_prob(b, eps, True, generator, input_ids.device)
        noisy, masked = forward_process(input_ids, mask_id, p, scored, generator)
        out = model(torch.cat([noisy, input_ids], 1), attention_mask=mask, position_ids=positions)
        ce = F.cross_entropy(out.logits[:, :length][masked].float(), input_ids[masked], reduction="none")
        nats = nats + (ce / p[:, None].expand_as(masked)[masked]).sum()
    return nats / draws
