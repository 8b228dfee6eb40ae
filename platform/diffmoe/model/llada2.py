"""LLaDA2.x: a block-diffusion Mixture-of-Experts transformer (LLaDA2.0-mini/-flash, LLaDA2.1).

Semantics follow the published model: pre-norm RMSNorm blocks; one fused ``query_key_value``
projection split into q, k, v heads; per-head q/k RMSNorm before rotate-half RoPE on the first
``rotary_dim`` dims of each head; GQA SDPA attention that is bidirectional without a mask and
honours a 4-D [B, 1, L, L] block mask, 0/1 or additive as the published generate builds it
(or a 2-D padding mask); dense SwiGLU in the first ``first_k_dense_replace`` layers, then the
shared router (model/router.py: sigmoid fp32 scores, selection-only expert bias, group-limited
top-k, renormalised and scaled weights) over grouped-matmul experts (``Experts``) plus shared
experts. Module names *are* the published state-dict keys (``model.word_embeddings``,
``attention.query_key_value``, ``mlp.gate.weight``, ``mlp.gate.expert_bias``, ``mlp.experts.{j}.*``,
``mlp.shared_experts.*``), so checkpoint I/O needs no renaming. An optional per-layer KV cache
works as in the LLaDA-MoE model.

This module knows nothing about training, parallelism, decoding or serving.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .backbone import run_backbone
from .layers import (
    Experts,
    KVCache,
    LLaDAMoEOutput,
    RMSNorm,
    SwiGLU,
    apply_rope,
    attend,
    rope_position_scale,
    with_past,
)
from .llada2_configuration import LLaDA2MoeConfig
from .published_io import PublishedLayoutIO
from .router import Routing, route


class LLaDA2Attention(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.config = config
        h, nh, nkv, hd = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.query_key_value = nn.Linear(h, (nh + 2 * nkv) * hd, bias=config.use_qkv_bias)
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(hd, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(hd, config.rms_norm_eps)
        self.dense = nn.Linear(nh * hd, h, bias=config.use_bias)

    def forward(self, x, cos, sin, mask, past_kv=None):
        cfg = self.config
        b, n, _ = x.shape
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        qkv = self.query_key_value(x).view(b, n, nh + 2 * nkv, cfg.head_dim)
        q, k, v = qkv.split([nh, nkv, nkv], dim=2)
        if cfg.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        new_kv = (k, v)
        k, v = with_past(past_kv, k, v)
        out = attend(q, k, v, mask, cfg.attention_dropout if self.training else 0.0, nkv != nh)
        return self.dense(out.transpose(1, 2).reshape(b, n, -1)), new_kv


class LLaDA2Gate(nn.Module):
    """Router weight [E, H] and, when enabled, the ``expert_bias`` buffer (selection only)."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.router = config.router_options()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        return route(self.router, x, self.weight, getattr(self, "expert_bias", None))


class LLaDA2SparseMoe(nn.Module):
    """Gate, stacked routed experts and (optionally) the always-on shared experts."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.gate = LLaDA2Gate(config)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        if config.num_shared_experts:
            width = config.moe_intermediate_size * config.num_shared_experts
            self.shared_experts = SwiGLU(config.hidden_size, width)

    def forward(self, x: torch.Tensor):
        b, n, h = x.shape
        flat = x.reshape(-1, h)
        routing = self.gate(flat)
        y = self.experts(flat, routing.expert_idx, routing.weights)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(flat)
        return y.view(b, n, h), routing


class LLaDA2DecoderLayer(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = LLaDA2Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_moe:
            self.mlp = LLaDA2SparseMoe(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask, past_kv=None):
        attn_out, new_kv = self.attention(self.input_layernorm(x), cos, sin, mask, past_kv)
        x = x + attn_out
        h = self.post_attention_layernorm(x)
        routing = None
        if self.is_moe:
            mlp_out, routing = self.mlp(h)
        else:
            mlp_out = self.mlp(h)
        return x + mlp_out, new_kv, routing


class LLaDA2MoePreTrainedModel(PublishedLayoutIO, PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDA2DecoderLayer"]
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
            elif isinstance(module, LLaDA2Gate):
                module.weight.normal_(0.0, std)
                if hasattr(module, "expert_bias"):
                    module.expert_bias.zero_()


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    """The backbone: word embeddings, decoder layers, final norm. Returns the last hidden state."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        rope_position_scale(config)  # an unsupported scaling type fails before weights load
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDA2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

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
        """``attention_mask``: None (bidirectional), a 2-D key mask [B, cached + L] or a 4-D mask
        [B, 1, L, cached + L]: bool or 0/1 (1 = may attend), or additive as the published generate
        builds it (0 = may attend, -inf = blocked). ``past_key_values``: per layer the
        (k, v) of earlier positions; ``use_cache`` returns those of this call's positions."""
        return run_backbone(
            self,
            self.word_embeddings,
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            use_cache,
            output_router_logits,
            kwargs,
            causal=False,
        )


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel):
    """Backbone + untied ``lm_head``; ``model(input_ids).logits`` is [B, L, V]."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> LLaDAMoEOutput:
        out = self.model(input_ids, attention_mask=attention_mask, **kwargs)
        out.logits = self.lm_head(out.last_hidden_state)
        return out
