"""The Engine's autoregressive path for the causal twin: equal to a plain no-cache greedy loop token
for token, batching invariance (greedy and sampled), EOS / max_tokens / stop ids, streaming."""

from __future__ import annotations

import asyncio

import pytest
import torch

from diffmoe.generation import DecodingConfig, Engine
from diffmoe.model import LLaDAMoEModelLM, named_config

VOCAB = 64


def causal_model(seed: int = 0) -> LLaDAMoEModelLM:
    torch.manual_seed(seed)
    cfg = named_config("tiny", vocab_size=VOCAB, max_position_embeddings=96, causal=True)
    model = LLaDAMoEModelLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)  # decisive predictions: no near-ties in argmax
    return model


@torch.no_grad()
def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Full forward over the whole sequence for every token: no cache, no batching, no padding."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 9, 5, 14, 1, 7][:n]
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in lengths]


def cfg(**kw) -> DecodingConfig:
    return DecodingConfig(**{"gen_length": 16, "block_length": 8, "ignore_eos": True, **kw})


@pytest.fixture(scope="module")
def model():
    return causal_model()


def test_ar_engine_equals_plain_greedy_loop(model):
    ps = prompts(6)
    engine = Engine(model, max_batch_size=8)
    outs = engine.run(ps, cfg())
    for p, out in zip(ps, outs):
        assert out.token_ids == greedy_reference(model, p, 16)
        assert out.finish_reason == "length"
        assert out.steps == 16  # one prefill + 15 cached decode steps
    # A batch of 6 needs one prefill forward plus one decode forward per later token.
    assert engine.forwards == 16


def test_ar_batching_invariance_mixed_lengths(model):
    ps = prompts(6)
    configs = [cfg(gen_length=8 * (1 + i % 3), block_length=8) for i in range(len(ps))]
    alone = [Engine(model, max_batch_size=1).run([p], c)[0].token_ids for p, c in zip(ps, configs)]
    engine = Engine(model, max_batch_size=3)  # requests join as others finish: mixed prefill/decode
    together = [o.token_ids for o in engine.run(ps, configs)]
    assert together == alone
    assert [len(t) for t in alone] == [c.gen_length for c in configs]


def test_ar_decode_writes_the_cache_in_place(model):
    """Decode steps write each row's new keys/values into one preallocated buffer for the batch
    (no per-step restacking of the rows' caches, whose cost grows with the context): over 64
    tokens with rows joining and leaving the buffer is replaced a handful of times (geometric
    growth), and every answer is still the plain greedy loop's."""
    ps = prompts(6)
    configs = [cfg(gen_length=64 - 8 * (i % 3), block_length=8) for i in range(len(ps))]
    engine = Engine(model, max_batch_size=4)
    ids = [engine.add_request(p, c) for p, c in zip(ps, configs)]
    buffers, steps, done = [], 0, {}
    while len(done) < len(ids):
        done.update((e.request_id, e.output) for e in engine.step() if e.finished)
        keys = engine._ar.cache.keys
        if keys and not any(b is keys[0] for b in buffers):
            buffers.append(keys[0])
        steps += 1
    for p, c, i in zip(ps, configs, ids):
        assert done[i].token_ids == greedy_reference(model, p, c.gen_length)
    assert len(buffers) <= 6 < steps / 10, (len(buffers), steps)


def test_ar_on_a_model_that_keeps_the_caches_equals_the_greedy_loop(model):
    """The expert-parallel path of the AR twin: each row's cache stays with the rank it is pinned
    to (prompt and tokens stored there as they are fed), the engine sends token ids and per-row
    plans only, rows join and leave, every answer is the greedy loop's, and finished rows' caches
    are evicted."""
    from kept_caches import KeepsCaches

    ps = prompts(6)
    configs = [cfg(gen_length=8 * (1 + i % 3), block_length=8) for i in range(len(ps))]
    fed = []
    hook = model.model.register_forward_pre_hook(lambda _, args: fed.append(args[0].numel()))
    try:
        for apart in (False, True):
            fed.clear()
            remote = KeepsCaches(model)
            engine = Engine(remote, max_batch_size=3, prefill_apart=apart)
            outs = engine.run(ps, configs)
            for p, c, out in zip(ps, configs, outs):
                assert out.token_ids == greedy_reference(model, p, c.gen_length)
            assert engine._ar.cache.keys == []  # the engine itself never held a key or value
            assert all(not isinstance(x, torch.Tensor) or x.dim() == 2 for x in remote.sent)
            assert remote.holds_nothing()  # run() went idle: every finished row evicted
            if not apart:
                together = sum(fed)  # decoding rows padded to a joining prompt's length
    finally:
        hook.remove()
    # prompts apart from the single tokens (the default): the decoding rows were not padded
    assert sum(fed) < together


def test_ar_sampling_is_seeded_per_request(model):
    ps = prompts(4)
    short = dict(gen_length=8, block_length=8)
    sampled = [cfg(temperature=1.0, seed=100 + i, **short) for i in range(4)]
    alone = [Engine(model, max_batch_size=1).run([p], c)[0].token_ids for p, c in zip(ps, sampled)]
    mixed = [sampled[0], cfg(**short), sampled[2], cfg(**short)]  # sampled rows batched with greedy ones
    together = Engine(model, max_batch_size=4).run(ps, mixed)
    assert together[0].token_ids == alone[0] and together[2].token_ids == alone[2]
    assert together[1].token_ids == greedy_reference(model, ps[1], 8)
    assert alone[0] != greedy_reference(model, ps[0], 8) or alone[2] != greedy_reference(model, ps[2], 8)


def test_ar_eos_stops_early_and_max_tokens_truncates(model):
    p = prompts(1)[0]
    ref = greedy_reference(model, p, 16)
    eos_at = 5
    eos = ref[eos_at]
    first = ref.index(eos)  # EOS ends the answer at its first occurrence
    engine = Engine(model, eos_id=eos)
    out = engine.run([p], cfg(ignore_eos=False))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == ref[:first]
    assert out.steps == first + 1  # decoding stopped at EOS, not at the end of the canvas

    out = Engine(model).run([p], cfg(max_tokens=4))[0]
    assert out.finish_reason == "length" and out.token_ids == ref[:4] and out.steps == 4

    stop_id = ref[2]
    out = Engine(model).run([p], cfg(stop_token_ids=[stop_id], ignore_eos=False))[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[: ref.index(stop_id)]


def test_ar_streams_one_token_per_step_and_async(model):
    p = prompts(2)[1]
    ref = greedy_reference(model, p, 8)
    engine = Engine(model)
    rid = engine.add_request(p, cfg(gen_length=8))
    deltas = []
    while engine.has_unfinished():
        for event in engine.step():
            assert event.request_id == rid
            deltas.append(event.token_ids)
    assert sum(deltas, []) == ref
    assert all(len(d) <= 1 for d in deltas)

    async def main():
        out = await engine.generate(p, cfg(gen_length=8))
        streamed = [e.token_ids async for e in engine.stream(p, cfg(gen_length=8))]
        await engine.shutdown()
        return out, streamed

    out, streamed = asyncio.run(main())
    assert out.token_ids == ref and sum(streamed, []) == ref


def test_ar_rejects_an_empty_prompt(model):
    with pytest.raises(ValueError, match="non-empty prompt"):
        Engine(model).add_request([], cfg())
