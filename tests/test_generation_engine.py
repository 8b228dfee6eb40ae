"""The continuous-batching Engine: equivalence with generate, batching invariance, EOS / max_tokens /
stop strings, streaming, cancellation, and the asyncio interface."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import pytest
import torch

from diffmoe.generation import DecodingConfig, Engine, TextStream, generate
from diffmoe.generation.tasks import CharTokenizer
from diffmoe.model import LLaDAMoEModelLM, named_config
from kept_caches import KeepsCaches

MASK, EOS, VOCAB = 1, 2, 64
TOK = CharTokenizer()


def tiny_model(layers: int = 2, seed: int = 0) -> LLaDAMoEModelLM:
    torch.manual_seed(seed)
    cfg = named_config("tiny", vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=96)
    model = LLaDAMoEModelLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    return model


class ScriptedLM(torch.nn.Module):
    """Test double: at absolute position t it predicts ``token(t)`` with probability ``conf(t)``,
    whatever it is fed, so tests can place EOS, stop strings and commit order exactly."""

    def __init__(self, token, conf, vocab=TOK.vocab_size):
        super().__init__()
        self.token, self.conf, self.vocab = token, conf, vocab
        self.config = SimpleNamespace(max_position_embeddings=128, mask_token_id=MASK, eos_token_id=EOS)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        b, n = ids.shape
        if position_ids is None:
            position_ids = torch.arange(n).expand(b, n)
        logits = torch.zeros(b, n, self.vocab)
        for r in range(b):
            for i in range(n):
                t = int(position_ids[r, i])
                c = self.conf(t)
                logits[r, i, self.token(t)] = math.log(c * (self.vocab - 1) / (1 - c))
        kv = [(torch.zeros(b, 1, n, 1), torch.zeros(b, 1, n, 1))] if use_cache else None
        return SimpleNamespace(logits=logits, past_key_values=kv)


def letters(plen, eos_at=None, text="abcdefghijklmnopqrstuvwxyz"):
    """Answer position j -> text[j], or EOS from ``eos_at`` on."""

    def token(t):
        j = t - plen
        if j < 0:
            return TOK.encode("0")[0]
        if eos_at is not None and j >= eos_at:
            return EOS
        return TOK.encode(text[j % len(text)])[0]

    return token


def left_to_right(t):
    return 0.99 - 0.001 * t


def run_one(engine, prompt, cfg):
    rid = engine.add_request(prompt, cfg)
    events = []
    while engine.has_unfinished():
        events += [e for e in engine.step() if e.request_id == rid]
    return events


CONFIGS = [
    dict(gen_length=16, block_length=4),
    dict(gen_length=12, block_length=4, steps=6),
    dict(gen_length=16, block_length=8, threshold=0.6),
    dict(gen_length=16, block_length=4, threshold=0.6, cache="dual"),
    dict(gen_length=16, block_length=4, factor=1.0, cache="dual", vicinity=3),
    dict(gen_length=16, block_length=4, cache="prefix", refresh_every=2),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_engine_alone_equals_generate(kw):
    model = tiny_model()
    prompt = torch.randint(3, VOCAB, (7,), generator=torch.Generator().manual_seed(2)).tolist()
    out = Engine(model).run([prompt], DecodingConfig(ignore_eos=True, **kw))[0]
    ref = generate(
        model, torch.tensor([prompt]), mask_id=MASK, steps=kw.pop("steps", None) or kw["gen_length"], **kw
    )
    assert out.token_ids == ref[0, 7:].tolist()
    assert out.finish_reason == "length"


def test_batching_invariance_mixed_lengths_and_settings():
    """At temperature 0 a request decodes the same tokens alone or batched with requests of other
    prompt lengths, canvas sizes and settings, also when it is admitted mid-flight."""
    model = tiny_model(seed=4)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 6, 17, 8, 5)]
    configs = [DecodingConfig(ignore_eos=True, **kw) for kw in CONFIGS]
    configs[1] = configs[1].model_copy(update={"temperature": 0.7, "seed": 11})  # own generator per request
    configs[4] = configs[4].model_copy(update={"remasking": "random", "seed": 5})
    alone = [Engine(model).run([p], c)[0].token_ids for p, c in zip(prompts, configs)]
    batched = Engine(model, max_batch_size=8).run(prompts, configs)
    assert [o.token_ids for o in batched] == alone
    trickle = Engine(model, max_batch_size=2)  # requests join as others retire
    assert [o.token_ids for o in trickle.run(prompts, configs)] == alone


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_engine_cache_refreshed_every_step_equals_uncached(cache):
    model = tiny_model(layers=3)
    prompts = [[5, 9, 13, 40], [7, 8, 9, 10, 11, 12, 20, 30, 33]]
    base = DecodingConfig(gen_length=16, block_length=4, threshold=0.7, ignore_eos=True)
    plain = Engine(model).run(prompts, base)
    cached = Engine(model).run(prompts, base.model_copy(update={"cache": cache, "refresh_every": 1}))
    assert [o.token_ids for o in cached] == [o.token_ids for o in plain]


def test_eos_stops_early_and_is_not_returned():
    model = ScriptedLM(letters(3, eos_at=5), left_to_right)
    engine = Engine(model, TOK)
    events = run_one(engine, [5, 6, 7], DecodingConfig(gen_length=16, block_length=4))
    final = events[-1]
    assert final.finished and final.finish_reason == "stop"
    assert final.output.text == "abcde" and final.output.token_ids == TOK.encode("abcde")
    assert final.output.steps == 6  # one token per step, stopped once EOS was final
    assert "".join(e.text for e in events) == "abcde"
    assert sum((e.token_ids for e in events), []) == TOK.encode("abcde")


def test_eos_waits_for_the_tokens_before_it():
    """EOS committed first (most confident) ends the answer only once everything before it is final."""
    model = ScriptedLM(letters(3, eos_at=5), lambda t: 0.999 if t == 3 + 5 else 0.9 - 0.01 * t)
    engine = Engine(model, TOK)
    rid = engine.add_request([5, 6, 7], DecodingConfig(gen_length=8, block_length=8))
    seen = []
    for _ in range(3):
        seen += engine.step()
    assert not any(e.finished for e in seen)  # EOS is in, "abcde" is not yet
    assert engine.active[rid].x[3 + 5] == EOS
    while engine.has_unfinished():
        seen += engine.step()
    assert seen[-1].output.text == "abcde" and seen[-1].output.steps == 6


def test_ignore_eos_decodes_the_whole_canvas():
    model = ScriptedLM(letters(3, eos_at=5), left_to_right)
    out = Engine(model, TOK).run([[5, 6, 7]], DecodingConfig(gen_length=8, block_length=8, ignore_eos=True))[
        0
    ]
    assert (
        out.finish_reason == "length" and out.token_ids[:5] == TOK.encode("abcde") and len(out.token_ids) == 8
    )


def test_max_tokens_truncates_and_stops_early():
    model = tiny_model()
    prompt = [9, 10, 11, 12]
    cfg = DecodingConfig(gen_length=16, block_length=4, threshold=0.6, cache="dual", ignore_eos=True)
    full = Engine(model).run([prompt], cfg)[0]
    short = Engine(model).run([prompt], cfg.model_copy(update={"max_tokens": 5}))[0]
    assert short.token_ids == full.token_ids[:5] and short.finish_reason == "length"
    assert short.steps < full.steps


def test_stop_strings_and_stop_token_ids():
    model = ScriptedLM(letters(3), left_to_right)
    engine = Engine(model, TOK)
    events = run_one(engine, [5, 6, 7], DecodingConfig(gen_length=16, block_length=4, stop=["xyz", "de"]))
    assert events[-1].output.text == "abc" and events[-1].finish_reason == "stop"
    streamed = ""
    for e in events:
        streamed += e.text
        assert "abc".startswith(streamed)  # nothing streamed that is later taken back
    assert streamed == "abc"
    out = engine.run(
        [[5, 6, 7]], DecodingConfig(gen_length=16, block_length=4, stop_token_ids=TOK.encode("c"))
    )[0]
    assert out.text == "ab" and out.finish_reason == "stop"


def test_streaming_emits_each_final_prefix_once():
    rank = {3: 0.95, 1: 0.9, 0: 0.8, 2: 0.7}  # within each block of 4: last and second token first
    model = ScriptedLM(letters(3, eos_at=10), lambda t: rank[(t - 3) % 4])
    engine = Engine(model, TOK)
    events = run_one(engine, [5, 6, 7], DecodingConfig(gen_length=16, block_length=4, steps=8))
    # 2 tokens per step: a block becomes final only at its second step; EOS at 10 ends it in block 3
    assert [e.text for e in events] == ["abcd", "efgh", "ij"]
    assert events[-1].finished and events[-1].output.steps == 6


def test_cancel_frees_the_slot():
    model = tiny_model()
    engine = Engine(model, max_batch_size=1)
    cfg = DecodingConfig(gen_length=16, block_length=4, ignore_eos=True)
    first = engine.add_request([5, 6, 7], cfg)
    second = engine.add_request([8, 9], cfg)
    engine.step()
    assert list(engine.active) == [first]
    engine.cancel(first)
    events = engine.step()
    assert events[0].request_id == first and events[0].finish_reason == "cancelled"
    assert list(engine.active) == [second]
    engine.cancel("no-such-request")
    while engine.has_unfinished():
        events += engine.step()
    assert events[-1].request_id == second and events[-1].finish_reason == "length"


def test_engine_rejects_bad_requests_early():
    engine = Engine(tiny_model())
    with pytest.raises(ValueError, match="max_position_embeddings=96"):
        engine.add_request(list(range(3, 40)), DecodingConfig(gen_length=64, block_length=32))
    with pytest.raises(ValueError, match="cfg_scale"):
        engine.add_request([3, 4], DecodingConfig(gen_length=8, block_length=8, cfg_scale=1.0))
    with pytest.raises(ValueError, match="mask_id=1"):
        engine.add_request([3, MASK], DecodingConfig(gen_length=8, block_length=8))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.add_request([3, 4], DecodingConfig(gen_length=8, block_length=8, stop=["x"]))
    with pytest.raises(ValueError, match="text prompt needs a tokenizer"):
        engine.add_request("hello", DecodingConfig(gen_length=8, block_length=8))
    engine.add_request([3, 4], DecodingConfig(gen_length=8, block_length=8), request_id="a")
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request([3, 4], DecodingConfig(gen_length=8, block_length=8), request_id="a")
    assert not engine.active and len(engine._pending) == 1


def test_async_generate_and_stream():
    model = tiny_model()
    configs = [DecodingConfig(ignore_eos=True, **kw) for kw in CONFIGS[:4]]
    prompts = [[3 + i] * (2 + 3 * i) for i in range(4)]
    expected = [Engine(model).run([p], c)[0].token_ids for p, c in zip(prompts, configs)]

    async def main():
        engine = Engine(model, max_batch_size=8)
        outs = await asyncio.gather(*(engine.generate(p, c) for p, c in zip(prompts, configs)))
        chunks = []
        async for event in engine.stream(prompts[0], configs[0]):
            chunks += event.token_ids
        # a consumer that leaves early cancels its request and frees the slot
        agen = engine.stream(prompts[1], configs[1])
        await agen.__anext__()
        await agen.aclose()
        while engine.has_unfinished():
            await asyncio.sleep(0.01)
        await engine.shutdown()
        return outs, chunks, engine

    outs, chunks, engine = asyncio.run(main())
    assert [o.token_ids for o in outs] == expected
    assert chunks == expected[0]
    assert not engine.active


def test_text_stream_holds_back_partial_stop_strings_and_characters():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes(), stop=["END"])
    euro = list("€".encode())
    assert stream.update([104, 105] + euro[:2], final=False)[1] == "hi"  # incomplete "€" held back
    assert stream.update([104, 105] + euro + [69, 78], final=False)[1] == "€"  # "EN" may start "END"
    ids, text, stopped = stream.update([104, 105] + euro + [69, 78, 68, 33], final=False)
    assert stopped and text == "" and stream.text == "hi€"


def test_incremental_detokenisation_equals_decoding_the_whole_answer(tiny_model_dir):
    """TextStream decodes only the new tail each step; the text equals a full decode at every step
    (byte-level BPE, multi-byte characters split across tokens, special tokens skipped)."""
    from diffmoe.data.tokenizer import load_tokenizer
    from diffmoe.generation import TextStream

    tok, _ = load_tokenizer(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    texts = ["héllo wörld — ünïcode ✓ 数据", "def f(x):\n    return x  # ok", "<|endoftext|>a b  c"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        ids = ids + torch.randint(0, len(tok), (40,), generator=g).tolist()
        stream = TextStream(tok)
        for n in range(1, len(ids) + 1):
            assert stream._text_of(ids[:n]) == tok.decode(ids[:n], skip_special_tokens=True), (text, n)


def test_window_caches_kept_by_the_model_decode_what_the_engine_decodes_itself():
    """The expert-parallel path of masked diffusion: each row's cache outside its window stays with
    the rank it is pinned to; the engine sends ids, masks and positions only (no tensor with a
    head dimension crosses), requests of every cache kind join as others leave, and each decodes
    what the engine decodes holding the caches itself. Finished rows' caches are evicted."""
    from diffmoe.generation.remote_cache import HeldPast

    model = tiny_model(layers=3, seed=4)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 6, 17, 8, 5, 9, 4, 13)]
    configs = [DecodingConfig(ignore_eos=True, **kw) for kw in CONFIGS] + [
        DecodingConfig(gen_length=16, block_length=4, threshold=0.6, cache="dual", temperature=0.7, seed=3),
        DecodingConfig(gen_length=12, block_length=4, cache="dual", vicinity=2, ignore_eos=True),
        DecodingConfig(gen_length=20, block_length=4, cache="prefix", ignore_eos=True),
    ]  # one token per step in the last two: every block has cached steps, rows of unequal caches
    plain = [o.token_ids for o in Engine(model, max_batch_size=5).run(prompts, configs)]
    remote = KeepsCaches(model)
    engine = Engine(remote, max_batch_size=5)
    seen = []
    engine._advance = lambda batch, advance=engine._advance: (  # noqa: E731 - watch the rows' caches
        seen.extend(type(s.past) for s in batch) or advance(batch)
    )
    assert [o.token_ids for o in engine.run(prompts, configs)] == plain
    assert HeldPast in seen  # cached steps ran over caches the ranks keep
    # ids, masks, positions, indices (2-D) and per-row plans crossed: never a key or value (4-D)
    assert all(not isinstance(x, torch.Tensor) or x.dim() == 2 for x in remote.sent)
    assert remote.holds_nothing()  # all finished, all evicted (run() went idle)


def test_a_window_holder_refuses_cached_steps_it_cannot_serve():
    """A cached step for a row the holder has no cache for (evicted, or never fully passed), or
    whose cache length differs from the engine's count, is a clear error, not wrong answers."""
    from diffmoe.generation.remote_cache import HeldPast, RowKeep, WindowHolder

    model = tiny_model()
    holder, ids = WindowHolder(), torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    index = torch.arange(4)[None]
    holder.full(model.model, ids, torch.ones(1, 12, dtype=torch.bool), index, [RowKeep("a", 12, (4, 8))])
    window = ids[:, 4:8]
    fed, pos = torch.ones(1, 4, dtype=torch.bool), torch.arange(4, 8)[None]
    assert holder.cached(model.model, window, fed, pos, index, [HeldPast("a", 8)]).shape == (1, 4, 64)
    with pytest.raises(RuntimeError, match="differ from the engine's"):
        holder.cached(model.model, window, fed, pos, index, [HeldPast("a", 9)])
    holder.evict(["a"])
    with pytest.raises(RuntimeError, match=r"no cache kept here for rows \['a'\]"):
        holder.cached(model.model, window, fed, pos, index, [HeldPast("a", 8)])
