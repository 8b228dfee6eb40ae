"""How the Engine shapes a block-diffusion step: rows that just finished a block cache it apart
rather than pad a batch of one-block rows to two blocks (``block_engine.unpadded_spans``)."""

from __future__ import annotations

import torch

from test_block_diffusion import MASK, VOCAB, tiny


def _row(prompt_len: int, block: int, pending: tuple[int, int] | None):
    from diffmoe.generation import DecodingConfig
    from diffmoe.generation.block_engine import BlockSequence

    cfg = DecodingConfig(gen_length=32, block_length=8, threshold=0.9)
    s = BlockSequence("r", list(range(3, 3 + prompt_len)), cfg, mask_id=MASK, end_ids={2})
    s.block, s.pending = block, pending
    return s


def test_rows_that_finished_a_block_cache_it_apart_when_most_rows_feed_one_block():
    from diffmoe.generation.block_engine import unpadded_spans

    decoding = [_row(8, 2, None) for _ in range(3)]
    finished = _row(8, 3, (16, 24))  # block 2 just became final: fed again with block 3
    group = [*decoding, finished]
    spans = [s.fed_span() for s in group]
    assert spans[3] == (16, 32)
    assert unpadded_spans(group, spans) == [*spans[:3], (16, 24)]  # only the finished block
    assert finished.prefilling((16, 24))  # cached, not denoised, this step
    # as many finished rows as decoding ones: padding costs no more than a step each, kept
    two = [decoding[0], _row(8, 3, (16, 24)), decoding[1], finished]
    assert unpadded_spans(two, [s.fed_span() for s in two]) == [s.fed_span() for s in two]
    # a lone row, and a row feeding a prompt (run in a forward of its own), are left alone
    assert unpadded_spans([finished], [(16, 32)]) == [(16, 32)]
    admitted = _row(40, 5, (0, 40))
    group = [*decoding, admitted]
    assert unpadded_spans(group, [s.fed_span() for s in group])[3] == (0, 48)


def test_staggered_rows_step_one_block_wide_and_decode_what_they_decode_alone():
    """Four rows whose blocks end one step apart (one token per step, prompts 16-19 long): after
    the step that admits them, no forward is wider than a block; each answer is what it is alone."""
    from diffmoe.generation import DecodingConfig, Engine, generate

    model = tiny()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (16, 17, 18, 19)]
    cfg = DecodingConfig(gen_length=24, block_length=8, ignore_eos=True)
    shapes = []
    model.model.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    outs = Engine(model, max_batch_size=4, mask_id=MASK, eos_id=2).run(prompts, cfg)
    assert shapes[0] == (4, 24)  # the prompts' whole blocks and the first answer blocks
    assert {w for _, w in shapes[1:]} == {8}
    for prompt, out in zip(prompts, outs):
        alone = generate(
            model, torch.tensor([prompt]), gen_length=24, block_length=8, mask_id=MASK, eos_id=None
        )
        assert out.token_ids == alone[0, len(prompt) :].tolist()
