"""LLaDA-MoE configuration with the published config.json field names, plus named sizes."""

from __future__ import annotations

import warnings
from typing import Any

from transformers import PretrainedConfig

from .router import RouterOptions

MASK_TOKEN_ID = 156895  # LLaDA-MoE's [MASK]
EOS_TOKEN_ID = 156892  # LLaDA-MoE's EOS, also used as pad


def rope_theta_of(rope_theta, rope_scaling, kwargs: dict, default: float) -> float:
    """``rope_theta`` as given, else the one a transformers-5 config.json keeps inside
    ``rope_parameters`` (or ``rope_scaling``), else the family's default."""
    if rope_theta is not None:
        return float(rope_theta)
    for params in (kwargs.get("rope_parameters"), rope_scaling):
        if isinstance(params, dict) and params.get("rope_theta") is not None:
            return float(params["rope_theta"])
    return default


class LLaDAMoEConfig(PretrainedConfig):
    """Hyper-parameters of a LLaDA-MoE masked-diffusion model.

    Field names follow the published ``config.json`` so a real download loads unchanged. Two
    additions of ours: ``mask_token_id`` (the [MASK] id the diffusion process uses) and ``causal``
    (a causal attention mask: the autoregressive twin used for honest comparisons).

    Kept only so the published config.json round-trips, read by no code here: ``use_cache``
    (callers pass ``use_cache`` per forward), ``bos_token_id`` (no BOS is ever inserted) and
    ``router_aux_loss_coef`` (the training objective's ``aux_loss_coef`` sets the coefficient).
    ``hidden_act`` and ``tie_word_embeddings`` are validated: only SwiGLU and an untied head exist.
    """

    model_type = "lladamoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        dense_intermediate_size: int = 8192,
        expert_intermediate_size: int = 1024,
        shared_expert_intermediate_size: int | None = None,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = False,
        pad_token_id: int | None = EOS_TOKEN_ID,
        bos_token_id: int | None = None,
        eos_token_id: int | None = EOS_TOKEN_ID,
        mask_token_id: int = MASK_TOKEN_ID,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,  # None: rope_parameters' (transformers 5 files), else 50000
        partial_rotary_factor: float = 1.0,
        rope_scaling: dict[str, Any] | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        clip_qkv: float | None = None,
        num_experts_per_tok: int = 8,
        num_experts: int = 64,
        output_router_logits: bool = False,
        router_aux_loss_coef: float = 0.01,
        norm_topk_prob: bool = False,
        qk_layernorm: bool = True,
        moe_layer_freq: list[int] | None = None,
        moe_router_enable_expert_bias: bool = False,
        moe_router_score_function: str = "softmax",
        routed_scaling_factor: float = 1.0,
        router_num_group: int | None = None,
        router_topk_group: int | None = None,
        causal: bool = False,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.dense_intermediate_size = dense_intermediate_size
        self.expert_intermediate_size = expert_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.mask_token_id = mask_token_id
        self.rope_theta = rope_theta_of(rope_theta, rope_scaling, kwargs, 50000.0)
        self.partial_rotary_factor = partial_rotary_factor
        if rope_scaling is not None:
            with warnings.catch_warnings():  # transformers 5 folds it into rope_parameters
                warnings.simplefilter("ignore", FutureWarning)
                self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.clip_qkv = clip_qkv
        self.num_experts_per_tok = num_experts_per_tok
        self.num_experts = num_experts
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        self.norm_topk_prob = norm_topk_prob
        self.qk_layernorm = qk_layernorm
        self.moe_layer_freq = list(moe_layer_freq) if moe_layer_freq is not None else [1] * num_hidden_layers
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.moe_router_score_function = moe_router_score_function
        self.routed_scaling_factor = routed_scaling_factor
        self.router_num_group = router_num_group
        self.router_topk_group = router_topk_group
        self.causal = causal
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_architecture()

    def validate_architecture(self) -> None:
        """Fail at construction with a message naming the field, not deep inside a forward pass."""
        problems = []
        if self.hidden_act != "silu":
            problems.append(f"hidden_act={self.hidden_act!r} (only 'silu' SwiGLU is supported)")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if len(self.moe_layer_freq) != self.num_hidden_layers:
            problems.append(
                f"moe_layer_freq has {len(self.moe_layer_freq)} entries, expected num_hidden_layers="
                f"{self.num_hidden_layers}"
            )
        if self.tie_word_embeddings:
            problems.append("tie_word_embeddings=True (LLaDA-MoE has an untied lm_head)")
        try:
            self.router_options()
        except ValueError as err:
            problems.append(str(err))
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            problems.append(f"partial_rotary_factor={self.partial_rotary_factor} not in (0, 1]")
        if not 0 <= self.mask_token_id < self.vocab_size:
            problems.append(f"mask_token_id={self.mask_token_id} outside vocab_size={self.vocab_size}")
        if problems:
            raise ValueError("invalid LLaDAMoEConfig: " + "; ".join(problems))

    def rope_scaling_dict(self) -> dict[str, Any]:
        """RoPE scaling settings wherever this transformers version keeps them ({} for none)."""
        for name in ("rope_parameters", "rope_scaling"):
            try:
                value = getattr(self, name)
            except AttributeError:
                continue
            if value:
                return dict(value)
        return {}

    @property
    def family(self) -> str:
        """How this model trains and decodes (``diffmoe.config.model_family``)."""
        return "autoregressive" if self.causal else "masked_diffusion"

    def router_options(self) -> RouterOptions:
        """The router settings under this family's published field names. The published class's
        defaults (score function null, groups -2) mean what its code does: softmax, one group."""
        n_group = self.router_num_group if (self.router_num_group or 0) > 0 else 1
        topk_group = self.router_topk_group if (self.router_topk_group or 0) > 0 else n_group
        return RouterOptions(
            num_experts=self.num_experts,
            top_k=self.num_experts_per_tok,
            score_function=self.moe_router_score_function or "softmax",
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
            expert_bias=self.moe_router_enable_expert_bias,
            bias_in_weights=True,  # the published code adds the bias to the probabilities it mixes
        )

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.moe_layer_freq[layer_idx])


class LLaDAConfig(LLaDAMoEConfig):
    """Same config under the ``model_type`` "llada" used by the published checkpoint's config.json."""

    model_type = "llada"

    def __init__(self, **kwargs: Any):  # defined here so transformers keeps our __init__
        super().__init__(**kwargs)


# Named sizes. ``tiny`` trains on a laptop CPU in seconds; ``llada-moe-7b-a1b`` is the published model.
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        dense_intermediate_size=256,
        expert_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_experts=8,
        num_experts_per_tok=2,
        rope_theta=10000.0,
        pad_token_id=2,
        eos_token_id=2,
        mask_token_id=1,
    ),
    "small": dict(
        vocab_size=8192,
        hidden_size=256,
        dense_intermediate_size=1024,
        expert_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        num_experts=16,
        num_experts_per_tok=4,
        rope_theta=10000.0,
        pad_token_id=2,
        eos_token_id=2,
        mask_token_id=1,
    ),
    "llada-moe-7b-a1b": dict(
        vocab_size=157184,
        hidden_size=2048,
        dense_intermediate_size=8192,
        expert_intermediate_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=128,
        max_position_embeddings=8192,
        num_experts=64,
        num_experts_per_tok=8,
        rope_theta=50000.0,
        qk_layernorm=True,
        norm_topk_prob=False,
        pad_token_id=EOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        mask_token_id=MASK_TOKEN_ID,
    ),
}


def named_config(name: str, **overrides: Any) -> LLaDAMoEConfig:
    """Build a named size, e.g. ``named_config("tiny", vocab_size=512)``."""
    if name not in NAMED_CONFIGS:
        raise KeyError(f"unknown model config {name!r}; choose one of {sorted(NAMED_CONFIGS)}")
    return LLaDAMoEConfig(**{**NAMED_CONFIGS[name], **overrides})
