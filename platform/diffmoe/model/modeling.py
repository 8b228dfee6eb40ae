"""LLaDA-MoE: a bidirectional Mixture-of-Experts transformer for masked diffusion, in one file.

Semantics follow the published modeling code: pre-norm blocks with RMSNorm, per-head q/k RMSNorm
before rotate-half RoPE (optionally on a fraction of each head), bidirectional SDPA attention with
GQA, an fp32 softmax top-k router (model/router.py) whose weights are not renormalised, SwiGLU experts, optional
dense layers and shared expert, untied lm_head. Expert weights are stored stacked
([E, 2I, H] and [E, H, I]) so routed tokens run as grouped matmuls; the checkpoint boundary
(``state_dict`` / ``load_state_dict``) speaks the published per-expert key names. The blocks it
shares with LLaDA2.x are in layers.py, the shared forward in backbone.py.

This module knows nothing about training, parallelism or serving.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .backbone import run_backbone
from .configuration import LLaDAMoEConfig
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
from .published_io import PublishedLayoutIO
from .router import Routing, route


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
