"""The building blocks both model families share (LLaDA-MoE in modeling.py, LLaDA2.x in llada2.py):
RMSNorm, rotate-half RoPE (optionally on the first ``rotary_dim`` dims of each head), attention over
a dense or block-sparse mask, the SwiGLU MLP and the stacked routed experts, whose ``state_dict``
speaks the published per-expert key names.

Knows nothing about training, parallelism or serving.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .grouped_mm import dispatch, grouped_mm, unsort, weighted_swiglu

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


def rope_cos_sin(config, position_ids: torch.Tensor, dtype: torch.dtype):
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
