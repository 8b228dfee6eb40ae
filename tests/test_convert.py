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


def test_converted_ar_twin_answers_where_the_same_steps_from_random_init_do_not():
    """Issue 18's claim at unit scale: an AR twin that learned a secret key -> value table (3 keys per
    prompt, 100 keys, 26 values: chance is 26^-3 ~ 6e-5) is converted and trained 30 block-diffusion
    steps; it then answers held-out prompts through the LLaDA2 sampler, where the same 30 steps from
    the twin's untrained weights do not. (The full curves: benchmarks/bench_ar_to_diffusion.py.)"""
    import random

    from diffmoe.diffusion import ObjectiveConfig, training_loss
    from diffmoe.generation import generate

    mask, eos, sep, keys, values, n = 1, 2, 3, 100, 26, 3
    draw = random.Random(7)
    table = [draw.randrange(values) for _ in range(keys)]  # fixed, and no formula of the key

    def batch(rng: random.Random, rows: int):
        ids = []
        for _ in range(rows):
            chosen = [rng.randrange(keys) for _ in range(n)]
            answer = [4 + keys + table[k] for k in chosen]
            ids.append([4 + k for k in chosen] + [sep] + answer + [eos] * 3)
        ids = torch.tensor(ids)
        response = torch.zeros_like(ids, dtype=torch.bool)
        response[:, n + 1 :] = True
        return ids, response

    def train(model, steps: int, seed: int, block_length: int | None = None):
        objective, rng = ObjectiveConfig(balance="none"), random.Random(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            ids, response = batch(rng, 64)
            loss = training_loss(
                model,
                ids,
                mask_id=mask,
                objective=objective,
                response_mask=response,
                block_length=block_length,
            )
            opt.zero_grad()
            loss.total.backward()
            opt.step()
        return model.eval()

    def exact_match(model) -> float:
        ids, _ = batch(random.Random(99), 128)
        with torch.no_grad():
            out = generate(model, ids[:, : n + 1], gen_length=8, block_length=4, threshold=0.9, mask_id=mask)
        return float((out[:, n + 1 : 2 * n + 1] == ids[:, n + 1 : 2 * n + 1]).all(1).float().mean())

    torch.manual_seed(0)
    twin = LLaDAMoEModelLM(named_config("tiny", vocab_size=136, causal=True, max_position_embeddings=64))
    untrained = {k: v.clone() for k, v in twin.state_dict().items()}
    train(twin, 150, seed=0)
    scores = {}
    for name, state in (("converted", twin.state_dict()), ("scratch", untrained)):
        torch.manual_seed(1)
        config = llada2_config_from(twin.config)
        model = LLaDA2MoeModelLM(config)
        model.load_state_dict(llada2_state_from(state, config.num_experts), strict=True)
        scores[name] = exact_match(train(model, 30, seed=1, block_length=4))
    assert scores["converted"] >= 0.8 and scores["scratch"] <= 0.05, scores
