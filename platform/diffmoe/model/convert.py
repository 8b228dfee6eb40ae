"""LLaDA-MoE weights -> the LLaDA2.x layout: how a causal (AR) twin becomes a block-diffusion model.

LLaDA2.0 was made by continuing an autoregressive MoE model's training under the block-diffusion
objective. The platform's AR twin is a LLaDA-MoE network with a causal mask, and every LLaDA-MoE
network is a special case of the LLaDA2 architecture: separate q/k/v projections concatenate into
the fused ``query_key_value``, per-head q/k norms and the router carry over by name, the softmax
score function and no group limit are LLaDA2 router settings, and the shared expert becomes
``shared_experts`` when its width is a whole number of experts. So the converted model computes the
same function as the source run bidirectionally (tests/test_convert.py), and conversion only
changes which attention mask training and decoding use. Checks run before any weight is touched.
"""

from __future__ import annotations

import torch

from .configuration import LLaDAMoEConfig
from .llada2_configuration import LLaDA2MoeConfig


def llada2_config_from(source: LLaDAMoEConfig, **overrides) -> LLaDA2MoeConfig:
    """The LLaDA2 config computing ``source``'s function; raises ValueError naming what cannot map."""
    problems = []
    freq = list(source.moe_layer_freq)
    dense = next((i for i, f in enumerate(freq) if f), len(freq))
    if any(not f for f in freq[dense:]):
        problems.append(f"moe_layer_freq={freq}: LLaDA2 has dense layers only before the first MoE layer")
    shared = source.shared_expert_intermediate_size or 0
    if shared and shared % source.expert_intermediate_size:
        problems.append(
            f"shared_expert_intermediate_size={shared} is not a multiple of "
            f"expert_intermediate_size={source.expert_intermediate_size}"
        )
    if shared and dense:
        problems.append("a shared expert beside dense layers (LLaDA2 adds shared experts in MoE layers only)")
    if source.clip_qkv is not None:
        problems.append(f"clip_qkv={source.clip_qkv} (LLaDA2 does not clip q/k/v)")
    if source.norm_topk_prob and source.num_experts_per_tok == 1:
        problems.append("norm_topk_prob with one expert per token (LLaDA2 renormalises only when k > 1)")
    if problems:
        raise ValueError("cannot convert this LLaDA-MoE model to LLaDA2: " + "; ".join(problems))
    options = source.router_options()
    fields = dict(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.dense_intermediate_size,
        moe_intermediate_size=source.expert_intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        head_dim=source.head_dim,
        num_experts=source.num_experts,
        num_shared_experts=shared // source.expert_intermediate_size,
        num_experts_per_tok=source.num_experts_per_tok,
        n_group=options.n_group,
        topk_group=options.topk_group,
        routed_scaling_factor=options.routed_scaling_factor,
        first_k_dense_replace=dense,
        score_function=options.score_function,
        moe_router_enable_expert_bias=True,  # zeros: same function; aux-free balancing updates it
        norm_topk_prob=options.norm_topk_prob,
        use_qkv_bias=source.attention_bias,
        use_bias=source.attention_bias,
        use_qk_norm=source.qk_layernorm,
        rms_norm_eps=source.rms_norm_eps,
        partial_rotary_factor=source.partial_rotary_factor,
        rotary_dim=int(source.head_dim * source.partial_rotary_factor),
        rope_theta=source.rope_theta,
        rope_scaling=source.rope_scaling_dict() or None,
        max_position_embeddings=source.max_position_embeddings,
        initializer_range=source.initializer_range,
        pad_token_id=source.pad_token_id,
        eos_token_id=source.eos_token_id,
        mask_token_id=source.mask_token_id,
    )
    return LLaDA2MoeConfig(**{**fields, **overrides})


_RENAMES = (
    ("model.embed_tokens.", "model.word_embeddings."),
    (".self_attn.o_proj.", ".attention.dense."),
    (".self_attn.q_norm.", ".attention.query_layernorm."),
    (".self_attn.k_norm.", ".attention.key_layernorm."),
    (".mlp.expert_bias", ".mlp.gate.expert_bias"),
    (".shared_expert.", ".mlp.shared_experts."),
)


def llada2_state_from(
    source: dict[str, torch.Tensor], num_experts: int | None = None
) -> dict[str, torch.Tensor]:
    """A published LLaDA-MoE state dict in the published LLaDA2 key layout (tensors shared, not
    copied, except the concatenated q/k/v). ``num_experts`` adds the zero ``expert_bias`` buffers
    LLaDA2 keeps per MoE layer when the source had none; a nonzero source bias is refused (the two
    families mix with it differently)."""
    biased = [k for k, v in source.items() if k.endswith(".mlp.expert_bias") and bool(v.any())]
    if biased:
        raise ValueError(
            f"cannot convert {biased[0]} (nonzero): LLaDA-MoE mixes experts with its expert bias added, "
            "LLaDA2 only selects with it, so the converted model would compute another function"
        )
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in source.items():
        for part in ("q_proj", "k_proj", "v_proj"):
            marker = f".self_attn.{part}."
            if marker in key:
                prefix, tail = key.split(marker)
                qkv.setdefault(f"{prefix}.attention.query_key_value.{tail}", {})[part] = value
                break
        else:
            for old, new in _RENAMES:
                key = key.replace(old, new)
            out[key] = value
    for key, parts in qkv.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise ValueError(f"{key}: the source lacks {sorted({'q_proj', 'k_proj', 'v_proj'} - set(parts))}")
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], 0)
    if num_experts:
        for key in [k for k in out if k.endswith(".mlp.gate.weight")]:
            bias = key.replace(".mlp.gate.weight", ".mlp.gate.expert_bias")
            out.setdefault(bias, torch.zeros(num_experts, dtype=torch.float32))
    return out
