"""The forward both families' backbones share (``run_backbone``): input checks, the attention mask
in every form callers give it (none, 2-D key padding, 4-D 0/1 or additive, a flex ``BlockMask``,
causal for an AR twin), RoPE, the decoder layers with an optional KV cache, router losses.

Knows nothing about training, parallelism or serving.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

from .layers import KVCache, LLaDAMoEOutput, rope_cos_sin
from .router import Routing, router_losses


def _check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(
            f"input_ids out of range: min {int(input_ids.min())}, max {int(input_ids.max())}, "
            f"vocab_size {vocab_size}"
        )


def build_attention_mask(attention_mask, b, n, past_len, causal, device):
    """Return a bool SDPA mask [B, 1, n, past_len + n] (True = attend), or None when nothing is masked.

    ``attention_mask`` may be a 2-D key mask [B, past_len + n] (1 = real token) or a 4-D mask
    [B, 1 or heads, n, past_len + n]: bool or 0/1 (1 = attend), or additive (0 = attend, -inf =
    blocked: the published LLaDA2 ``generate``'s convention; see ``_allowed``). Every query may
    always see itself, so a fully padded row never yields NaNs that could leak into other rows. A
    flex ``BlockMask`` over (n, past_len + n) is used as given (its mask_mod must let every query
    see itself).
    """
    total = past_len + n
    if isinstance(attention_mask, BlockMask):
        if causal or tuple(attention_mask.seq_lengths) != (n, total):
            raise ValueError(
                f"a BlockMask over {tuple(attention_mask.seq_lengths)} for a {'causal ' if causal else ''}"
                f"forward of {n} positions after {past_len} cached (expected ({n}, {total}), non-causal)"
            )
        return attention_mask
    mask = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            if tuple(attention_mask.shape) != (b, total):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({b}, {total}) "
                    "(batch, cached + input length)"
                )
            if bool(attention_mask.all()):
                attention_mask = None
            else:
                mask = attention_mask.bool()[:, None, None, :].expand(b, 1, n, total)
        elif attention_mask.dim() == 4:
            if attention_mask.shape[0] != b or tuple(attention_mask.shape[2:]) != (n, total):
                raise ValueError(
                    f"4-D attention_mask has shape {tuple(attention_mask.shape)}, expected ({b}, 1|heads, {n}, {total})"
                )
            mask = _allowed(attention_mask)
        else:
            raise ValueError(f"attention_mask must be 2-D or 4-D, got {attention_mask.dim()}-D")
    if causal:
        q = torch.arange(n, device=device)[:, None] + past_len
        tri = torch.arange(total, device=device)[None, :] <= q
        mask = tri[None, None] if mask is None else mask & tri
    if mask is None:
        return None
    self_pos = torch.zeros(n, total, dtype=torch.bool, device=device)
    self_pos[torch.arange(n), torch.arange(n) + past_len] = True
    return mask | self_pos


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D mask as bool (True = attend). Bool and 0/1 masks read as they are; a floating mask with
    no positive entry is additive, as the published LLaDA2 ``generate`` builds it (0 = attend,
    -inf or a large negative = blocked), so ``.bool()`` would invert it."""
    if not mask.is_floating_point():
        return mask.bool()
    if bool((mask > 0).any()):
        if bool((mask < 0).any()):
            raise ValueError(
                "4-D attention_mask mixes positive and negative values: give a 0/1 (or bool) mask, "
                "1 = may attend, or an additive one, 0 = may attend and -inf = blocked"
            )
        return mask > 0
    return mask == 0


def _token_mask(attention_mask, b, n, past_len):
    """[B*n] float weights of the input tokens that count for router losses (padding excluded)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    return attention_mask[:, past_len:].reshape(-1).float()


def run_backbone(
    backbone,
    embeddings: nn.Embedding,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_key_values: KVCache | None,
    use_cache: bool,
    output_router_logits: bool | None,
    unexpected: dict,
    causal: bool,
) -> LLaDAMoEOutput:
    """The forward both families' backbones share: embed, RoPE, mask, decoder layers (each
    returning (x, its (k, v), its Routing or None)), final norm, router losses on request.
    ``backbone`` provides ``config``, ``layers``, ``norm`` and ``gradient_checkpointing``."""
    cfg = backbone.config
    if unexpected:
        raise TypeError(f"unexpected forward arguments: {sorted(unexpected)}")
    _check_input_ids(input_ids, cfg.vocab_size)
    b, n = input_ids.shape
    past_len = past_key_values[0][0].shape[2] if past_key_values else 0
    if position_ids is None:
        position_ids = torch.arange(past_len, past_len + n, device=input_ids.device).expand(b, n)
    x = embeddings(input_ids)
    cos, sin = rope_cos_sin(cfg, position_ids, x.dtype)
    mask = build_attention_mask(attention_mask, b, n, past_len, causal, x.device)
    if mask is not None and not isinstance(mask, BlockMask):  # additive once for every layer: SDPA on CPU
        # runs about 2x faster than on bool
        mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, float("-inf"))
    want_router = cfg.output_router_logits if output_router_logits is None else output_router_logits

    new_cache: KVCache = []
    routings: list[Routing] = []
    for i, layer in enumerate(backbone.layers):
        past = past_key_values[i] if past_key_values else None
        if backbone.gradient_checkpointing and backbone.training:
            x, kv, routing = checkpoint(layer, x, cos, sin, mask, past, use_reentrant=False)
        else:
            x, kv, routing = layer(x, cos, sin, mask, past)
        if use_cache:
            new_cache.append(kv)
        if routing is not None:
            routings.append(routing)

    out = LLaDAMoEOutput(last_hidden_state=backbone.norm(x), past_key_values=new_cache if use_cache else None)
    if want_router and routings:
        token_mask = _token_mask(attention_mask, b, n, past_len)
        out.router_logits = tuple(r.logits for r in routings)
        out.router_experts = tuple(r.expert_idx for r in routings)
        out.aux_loss, out.z_loss = router_losses(
            out.router_logits, out.router_experts, token_mask, cfg.router_options().score_function
        )
    return out
