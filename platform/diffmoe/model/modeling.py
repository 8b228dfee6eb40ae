"""LLaDA-MoE: a bidirectional Mixture-of-Experts transformer for masked diffusion, in one file.

Semantics follow the published modeling code: pre-norm blocks with RMSNorm, per-head q/k RMSNorm
before rotate-half RoPE (optionally on a fraction of each head), bidirectional SDPA attention with
GQA, an fp32 softmax top-k router (model/router.py) whose weights are not renormalised, SwiGLU experts, optional
dense layers and shared expert, untied lm_head. Expert weights are stored stacked
([E, 2I, H] and [E, H, I]) so routed tokens run as grouped matmuls; the checkpoint boundary
(``state_dict`` / ``load_state_dict``) speaks the published per-expert key names.

This module knows nothing about training, parallelism or serving.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from .configuration import LLaDAMoEConfig
from .grouped_mm import dispatch, grouped_mm, unsort, weighted_swiglu
from .published_io import PublishedLayoutIO
from .router import Routing, route, router_losses

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LLaDAMoEOutput:
    """``logits`` [B, L, V]; router terms only when ``output_router_logits`` (``router_experts``:
    each MoE layer's chosen expert ids [B*L, k], what the losses count); ``past_key_values``
    holds each layer's (k, v) for the *input* positions when ``use_cache``."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    router_experts: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_position_scale(config) -> float:
    """What positions are divided by: linear RoPE scaling's factor, else 1. Any other scaling type
    fails here, which each backbone calls when it is built (before weights load)."""
    scaling = config.rope_scaling_dict()
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if kind not in ("default", "linear"):
        raise NotImplementedError(f"rope_scaling type {kind!r} is not supported (default, linear)")
    return float(scaling["factor"]) if kind == "linear" else 1.0


def rope_cos_sin(config: LLaDAMoEConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos/sin [B, L, rot_dim] for rotate-half RoPE. Computed per call: no buffers to materialise."""
    rot_dim = int(config.head_dim * config.partial_rotary_factor) // 2 * 2
    positions, scale = position_ids.float(), rope_position_scale(config)
    if scale != 1.0:
        positions = positions / scale
    exponent = torch.arange(0, rot_dim, 2, device=position_ids.device, dtype=torch.float32) / rot_dim
    inv_freq = 1.0 / (config.rope_theta**exponent)
    freqs = positions[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, hd]; rotates the first cos.shape[-1] dims of each head, passes the rest."""
    rot_dim = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.config = config
        h, nh, nkv, hd = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.q_proj = nn.Linear(h, nh * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, nkv * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, nkv * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(nh * hd, h, bias=config.attention_bias)
        if config.qk_layernorm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_kv=None):
        cfg = self.config
        b, n, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, n, cfg.num_attention_heads, cfg.head_dim)
        k = k.view(b, n, cfg.num_key_value_heads, cfg.head_dim)
        v = v.view(b, n, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_layernorm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:  # after the q/k norms, as the published code clips
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        v = v.transpose(1, 2)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        new_kv = (k, v)
        k, v = with_past(past_kv, k, v)
        dropout = cfg.attention_dropout if self.training else 0.0
        out = attend(q, k, v, mask, dropout, cfg.num_key_value_heads != cfg.num_attention_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), new_kv


def with_past(past_kv, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys/values to attend to: the cached ones, then this call's. A (k, v) pair is
    concatenated (a copy); a cache with ``append_in_place`` (the serving engine's preallocated
    block cache) writes this call's into its buffer and returns views, so nothing is copied."""
    if past_kv is None:
        return k, v
    if hasattr(past_kv, "append_in_place"):
        return past_kv.append_in_place(k, v)
    return torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)


def attend(q, k, v, mask, dropout_p: float, gqa: bool) -> torch.Tensor:
    """Attention under a dense mask (SDPA), or under a ``BlockMask`` with flex attention: a
    block-sparse mask that is never materialised as [L, L], fused into one kernel on GPU."""
    if isinstance(mask, BlockMask):
        if dropout_p:
            raise ValueError("attention_dropout > 0 is not supported under a block-sparse (flex) mask")
        return _flex_attention(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


@functools.cache
def _flex_attention(compiled: bool):
    """Compiled on GPU (the fused kernel); eager elsewhere (a correct, unfused reference)."""
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


class SwiGLU(nn.Module):
    """Dense MLP and shared expert: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """All experts of one layer, stacked. ``state_dict`` shows them as ``{j}.{gate,up,down}_proj.weight``."""

    def __init__(self, num_experts: int, hidden: int, width: int):
        super().__init__()
        self.num_experts, self.width = num_experts, width
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, width))
        self.register_state_dict_post_hook(_split_expert_weights)
        self.register_load_state_dict_pre_hook(_stack_expert_weights)

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H]; expert_idx, weights [N, k] -> sum_j weights[:, j] * expert_{idx[:, j]}(x)."""
        n, k = expert_idx.shape
        flat = expert_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(flat, minlength=self.num_experts)
        h = grouped_mm(dispatch(x, order, inverse, k), self.gate_up_proj, counts)
        act = weighted_swiglu(h, weights.reshape(-1)[order].to(h.dtype))
        y_sorted = grouped_mm(act, self.down_proj, counts)
        return unsort(y_sorted, order, inverse).view(n, k, -1).sum(1)


def _split_expert_weights(module: Experts, state_dict, prefix, local_metadata):
    gate_up = state_dict.pop(prefix + "gate_up_proj")
    down = state_dict.pop(prefix + "down_proj")
    for j in range(module.num_experts):
        state_dict[f"{prefix}{j}.gate_proj.weight"] = gate_up[j, : module.width]
        state_dict[f"{prefix}{j}.up_proj.weight"] = gate_up[j, module.width :]
        state_dict[f"{prefix}{j}.down_proj.weight"] = down[j]


def _stack_expert_weights(module: Experts, state_dict, prefix, *args):
    if f"{prefix}0.gate_proj.weight" not in state_dict:
        return  # already stacked (e.g. a DeepSpeed or plain torch checkpoint of this module)
    names = [
        f"{prefix}{j}.{p}.weight"
        for j in range(module.num_experts)
        for p in ("gate_proj", "up_proj", "down_proj")
    ]
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} expert weights, e.g. {missing[:3]}")
    w = [state_dict.pop(n) for n in names]
    state_dict[prefix + "gate_up_proj"] = torch.stack(
        [torch.cat(w[i : i + 2], 0) for i in range(0, len(w), 3)]
    )
    state_dict[prefix + "down_proj"] = torch.stack(w[2::3])


class MoE(nn.Module):
    """Router (``gate``, optional ``expert_bias``) plus stacked experts."""

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.config = config
        self.router = config.router_options()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        self.experts = Experts(config.num_experts, config.hidden_size, config.expert_intermediate_size)

    def route(self, x: torch.Tensor) -> Routing:
        """x [N, H] -> Routing(fp32 router logits [N, E], expert ids [N, k], fp32 weights [N, k])."""
        return route(self.router, x, self.gate.weight, getattr(self, "expert_bias", None))

    def forward(self, x: torch.Tensor):
        b, n, h = x.shape
        flat = x.reshape(-1, h)
        routing = self.route(flat)
        return self.experts(flat, routing.expert_idx, routing.weights).view(b, n, h), routing


class DecoderLayer(nn.Module):
    def __init__(self, config: LLaDAMoEConfig, layer_idx: int):
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_moe:
            self.mlp = MoE(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.dense_intermediate_size)
        if config.shared_expert_intermediate_size and self.is_moe:  # MoE layers only, as published
            self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)

    def forward(self, x, cos, sin, mask, past_kv=None):
        attn_out, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_kv)
        x = x + attn_out
        h = self.post_attention_layernorm(x)
        routing = None
        if self.is_moe:
            mlp_out, routing = self.mlp(h)
        else:
            mlp_out = self.mlp(h)
        if hasattr(self, "shared_expert"):
            mlp_out = mlp_out + self.shared_expert(h)
        return x + mlp_out, new_kv, routing


class LLaDAMoEPreTrainedModel(PublishedLayoutIO, PreTrainedModel):
    config_class = LLaDAMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        with torch.no_grad():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, Experts):
                module.gate_up_proj.normal_(0.0, std)
                module.down_proj.normal_(0.0, std)
            elif isinstance(module, MoE) and hasattr(module, "expert_bias"):
                module.expert_bias.zero_()


class LLaDAMoEModel(LLaDAMoEPreTrainedModel):
    """The backbone: embeddings, decoder layers, final norm. Returns the last hidden state."""

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        rope_position_scale(config)  # an unsupported scaling type fails before weights load
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> LLaDAMoEOutput:
        return run_backbone(
            self,
            self.embed_tokens,
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            use_cache,
            output_router_logits,
            kwargs,
            causal=self.config.causal,
        )


class LLaDAMoEModelLM(LLaDAMoEPreTrainedModel):
    """Backbone + untied ``lm_head``; ``model(input_ids).logits`` is [B, L, V]."""

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        self.model = LLaDAMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> LLaDAMoEOutput:
        out = self.model(input_ids, attention_mask=attention_mask, **kwargs)
        out.logits = self.lm_head(out.last_hidden_state)
        return out


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
