"""The LLaDA sampler, parallel decoding and KV caches against an independent reference written here."""

from __future__ import annotations

import pytest
import torch

from diffmoe.generation import DecodingConfig, add_gumbel_noise, generate, select_transfer, transfer_schedule
from diffmoe.model import LLaDAMoEModelLM, named_config

MASK, EOS, VOCAB = 1, 2, 64


def tiny_model(layers: int = 2, seed: int = 0, **overrides) -> LLaDAMoEModelLM:
    """Random tiny model; a wide lm_head makes predictions peaked so rankings have no near-ties."""
    torch.manual_seed(seed)
    cfg = named_config(
        "tiny", vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=64, **overrides
    )
    model = LLaDAMoEModelLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    return model


def prompts(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def llada_reference(
    model, prompt, *, steps, gen_length, block_length, mask_id, attention_mask=None, cfg_scale=0.0
):
    """The LLaDA reference sampler, written out plainly: full forward every step, top-k per row."""
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long)
    x[:, :p] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(b, gen_length, dtype=attention_mask.dtype)], 1)
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        start, end = p + nb * block_length, p + (nb + 1) * block_length
        n_masked = (x[:, start:end] == mask_id).sum(1).tolist()
        plan = [
            [n // steps_per_block + (1 if i < n % steps_per_block else 0) for i in range(steps_per_block)]
            for n in n_masked
        ]
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
                both = model(torch.cat([x, un_x]), attention_mask=am).logits
                logits, un_logits = both[:b], both[b:]
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attention_mask=attention_mask).logits
            x0 = logits.argmax(-1)
            p_all = torch.softmax(logits.double(), dim=-1)
            x0_p = torch.gather(p_all, -1, x0[..., None]).squeeze(-1)
            x0_p[:, end:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=torch.float64))
            for j in range(b):
                if plan[j][i]:
                    _, idx = torch.topk(confidence[j], k=plan[j][i])
                    x[j, idx] = x0[j, idx]
    return x


@pytest.mark.parametrize(
    "gen_length,steps,block_length",
    [(16, 16, 16), (16, 8, 4), (12, 6, 4), (16, 4, 8), (8, 16, 2), (10, 4, 5)],
)
def test_generate_matches_reference(gen_length, steps, block_length):
    model, ids = tiny_model(), prompts()
    kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, mask_id=MASK)
    expected = llada_reference(model, ids, **kw)
    assert torch.equal(generate(model, ids, **kw), expected)


def test_generate_matches_reference_with_padding_and_cfg():
    model, ids = tiny_model(seed=3), prompts(batch=3, length=7)
    am = torch.ones_like(ids)
    am[0, :3] = 0
    am[2, :1] = 0
    ids = ids.masked_fill(am == 0, EOS)
    kw = dict(steps=8, gen_length=8, block_length=4, mask_id=MASK, attention_mask=am)
    assert torch.equal(generate(model, ids, **kw), llada_reference(model, ids, **kw))
    assert torch.equal(
        generate(model, ids, cfg_scale=1.5, **kw), llada_reference(model, ids, cfg_scale=1.5, **kw)
    )


def test_generate_leaves_inputs_alone_and_keeps_prompt():
    model, ids = tiny_model(), prompts()
    am = torch.ones_like(ids)
    before, before_am = ids.clone(), am.clone()
    out = generate(
        model, ids, steps=4, gen_length=8, block_length=4, mask_id=MASK, attention_mask=am, cache="dual"
    )
    assert torch.equal(ids, before) and torch.equal(am, before_am)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert not bool((out == MASK).any())


def test_threshold_one_commits_exactly_one_token_per_step():
    model, ids = tiny_model(), prompts()
    stats: dict = {}
    out = generate(
        model, ids, steps=None, gen_length=12, block_length=4, mask_id=MASK, threshold=1.0, stats=stats
    )
    assert stats["forwards"] == 12  # one commit per step, 12 answer tokens
    one_per_step = llada_reference(model, ids, steps=12, gen_length=12, block_length=4, mask_id=MASK)
    assert torch.equal(out, one_per_step)


def test_low_threshold_commits_a_whole_block_per_step():
    model, ids = tiny_model(), prompts()
    stats: dict = {}
    out = generate(
        model, ids, steps=None, gen_length=12, block_length=4, mask_id=MASK, threshold=1e-12, stats=stats
    )
    assert stats["forwards"] == 3 and not bool((out == MASK).any())


def test_select_transfer_rules():
    conf = torch.tensor([[0.3, 0.95, 0.92, 0.5, 0.99], [0.2, 0.1, 0.3, 0.05, 0.25]], dtype=torch.float64)
    masked = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    nan = torch.full((2,), float("nan"), dtype=torch.float64)
    thr = torch.full((2,), 0.9, dtype=torch.float64)
    # threshold: every masked token >= 0.9 (position 4 is not masked); a row with none still commits its best
    got = select_transfer(conf, masked, threshold=thr)
    assert got.tolist() == [[False, True, True, False, False], [False, False, True, False, False]]
    # fixed counts
    got = select_transfer(conf, masked, count=torch.tensor([1, 3]))
    assert got.tolist() == [[False, True, False, False, False], [True, False, True, False, True]]
    # factor 1: the i-th best needs conf >= 1 - 1/(i+1): 0.95 >= .5, 0.92 >= .667, 0.5 < .75 -> 2
    got = select_transfer(conf, masked, factor=torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert got.sum(1).tolist() == [2, 1]
    # per-row mix: row 0 fixed count, row 1 threshold
    got = select_transfer(conf, masked, count=torch.tensor([2, -1]), threshold=torch.tensor([nan[0], 0.22]))
    assert got.tolist() == [[False, True, True, False, False], [False, False, True, False, True]]


def test_select_transfer_threshold_rows_match_the_ranked_rule():
    """All-threshold batches skip the sort; they must commit what the ranked rule does: the masked
    positions at or above the threshold, else the most confident one, leftmost of ties."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        conf = (torch.rand(6, 8, generator=g, dtype=torch.float64) * 4).round() / 4  # many ties
        masked = torch.rand(6, 8, generator=g) < 0.6
        masked[0] = False  # a row with nothing left to commit
        thr = (torch.rand(6, generator=g, dtype=torch.float64) * 4).round() / 4
        got = select_transfer(conf, masked, threshold=thr)
        for r in range(6):
            idx = [i for i in range(8) if masked[r, i]]
            want = [i for i in idx if conf[r, i] >= thr[r]]
            if idx and not want:
                want = [max(idx, key=lambda i: (conf[r, i].item(), -i))]
            assert got[r].nonzero().flatten().tolist() == want


def test_transfer_schedule_splits_evenly_with_remainder_first():
    assert transfer_schedule(torch.tensor([10, 3]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_refreshed_every_step_equals_uncached(cache):
    model, ids = tiny_model(layers=2), prompts()
    kw = dict(steps=16, gen_length=16, block_length=4, mask_id=MASK)
    stats: dict = {}
    out = generate(model, ids, cache=cache, refresh_every=1, stats=stats, **kw)
    assert torch.equal(out, generate(model, ids, **kw))
    assert stats["tokens_fed"] == 16 * ids.numel() // ids.shape[1] * (ids.shape[1] + 16)


@pytest.mark.parametrize("cache,vicinity", [("prefix", 0), ("dual", 0), ("dual", 3)])
def test_cache_is_exact_for_a_single_layer(cache, vicinity):
    """With one layer, cached keys/values depend only on their (unchanged) tokens, so any correct cache
    reproduces the uncached sampler exactly while feeding fewer tokens."""
    model, ids = tiny_model(layers=1), prompts()
    kw = dict(steps=16, gen_length=16, block_length=4, mask_id=MASK)
    plain, cached = {}, {}
    expected = generate(model, ids, stats=plain, **kw)
    assert torch.equal(generate(model, ids, cache=cache, vicinity=vicinity, stats=cached, **kw), expected)
    assert cached["forwards"] == plain["forwards"] and cached["tokens_fed"] < plain["tokens_fed"]
    par = dict(kw, steps=None, threshold=0.5)
    assert torch.equal(
        generate(model, ids, cache=cache, vicinity=vicinity, **par), generate(model, ids, **par)
    )


def test_dual_cache_feeds_only_the_block_between_refreshes():
    model, ids = tiny_model(), prompts(batch=1, length=6)
    stats: dict = {}
    generate(model, ids, steps=16, gen_length=16, block_length=4, mask_id=MASK, cache="dual", stats=stats)
    # per block: one full pass over 22 tokens, then 3 steps feeding the 4 block tokens
    assert stats == {"forwards": 16, "tokens_fed": 4 * (22 + 3 * 4)}


def test_cache_changes_little_on_multilayer_model():
    """The approximate cache (stale suffix keys) still decodes every position and keeps the prompt."""
    model, ids = tiny_model(layers=3), prompts()
    out = generate(model, ids, steps=8, gen_length=16, block_length=4, mask_id=MASK, cache="dual", vicinity=2)
    assert not bool((out == MASK).any())


def test_eos_early_stop_in_generate():
    model, ids = tiny_model(), prompts(batch=1)
    kw = dict(steps=None, gen_length=16, block_length=4, mask_id=MASK, threshold=0.9)
    full_stats, stats = {}, {}
    full = generate(model, ids, stats=full_stats, **kw)[0, ids.shape[1] :]
    eos = int(full[1])  # pretend the 2nd answer token is EOS
    cut = int((full == eos).nonzero()[0, 0])
    out = generate(model, ids, eos_id=eos, stats=stats, **kw)[0, ids.shape[1] :]
    assert torch.equal(out[:cut], full[:cut]) and bool((out[cut:] == eos).all())
    assert stats["forwards"] < full_stats["forwards"]


def test_gumbel_noise_samples_the_tempered_softmax():
    logits = torch.tensor([0.0, float(torch.log(torch.tensor(3.0)))]).expand(40000, 2)
    g = torch.Generator().manual_seed(0)
    noisy = add_gumbel_noise(logits, 1.0, g)
    assert noisy.dtype == torch.float64
    assert abs(noisy.argmax(-1).float().mean().item() - 0.75) < 0.01
    sharper = add_gumbel_noise(logits, 0.5, g).argmax(-1).float().mean().item()
    assert abs(sharper - 0.9) < 0.01  # softmax(l / 0.5) = [1, 9] / 10
    assert add_gumbel_noise(logits, 0.0) is logits


def test_sampling_is_seeded_and_random_remasking_differs():
    model, ids = tiny_model(), prompts()
    kw = dict(steps=8, gen_length=8, block_length=8, mask_id=MASK, temperature=1.0)
    a = generate(model, ids, generator=torch.Generator().manual_seed(5), **kw)
    b = generate(model, ids, generator=torch.Generator().manual_seed(5), **kw)
    c = generate(model, ids, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kw["temperature"] = 0.0
    greedy = generate(model, ids, **kw)
    rand = [
        generate(model, ids, remasking="random", generator=torch.Generator().manual_seed(s), **kw)
        for s in range(4)
    ]
    assert not bool((rand[0] == MASK).any())
    assert any(not torch.equal(r, greedy) for r in rand)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gen_length=10, block_length=4, steps=10), "block_length=4 does not divide gen_length=10"),
        (dict(gen_length=16, block_length=4, steps=2), "steps=2 is fewer than the number of blocks"),
        (dict(gen_length=16, block_length=4, steps=6), "steps=6 is not a multiple"),
        (dict(gen_length=16, block_length=4, steps=None, threshold=0.9, factor=1.0), "threshold or factor"),
        (
            dict(gen_length=16, block_length=4, steps=16, vicinity=2, cache="prefix"),
            "vicinity=2 needs cache='dual'",
        ),
        (dict(gen_length=60, block_length=4, steps=60), "max_position_embeddings=64"),
    ],
)
def test_invalid_settings_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model(), prompts(), mask_id=MASK, **kwargs)


def test_prompt_with_mask_token_is_rejected():
    ids = prompts()
    ids[0, 2] = MASK
    with pytest.raises(ValueError, match="mask_id=1"):
        generate(tiny_model(), ids, steps=4, gen_length=4, block_length=4, mask_id=MASK)


def test_decoding_config_is_strict():
    with pytest.raises(ValueError, match="extra"):
        DecodingConfig(gen_lenght=4)
    cfg = DecodingConfig(gen_length=64, block_length=16, steps=8)
    assert (cfg.num_blocks, cfg.steps_per_block, cfg.parallel) == (4, 2, False)
    with pytest.raises(ValueError, match="refresh_every"):
        DecodingConfig(refresh_every=2)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_mask_token_is_never_predicted(temperature):
    """A committed mask token would leave its position undecoded after the block's last step."""
    from diffmoe.generation.sampler import predict
    from diffmoe.rng import device_generator

    logits = torch.zeros(2, 5, 8)
    logits[..., 3] = 50.0  # the mask token is by far the most likely
    x0, conf = predict(logits, temperature, "low_confidence", device_generator("cpu", 0), mask_id=3)
    assert not bool((x0 == 3).any())
    assert torch.allclose(conf, logits.double().softmax(-1).gather(-1, x0[..., None]).squeeze(-1))
