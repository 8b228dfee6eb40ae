"""Block-diffusion decoding (LLaDA2.x sampler) against a plain loop of the published algorithm.

The reference below is written from the algorithm's description (REFERENCE.md, "Sampler"), with
Python lists and one uncached forward per step; it shares no code with ``generate_blocks``.
The model is a tiny random LLaDA2 model with a sharpened head.
"""

from __future__ import annotations

import pytest
import torch

from diffmoe.generation.block_diffusion import block_causal_mask, generate_blocks, sample_tokens
from diffmoe.model import LLaDA2MoeModelLM, llada2_named_config
from diffmoe.rng import device_generator
from kept_caches import KeepsCaches

MASK, VOCAB = 1, 48


def tiny(seed: int = 0) -> LLaDA2MoeModelLM:
    torch.manual_seed(seed)
    cfg = llada2_named_config("llada2-tiny", vocab_size=VOCAB, mask_token_id=MASK, eos_token_id=2)
    model = LLaDA2MoeModelLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.6)  # confident enough that thresholds are crossed
    return model


def reference(model, prompt, gen, bl, threshold, eos, editing=None, max_post=16, steps=None):
    plen = len(prompt)
    blocks = -(-(plen + gen) // bl)
    x = list(prompt) + [MASK] * (blocks * bl - plen)
    for b in range(plen // bl, blocks):
        bs, be = b * bl, (b + 1) * bl
        # LLaDA2.0's schedule splits the block length, not its masks, over the steps
        ks = None if steps is None else [bl // steps + (i < bl % steps) for i in range(steps)]
        step, post = 0, 0
        while True:
            had_mask = MASK in x[bs:be]
            if not had_mask:
                if editing is None:
                    break
                post += 1
                if post > max_post:
                    break
            mask = [[1 if j // bl <= i // bl else 0 for j in range(be)] for i in range(be)]
            out = model(
                torch.tensor([x[:be]]),
                attention_mask=torch.tensor([[mask]], dtype=torch.bool),
                position_ids=torch.arange(be)[None],
            )
            probs = out.logits[0, bs:be].double().softmax(-1)
            probs[:, MASK] = -1.0  # the mask token is never predicted
            conf, pred = (t.tolist() for t in probs.max(-1))
            masked = [i for i in range(bs, be) if x[i] == MASK]
            k = 1 if ks is None else ks[min(step, len(ks) - 1)]
            k = min(k, len(masked))
            above = [i for i in masked if conf[i - bs] > threshold]
            commit = above if len(above) >= k else sorted(masked, key=lambda i: (-conf[i - bs], i))[:k]
            edits = []
            if editing is not None:
                edits = [
                    i
                    for i in range(max(bs, plen), be)
                    if x[i] != MASK and pred[i - bs] != x[i] and conf[i - bs] > editing
                ]
            for i in commit + edits:
                x[i] = pred[i - bs]
            step += 1
            if not had_mask and not edits:
                break
        answer = x[plen:be]
        if eos is not None and MASK not in answer and eos in answer:
            break
    out = x[: plen + gen]
    return [eos if t == MASK else t for t in out]


CASES = [
    dict(plen=5, gen=20, bl=8, threshold=0.3),  # prompt ends inside a block
    dict(plen=16, gen=16, bl=8, threshold=0.3),  # prompt fills whole blocks
    dict(plen=6, gen=24, bl=8, threshold=0.3, steps=4),  # LLaDA2.0 even split over steps
    dict(plen=3, gen=21, bl=8, threshold=0.99, steps=3),  # the split is of the block, not its 5 masks
    dict(plen=7, gen=24, bl=8, threshold=0.5, editing=0.2, max_post=3),  # LLaDA2.1 editing
    dict(plen=3, gen=12, bl=4, threshold=0.9, editing=0.1, max_post=0),
    dict(plen=5, gen=19, bl=8, threshold=0.5, editing=0.0, max_post=2),  # 0: any changed prediction
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("with_eos", [False, True], ids=["no_eos", "eos"])
def test_equals_the_published_algorithm_cached_and_uncached(case, with_eos):
    model = tiny()
    torch.manual_seed(1)
    prompt = torch.randint(3, VOCAB, (case["plen"],)).tolist()
    settings = (case["gen"], case["bl"], case["threshold"])
    extra = (case.get("editing"), case.get("max_post", 16), case.get("steps"))
    eos = None
    if with_eos:  # a token the model writes early in its answer, so EOS falls inside a block
        eos = reference(model, prompt, *settings, None, *extra)[case["plen"] + 2]
    want = reference(model, prompt, *settings, eos, *extra)
    kwargs = dict(
        gen_length=case["gen"],
        block_length=case["bl"],
        threshold=case["threshold"],
        editing_threshold=case.get("editing"),
        max_post_steps=case.get("max_post", 16),
        steps=case.get("steps"),
        mask_id=MASK,
        eos_id=eos,
    )
    for use_cache in (True, False):
        got = generate_blocks(model, torch.tensor([prompt]), use_cache=use_cache, **kwargs)
        assert got[0].tolist() == want, f"use_cache={use_cache}"
    if with_eos:
        assert eos in want[case["plen"] :]


def test_the_cache_computes_finished_blocks_once():
    model = tiny()
    prompt = torch.randint(3, VOCAB, (1, 12))
    cached, plain = {}, {}
    kw = dict(gen_length=32, block_length=8, threshold=0.3, mask_id=MASK)
    a = generate_blocks(model, prompt, stats=cached, **kw)
    b = generate_blocks(model, prompt, use_cache=False, stats=plain, **kw)
    assert torch.equal(a, b)
    # uncached steps re-feed the whole prefix; cached ones feed one block (two at a block boundary)
    assert cached["tokens_fed"] < plain["tokens_fed"] / 2
    assert cached["forwards"] == plain["forwards"] + 1  # the prompt's whole block, prefilled once


def test_a_batch_equals_each_row_alone():
    model = tiny()
    prompts = torch.randint(3, VOCAB, (3, 6))
    kw = dict(gen_length=16, block_length=8, threshold=0.4, editing_threshold=0.3, mask_id=MASK, eos_id=5)
    batched = generate_blocks(model, prompts, **kw)
    for r in range(3):
        assert torch.equal(batched[r], generate_blocks(model, prompts[r : r + 1], **kw)[0])


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny()
    prompt = torch.randint(3, VOCAB, (2, 5))
    kw = dict(gen_length=16, block_length=8, threshold=0.9, temperature=0.8, top_k=3, top_p=0.9, mask_id=MASK)
    a = generate_blocks(model, prompt, generator=device_generator("cpu", 7), **kw)
    b = generate_blocks(model, prompt, generator=device_generator("cpu", 7), **kw)
    assert torch.equal(a, b) and not bool((a == MASK).any())
    logits = torch.randn(4, 10, VOCAB)
    ids, p = sample_tokens(logits, 1.0, top_k=3, generator=device_generator("cpu", 0))
    assert bool((logits.topk(3, -1).indices == ids[..., None]).any(-1).all()) and bool((p > 0).all())
    ids, _ = sample_tokens(logits, 1.0, top_p=1e-9, generator=device_generator("cpu", 0))
    assert torch.equal(ids, logits.argmax(-1))  # top_p below the best token's mass: the best only


def test_confidences_in_chunks_equal_one_softmax(monkeypatch):
    import diffmoe.generation.sampler as sampler

    logits = torch.randn(3, 7, VOCAB)
    probs = logits.double().softmax(-1)
    probs[..., MASK] = -1.0
    want_conf, want_ids = probs.max(-1)
    monkeypatch.setattr(sampler, "SOFTMAX_CHUNK_ELEMENTS", 2 * VOCAB)  # 11 chunks of 2 positions
    ids, conf = sample_tokens(logits, 0.0, mask_id=MASK)  # LLaDA2's top-1
    assert torch.equal(ids, want_ids) and torch.equal(conf, want_conf) and conf.dtype == torch.float64
    ids, conf = sampler.predict(logits, 0.0, "low_confidence", mask_id=MASK)  # LLaDA-MoE's
    assert torch.equal(ids, want_ids) and torch.equal(conf, want_conf)


def test_block_causal_mask_and_bad_input():
    pos = torch.arange(6)
    m = block_causal_mask(pos, pos, 2)[0, 0]
    assert m[1].tolist() == [True, True, False, False, False, False]
    assert m[2].tolist() == [True, True, True, True, False, False]
    model = tiny()
    with pytest.raises(ValueError, match="mask_id"):
        generate_blocks(model, torch.tensor([[MASK, 4]]), mask_id=MASK)
    with pytest.raises(ValueError, match="block_length"):
        generate_blocks(model, torch.tensor([[3, 4]]), block_length=0, mask_id=MASK)


def _mixed_requests(n: int = 16):
    """Prompts of different lengths with different answer lengths and LLaDA2 settings."""
    from diffmoe.generation import DecodingConfig

    g = torch.Generator().manual_seed(3)
    settings = [
        dict(gen_length=16, block_length=8, threshold=0.3),
        dict(gen_length=24, block_length=8, threshold=0.5, editing_threshold=0.2, max_post_steps=3),
        dict(gen_length=16, block_length=4, steps=8),
        dict(gen_length=8, block_length=8, threshold=0.9, editing_threshold=0.1, max_post_steps=0),
    ]
    out = []
    for i in range(n):
        plen = 1 + (i * 5) % 13
        prompt = torch.randint(3, VOCAB, (plen,), generator=g).tolist()
        out.append(
            (prompt, DecodingConfig(**settings[i % len(settings)], stop_token_ids=[5] if i % 3 == 0 else []))
        )
    return out


def _alone(model, prompt, cfg) -> list[int]:
    """What ``generate`` decodes for one request alone, cut at its first end id."""
    from diffmoe.generation import generate

    ids = generate(
        model,
        torch.tensor([prompt]),
        gen_length=cfg.gen_length,
        steps=cfg.steps,
        block_length=cfg.block_length,
        threshold=cfg.threshold,
        editing_threshold=cfg.editing_threshold,
        max_post_steps=cfg.max_post_steps,
        mask_id=MASK,
        eos_id=[2, *cfg.stop_token_ids],
    )[0, len(prompt) :].tolist()
    ends = [i for i, t in enumerate(ids) if t in (2, *cfg.stop_token_ids)]
    return ids[: ends[0]] if ends else ids


def test_engine_with_mixed_requests_equals_generate_alone():
    """16 requests joining and leaving a batch of 6 (rows at different blocks step together) decode
    what ``generate`` decodes for each alone, and stream only finished blocks."""
    from diffmoe.generation import Engine

    model = tiny()
    requests = _mixed_requests()
    engine = Engine(model, max_batch_size=6, mask_id=MASK, eos_id=2)
    rids = [engine.add_request(p, c) for p, c in requests]
    streamed = {rid: [] for rid in rids}
    outputs = {}
    while len(outputs) < len(rids):
        for event in engine.step():
            streamed[event.request_id].append(event.token_ids)
            if event.finished:
                outputs[event.request_id] = event.output
    for rid, (prompt, cfg) in zip(rids, requests):
        want = _alone(model, prompt, cfg)
        got = outputs[rid]
        assert got.token_ids == want, (rid, cfg)
        assert sum(streamed[rid], []) == want
        # every streamed delta but the last ends on a block boundary: nothing final changes later
        bl, pos = cfg.block_length, len(prompt)
        for delta in streamed[rid][:-1]:
            pos += len(delta)
            assert pos % bl == 0, (rid, streamed[rid])


def test_engine_block_cache_feeds_finished_blocks_once():
    from diffmoe.generation import DecodingConfig, Engine

    model = tiny()
    prompt = torch.randint(3, VOCAB, (12,)).tolist()
    stats = {}
    generate_blocks(
        model, torch.tensor([prompt]), gen_length=32, block_length=8, threshold=0.3, mask_id=MASK, stats=stats
    )
    out = Engine(model, mask_id=MASK, eos_id=None).run(
        [prompt], DecodingConfig(gen_length=32, block_length=8, threshold=0.3)
    )[0]
    # the prompt's whole block is folded into the first step: one forward fewer than generate_blocks
    assert out.steps == stats["forwards"] - 1
    assert out.tokens_fed == stats["tokens_fed"]


def test_engine_block_cache_keeps_earlier_rows_when_a_later_row_grows_it():
    """Rows of very different prompt lengths store their prompts in the same step: each later,
    longer row grows the buffers, which must keep what the earlier rows of that step stored."""
    from diffmoe.generation import DecodingConfig, Engine

    model = tiny()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 41, 90)]
    cfg = DecodingConfig(gen_length=16, block_length=8, threshold=0.5)
    for order in (prompts, prompts[::-1]):
        outs = Engine(model, max_batch_size=3, mask_id=MASK, eos_id=2).run(order, cfg)
        for prompt, out in zip(order, outs):
            assert out.token_ids == _alone(model, prompt, cfg)


def _decode_stepping_alone_now_and_then(engine, model, after_step=lambda: None) -> int:
    """12 mixed requests through ``engine`` (a batch of 5), every fourth step through the engine's
    isolation path (each row alone, as after a failed batched step); every request must decode what
    it decodes alone. Returns the number of steps."""
    requests = _mixed_requests(12)
    rids = [engine.add_request(p, c) for p, c in requests]
    outputs, steps = {}, 0
    while len(outputs) < len(rids):
        if steps % 4 == 3 and engine.active:
            events, failed, _ = engine._isolate()
            assert not failed
        else:
            events = engine.step()
        steps += 1
        outputs.update((e.request_id, e.output) for e in events if e.finished)
        after_step()
    for rid, (prompt, cfg) in zip(rids, requests):
        assert outputs[rid].token_ids == _alone(model, prompt, cfg), (rid, cfg)
    return steps


def test_engine_block_cache_is_written_in_place_and_survives_rows_stepping_alone(monkeypatch):
    """The batch's cache is one buffer per layer that forwards write into (no per-step copy: the
    buffers are replaced only when they grow); rows that step alone now and then (what the engine
    does after a failed batched step) leave their slot with their cache and rejoin with it, and
    every request still decodes what it decodes alone."""
    from diffmoe.generation import Engine
    from diffmoe.generation.block_cache import _LayerView

    appends = []
    real_append = _LayerView.append_in_place
    monkeypatch.setattr(
        _LayerView, "append_in_place", lambda self, k, v: appends.append(1) or real_append(self, k, v)
    )
    model = tiny()
    engine = Engine(model, max_batch_size=5, mask_id=MASK, eos_id=2)
    buffers = []

    def watch():
        keys = engine._blocks.cache.keys
        if keys and not any(b is keys[0] for b in buffers):
            buffers.append(keys[0])

    steps = _decode_stepping_alone_now_and_then(engine, model, watch)
    assert len(appends) > 3 * steps  # forwards attended to the buffer (3 layers each) ...
    assert len(buffers) <= 6 < steps / 4, (len(buffers), steps)  # ... which was rarely replaced


def test_engine_with_the_cache_kept_by_the_model_equals_generate_alone():
    """The expert-parallel path: the cache lives with the model's ranks (rows pinned to one rank for
    life), the engine sends only token ids and per-row lengths, rows step alone now and then, and
    every request decodes what it decodes alone; finished rows' caches are evicted."""
    from diffmoe.generation import Engine
    from diffmoe.generation.block_cache import RowPlan

    model = tiny()
    remote = KeepsCaches(model)
    engine = Engine(remote, max_batch_size=5, mask_id=MASK, eos_id=2)
    _decode_stepping_alone_now_and_then(engine, model)
    assert engine._blocks.cache.keys == []  # the engine itself never held a key or value
    # token ids and plans crossed, never a key or value (those are 4-D)
    assert all(isinstance(x, RowPlan) or x.dim() == 2 for x in remote.sent)
    assert sum(len(h.rows) for h in remote.held) <= 5  # finished rows were evicted by later steps
    engine.release_finished()  # going idle: the last ones too
    assert remote.holds_nothing()
    from diffmoe.generation.block_cache import HeldRows

    held, ids = HeldRows(), torch.tensor([[3, 4, MASK, MASK]])
    held.step(model.model, ids, [RowPlan("y", 0, 4, 0, 2, store=2)])
    assert held.rows["y"].cached == 2
    # a step the engine saw fail elsewhere stored here: the engine's count (0) wins, fed again
    held.step(model.model, ids, [RowPlan("y", 0, 4, 0, 2, store=2)])
    assert held.rows["y"].cached == 2
    with pytest.raises(RuntimeError, match="cached positions"):  # a cache behind the engine is refused
        held.step(model.model, ids[:, 2:], [RowPlan("y", 5, 2, 5, 2)])


@pytest.mark.parametrize("kept", [False, True], ids=["local", "kept_by_model"])
def test_a_long_prompt_joining_runs_apart_from_the_decoding_rows(kept):
    """A request admitted with a prompt of many blocks is fed in a forward of its own: the rows
    already decoding are not padded to its length (they would be, fed with it), and every request
    still decodes what it decodes alone; on a model that keeps the caches (2 ranks) too."""
    from diffmoe.generation import DecodingConfig, Engine

    model = tiny()
    g = torch.Generator().manual_seed(7)
    short = [torch.randint(3, VOCAB, (5,), generator=g).tolist() for _ in range(3)]
    long = torch.randint(3, VOCAB, (70,), generator=g).tolist()
    cfg = DecodingConfig(gen_length=24, block_length=8, threshold=0.9, ignore_eos=True)
    widths = []
    model.model.register_forward_pre_hook(lambda _, args: widths.append(args[0].shape))

    def decode(apart: bool):
        widths.clear()
        target = KeepsCaches(model, ranks=2) if kept else model
        engine = Engine(target, max_batch_size=4, mask_id=MASK, eos_id=2, prefill_apart=apart)
        rids = [engine.add_request(p, cfg) for p in short]
        engine.step()
        engine.step()
        rids.append(engine.add_request(long, cfg))
        outputs = {}
        while len(outputs) < len(rids):
            outputs.update((e.request_id, e.output) for e in engine.step() if e.finished)
        for rid, prompt in zip(rids, [*short, long]):
            assert outputs[rid].token_ids == _alone(model, prompt, cfg)
        return list(widths), engine.forwards

    seen, forwards = decode(apart=True)
    assert max(w for b, w in seen if b >= 2) <= 16  # decoding rows: a block, or two
    assert (1, 72) in seen  # the long prompt alone: its 8 whole blocks and its first answer block
    # told to feed them together (the old way), the decoding rows are padded to the prompt (with 2
    # ranks: the one the prompt is pinned to, the least loaded, holds a decoding row too)
    padded, together = decode(apart=False)
    assert max(w for b, w in padded if b >= 2) == 72
    assert forwards == together + 1  # one more forward: the step the long prompt joined


def test_held_rows_pad_to_the_forwards_the_ranks_agree_on():
    """An expert-parallel rank runs as many forwards as the rank that runs most (``agree``): its
    own parts, then one-token dummies; its rows' hidden states are what one forward gives."""
    from diffmoe.generation.block_cache import HeldRows, RowPlan

    model = tiny()
    calls = []
    model.model.register_forward_pre_hook(lambda _, args: calls.append(tuple(args[0].shape)))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 40), generator=g)
    plans = [RowPlan("decoding", 0, 8, 0, 8), RowPlan("prompt", 0, 40, 0, 8, store=32)]
    together = HeldRows().step(model.model, ids, plans)
    calls.clear()
    held = HeldRows()

    def agree(n):  # before any forward: a rank's k-th forward must meet the other ranks' k-th
        calls.append(("agree", n))
        return max(n, 3)

    apart = held.step(model.model, ids, plans, apart=True, agree=agree)
    assert calls == [("agree", 2), (1, 8), (1, 40), (1, 1)] and held.forwards == 3
    torch.testing.assert_close(apart[0, :8], together[0, :8])
    torch.testing.assert_close(apart[1], together[1])
    assert held.rows["prompt"].cached == 32 and held.rows["decoding"].cached == 0


@pytest.mark.parametrize("kept", [False, True], ids=["local", "kept_by_model"])
def test_long_prompts_are_prefilled_in_chunks(kept):
    """With ``prefill_chunk``, a prompt longer than the chunk is cached over several steps (whole
    blocks, no denoising meanwhile), so no forward is wider than the chunk; locally, rows that only
    decode meanwhile, before and after it in the batch, run in forwards of their own (never padded
    to a chunk); answers are what each request decodes alone."""
    from diffmoe.generation import DecodingConfig, Engine

    model = tiny()
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 70, 5)]
    cfg = DecodingConfig(gen_length=16, block_length=8, threshold=0.9)
    shapes = []
    model.model.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    engine = Engine(
        KeepsCaches(model, ranks=1) if kept else model,
        max_batch_size=3,
        mask_id=MASK,
        eos_id=2,
        prefill_chunk=32,
    )
    outs = engine.run(prompts, cfg)
    assert max(w for _, w in shapes) == 32
    assert all(b == 1 for b, w in shapes if w > 16)  # the chunks ran alone: no decoding row padded
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _alone(model, prompt, cfg)
    # the 70-token prompt decoded alone: its 64 whole-block positions in 2 steps of 32 that only
    # prefill, then its blocks' steps: 2 steps more than generate_blocks, which folds the prompt
    # into the first one (in the batch above it may also cache a finished block apart:
    # ``block_engine.unpadded_spans``)
    alone = Engine(KeepsCaches(model, ranks=1) if kept else model, mask_id=MASK, eos_id=2, prefill_chunk=32)
    steps = alone.run([prompts[1]], cfg)[0].steps
    stats = {}
    generate_blocks(
        model,
        torch.tensor([prompts[1]]),
        gen_length=16,
        block_length=8,
        threshold=0.9,
        mask_id=MASK,
        eos_id=2,
        stats=stats,
    )
    assert steps == stats["forwards"] - 1 + 2
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, mask_id=MASK, prefill_chunk=0)


def test_feed_parts_runs_prompt_rows_apart_in_consecutive_slots():
    from diffmoe.generation.block_cache import feed_parts

    assert feed_parts([8, 16, 8], 8) == [(0, 3)]  # a block, or a block and the finished one
    assert feed_parts([8, 72, 40], 8) == [(0, 1), (1, 3)]  # two prompts admitted after a decoding row
    assert feed_parts([8, 72, 8, 8], 8) == [(0, 1), (1, 2), (2, 4)]  # a chunk between decoding rows
    assert feed_parts([72], 8) == [(0, 1)] and feed_parts([1, 1, 9], 1) == [(0, 2), (2, 3)]
