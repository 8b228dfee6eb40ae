"""LLaDA-MoE -> LLaDA2 conversion: the converted network computes the source's function."""

from __future__ import annotations

import pytest
import torch

from diffmoe.diffusion.blocks import block_diffusion_mask
from diffmoe.model import LLaDA2MoeModelLM, LLaDAMoEModelLM, named_config
from diffmoe.model.convert import llada2_config_from, llada2_state_from

VARIANTS = {
    "tiny": {},
    "shared-bias-partial-rope": dict(
        shared_expert_intermediate_size=64, attention_bias=True, partial_rotary_factor=0.5
    ),
    "dense-first-sigmoid-groups": dict(
        moe_layer_freq=[0, 1],
        moe_router_score_function="sigmoid",
        router_num_group=4,
        router_topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.0,
        moe_router_enable_expert_bias=True,
    ),
}


def _convert(source: LLaDAMoEModelLM) -> LLaDA2MoeModelLM:
    config = llada2_config_from(source.config)
    target = LLaDA2MoeModelLM(config).eval()
    target.load_state_dict(llada2_state_from(source.state_dict(), config.num_experts), strict=True)
    return target


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converted_model_computes_the_source_function(variant):
    torch.manual_seed(0)
    source = LLaDAMoEModelLM(named_config("tiny", **VARIANTS[variant])).eval()
    target = _convert(source)  # an enabled expert bias is zero here (nonzero: refused, below)
    ids = torch.randint(3, 1024, (2, 24))
    block = block_diffusion_mask(12, 4).expand(2, -1, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, source(ids).logits, atol=1e-5, rtol=1e-5)
        pair = torch.cat([ids[:, :12], ids[:, :12]], 1)
        pos = torch.arange(12).repeat(2)[None].expand(2, -1)
        torch.testing.assert_close(
            target(pair, attention_mask=block, position_ids=pos).logits,
            source(pair, attention_mask=block, position_ids=pos).logits,
            atol=1e-5,
            rtol=1e-5,
        )


def test_causal_twin_converts_and_keeps_its_causal_function():
    torch.manual_seed(1)
    source = LLaDAMoEModelLM(named_config("tiny", causal=True)).eval()
    target = _convert(source)
    assert target.config.family == "block_diffusion" and source.config.family == "autoregressive"
    ids = torch.randint(3, 1024, (1, 16))
    causal = torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        torch.testing.assert_close(
            target(ids, attention_mask=causal).logits, source(ids).logits, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize(
    "fields, complaint",
    [
        (dict(moe_layer_freq=[1, 0]), "dense layers only before"),
        (dict(shared_expert_intermediate_size=48), "not a multiple"),
        (dict(clip_qkv=8.0), "clip_qkv"),
        (dict(num_experts_per_tok=1, norm_topk_prob=True), "one expert per token"),
    ],
)
def test_unconvertible_models_are_named(fields, complaint):
    with pytest.raises(ValueError, match=complaint):
        llada2_config_from(named_config("tiny", **fields))


def test_a_nonzero_llada_moe_expert_bias_is_refused():
    """LLaDA-MoE mixes experts with the bias added (published code), LLaDA2 selects with it only."""
    torch.manual_seed(2)
    source = LLaDAMoEModelLM(named_config("tiny", moe_router_enable_expert_bias=True)).eval()
    source.model.layers[1].mlp.expert_bias.normal_()
    with pytest.raises(ValueError, match="layers.1.mlp.expert_bias"):
        _convert(source)
