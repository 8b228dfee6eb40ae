"""LLaDA2.x (LLaDA2.0-mini/-flash, LLaDA2.1) configuration with the published config.json field
names, plus named sizes. A real download's config.json loads unchanged; unknown fields are kept."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from .configuration import LLaDAMoEConfig, rope_theta_of
from .router import RouterOptions

MASK_TOKEN_ID = 156895  # <|mask|>: not in the published config.json, a family default
EOS_TOKEN_ID = 156892  # <|endoftext|>, also the published pad_token_id
MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"


class LLaDA2MoeConfig(PretrainedConfig):
    """Hyper-parameters of a LLaDA2.x block-diffusion MoE model.

    Semantics of the router fields: sigmoid (``score_function``) scores in fp32 (``router_dtype``),
    ``expert_bias`` for selection only (``moe_router_enable_expert_bias``), ``n_group`` groups of
    which the best ``topk_group`` are searched, chosen scores renormalised (``norm_topk_prob``, as
    published only when k > 1) and scaled by ``routed_scaling_factor``. The first
    ``first_k_dense_replace`` layers are dense SwiGLU of width ``intermediate_size``. RoPE rotates
    the first ``rotary_dim = head_dim * partial_rotary_factor`` dims of each head.
    ``mask_token_id`` is ours: the published config.json has only ``pad_token_id``, so loading a
    directory takes the mask and EOS ids from its tokenizer files, else the family defaults. Published
    knobs the released model leaves off (sliding_window, norm_head, embedding_dropout, ...) are
    accepted and kept as plain attributes; ``use_cache`` and ``bos_token_id`` only round-trip.
    """

    model_type = "llada2_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        intermediate_size: int = 5120,
        moe_intermediate_size: int = 512,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = 4,
        head_dim: int | None = 128,
        hidden_act: str = "silu",
        num_experts: int = 256,
        num_shared_experts: int | None = 1,
        num_experts_per_tok: int = 8,
        n_group: int | None = 8,
        topk_group: int | None = 4,
        routed_scaling_factor: float = 2.5,
        first_k_dense_replace: int = 1,
        score_function: str = "sigmoid",
        router_dtype: str | None = "fp32",
        moe_router_enable_expert_bias: bool = True,
        norm_topk_prob: bool = True,
        use_qkv_bias: bool = False,
        use_bias: bool = False,
        use_qk_norm: bool = True,
        use_rmsnorm: bool = True,
        rms_norm_eps: float = 1e-6,
        partial_rotary_factor: float = 0.5,
        rotary_dim: int | None = None,
        rope_theta: float | None = None,  # None: rope_parameters' (transformers 5 files), else 600000
        rope_scaling: dict[str, Any] | None = None,
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        attention_dropout: float = 0.0,
        output_router_logits: bool = False,
        use_cache: bool = False,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = EOS_TOKEN_ID,
        bos_token_id: int | None = None,
        eos_token_id: int | None = EOS_TOKEN_ID,
        mask_token_id: int = MASK_TOKEN_ID,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts or 0
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group = n_group or 1
        self.topk_group = topk_group or self.n_group
        self.routed_scaling_factor = routed_scaling_factor
        self.first_k_dense_replace = first_k_dense_replace
        self.score_function = score_function
        self.router_dtype = router_dtype
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.norm_topk_prob = norm_topk_prob
        self.use_qkv_bias = use_qkv_bias
        self.use_bias = use_bias
        self.use_qk_norm = use_qk_norm
        self.use_rmsnorm = use_rmsnorm
        self.rms_norm_eps = rms_norm_eps
        self.partial_rotary_factor = partial_rotary_factor
        self.rotary_dim = rotary_dim if rotary_dim is not None else int(self.head_dim * partial_rotary_factor)
        self.rope_theta = rope_theta_of(rope_theta, rope_scaling, kwargs, 600000.0)
        if rope_scaling is not None:
            with warnings.catch_warnings():  # transformers 5 folds it into rope_parameters
                warnings.simplefilter("ignore", FutureWarning)
                self.rope_scaling = rope_scaling
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.attention_dropout = attention_dropout
        self.output_router_logits = output_router_logits
        self.use_cache = use_cache
        self.mask_token_id = mask_token_id
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
        if not self.use_rmsnorm:
            problems.append("use_rmsnorm=False (only RMSNorm is supported)")
        if self.router_dtype not in (None, "fp32", "float32"):
            problems.append(f"router_dtype={self.router_dtype!r} (the router always runs in fp32)")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            problems.append(
                f"first_k_dense_replace={self.first_k_dense_replace} not in [0, num_hidden_layers]"
            )
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            problems.append(f"partial_rotary_factor={self.partial_rotary_factor} not in (0, 1]")
        elif self.rotary_dim != int(self.head_dim * self.partial_rotary_factor) or self.rotary_dim % 2:
            problems.append(
                f"rotary_dim={self.rotary_dim} must be even and equal head_dim * partial_rotary_factor "
                f"= {int(self.head_dim * self.partial_rotary_factor)}"
            )
        if self.tie_word_embeddings:
            problems.append("tie_word_embeddings=True (LLaDA2 has an untied lm_head)")
        if not 0 <= self.mask_token_id < self.vocab_size:
            problems.append(f"mask_token_id={self.mask_token_id} outside vocab_size={self.vocab_size}")
        try:
            self.router_options()
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise ValueError("invalid LLaDA2MoeConfig: " + "; ".join(problems))

    @property
    def family(self) -> str:
        """How this model trains and decodes (``diffmoe.config.model_family``): block diffusion."""
        return "block_diffusion"

    def router_options(self) -> RouterOptions:
        return RouterOptions(
            num_experts=self.num_experts,
            top_k=self.num_experts_per_tok,
            score_function=self.score_function,
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob and self.num_experts_per_tok > 1,
            routed_scaling_factor=self.routed_scaling_factor,
            expert_bias=self.moe_router_enable_expert_bias,
        )

    rope_scaling_dict = LLaDAMoEConfig.rope_scaling_dict

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace


def token_ids_from_tokenizer(directory: Path) -> dict[str, int]:
    """The published config.json has no mask or EOS id: read them from the download's tokenizer
    files (tokenizer_config.json ``added_tokens_decoder`` / ``eos_token``, tokenizer.json
    ``added_tokens``). Returns the ids found, as config fields; absent ones keep family defaults."""
    ids: dict[str, int] = {}
    eos_name = EOS_TOKEN
    tok_config = directory / "tokenizer_config.json"
    if tok_config.is_file():
        data = json.loads(tok_config.read_text())
        eos = data.get("eos_token")
        eos_name = (eos.get("content") if isinstance(eos, dict) else eos) or EOS_TOKEN
        for token_id, token in data.get("added_tokens_decoder", {}).items():
            ids.setdefault(token.get("content"), int(token_id))
    tok_file = directory / "tokenizer.json"
    if tok_file.is_file():
        for token in json.loads(tok_file.read_text()).get("added_tokens", []):
            ids.setdefault(token.get("content"), int(token["id"]))
    names = {"mask_token_id": MASK_TOKEN, "eos_token_id": eos_name}
    return {field: ids[name] for field, name in names.items() if name in ids}


def apply_tokenizer_ids(config: LLaDA2MoeConfig, directory: Path) -> None:
    """Set the mask/EOS ids the tokenizer files name, unless config.json sets them itself."""
    written = json.loads((directory / "config.json").read_text())
    for field, value in token_ids_from_tokenizer(directory).items():
        if field not in written:
            setattr(config, field, value)
    config.validate_architecture()


# Named sizes: ``llada2-tiny`` runs CPU tests in milliseconds; ``llada2-mini`` is LLaDA2.0-mini.
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "llada2-tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        partial_rotary_factor=0.5,
        rotary_dim=8,
        rope_theta=10000.0,
        max_position_embeddings=512,
        pad_token_id=2,
        eos_token_id=2,
        mask_token_id=1,
    ),
    "llada2-mini": dict(
        vocab_size=157184,
        hidden_size=2048,
        intermediate_size=5120,
        moe_intermediate_size=512,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=256,
        num_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        partial_rotary_factor=0.5,
        rotary_dim=64,
        rope_theta=600000.0,
        max_position_embeddings=32768,
        pad_token_id=EOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        mask_token_id=MASK_TOKEN_ID,
    ),
}


def llada2_named_config(name: str, **overrides: Any) -> LLaDA2MoeConfig:
    """Build a named LLaDA2 size, e.g. ``llada2_named_config("llada2-tiny", vocab_size=512)``."""
    if name not in NAMED_CONFIGS:
        raise KeyError(f"unknown LLaDA2 config {name!r}; choose one of {sorted(NAMED_CONFIGS)}")
    return LLaDA2MoeConfig(**{**NAMED_CONFIGS[name], **overrides})
