"""Block-diffusion training objective (LLaDA2.x) against a naive reference written here: explicit
loops over blocks, each noisy block run with exactly the earlier clean blocks in front of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffmoe.diffusion.blocks import BlockObjectiveConfig, block_diffusion_loss, block_diffusion_mask
from diffmoe.model import LLaDA2MoeModelLM, llada2_named_config
from diffmoe.rng import device_generator

MASK, VOCAB = 1, 40


def tiny() -> LLaDA2MoeModelLM:
    torch.manual_seed(0)
    return LLaDA2MoeModelLM(llada2_named_config("llada2-tiny", vocab_size=VOCAB, mask_token_id=MASK)).eval()


def reference(model, x, bl, seed, t_min, t_max, response=None):
    """(loss, per-masked CE list, confidence) with the same random draws, block by block."""
    g = device_generator("cpu", seed)
    b, n = x.shape
    p = t_min + (t_max - t_min) * torch.rand(b, generator=g)
    masked = torch.rand(x.shape, generator=g) < p[:, None]
    if response is not None:
        masked &= response
    noisy = torch.where(masked, torch.full_like(x, MASK), x)
    total, ces, entropies = 0.0, [], []
    for r in range(b):
        for start in range(0, n, bl):
            end = min(start + bl, n)
            seq = torch.cat([x[r, :start], noisy[r, start:end]])[None]
            blocks = [i // bl for i in range(end)]
            m = torch.tensor([[blocks[k] <= blocks[q] for k in range(end)] for q in range(end)])
            logits = model(seq, attention_mask=m[None, None], position_ids=torch.arange(end)[None]).logits[0]
            for i in range(start, end):
                if masked[r, i]:
                    row = logits[i].float()
                    ce = float(F.cross_entropy(row[None], x[r, i : i + 1]))
                    ces.append(ce)
                    total += ce / float(p[r])
                    if int(row.argmax()) == int(x[r, i]):
                        lp = row.log_softmax(-1)
                        entropies.append(float(-(lp.exp() * lp).sum()))
    scored = x.numel() if response is None else int(response.sum())
    conf = sum(entropies) / len(entropies) if entropies else 0.0
    return total / scored, ces, conf


@pytest.mark.parametrize("attention", ["dense", "flex"])
@pytest.mark.parametrize("length,bl", [(12, 4), (10, 4), (8, 8)])
def test_loss_equals_the_blockwise_reference(length, bl, attention):
    model = tiny()
    x = torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
    obj = BlockObjectiveConfig(
        block_length=bl, t_min=0.3, t_max=0.8, confidence_beta=0.5, attention=attention, weighting="elbo"
    )
    with torch.set_grad_enabled(attention == "dense"):  # flex has no backward on CPU (GPU: gpu_check)
        got = block_diffusion_loss(
            model, x, mask_id=MASK, objective=obj, generator=device_generator("cpu", 7)
        )
    want, ces, conf = reference(model, x, bl, 7, 0.3, 0.8)
    assert got.num_masked == len(ces) > 0
    assert float(got.diffusion) == pytest.approx(want, rel=1e-5)
    assert float(got.masked_ce) == pytest.approx(sum(ces) / len(ces), rel=1e-5)
    assert float(got.confidence) == pytest.approx(conf, rel=1e-4, abs=1e-6)
    assert float(got.total) == pytest.approx(want + 0.5 * conf, rel=1e-5)
    if attention == "dense":
        got.total.backward()  # the CAP term is differentiable with the rest
        assert model.lm_head.weight.grad is not None


def test_sft_never_masks_the_prompt_and_token_mean_weighting():
    model = tiny()
    x = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    response = torch.zeros(3, 12, dtype=torch.bool)
    response[:, 5:] = True
    obj = BlockObjectiveConfig(block_length=4, t_min=0.9, t_max=1.0, weighting="token_mean")
    got = block_diffusion_loss(
        model, x, mask_id=MASK, objective=obj, response_mask=response, generator=device_generator("cpu", 3)
    )
    _, ces, _ = reference(model, x, 4, 3, 0.9, 1.0, response)
    assert got.num_masked == len(ces) and got.num_masked <= int(response.sum())
    assert float(got.diffusion) == pytest.approx(sum(ces) / len(ces), rel=1e-5)


def test_mask_parts_and_documents():
    m = block_diffusion_mask(4, 2)[0, 0].int().tolist()
    # rows: noisy 0..3, clean 0..3; columns likewise
    assert m[0] == [1, 1, 0, 0, 0, 0, 0, 0]  # noisy block 0: itself only
    assert m[2] == [0, 0, 1, 1, 1, 1, 0, 0]  # noisy block 1: itself + clean block 0
    assert m[4] == [0, 0, 0, 0, 1, 1, 0, 0]  # clean block 0: block-causal, never noisy
    assert m[7] == [0, 0, 0, 0, 1, 1, 1, 1]
    # packed rows: a document's loss terms do not depend on the other document's tokens
    model = tiny()
    docs = torch.tensor([[0] * 6 + [1] * 6])
    x = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    y = x.clone()
    y[0, :6] = torch.randint(3, VOCAB, (6,), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([x, x], 1)
    mask = block_diffusion_mask(12, 4, docs)
    pos = torch.arange(12).repeat(2)[None]
    a = model(torch.cat([x, x], 1), attention_mask=mask, position_ids=pos).logits
    b = model(torch.cat([y, y], 1), attention_mask=mask, position_ids=pos).logits
    assert torch.allclose(a[0, 6:12], b[0, 6:12], atol=1e-5) and ids.shape == (1, 24)
    assert not torch.allclose(a[0, :6], b[0, :6], atol=1e-5)
    with pytest.raises(ValueError, match="t_min"):
        block_diffusion_loss(model, x, mask_id=MASK, objective=BlockObjectiveConfig(t_min=0.9, t_max=0.2))
    # without documents every micro-batch shares one mask (built once); with them each gets its own
    from diffmoe.diffusion.blocks import _two_half_mask

    one, two = (_two_half_mask(12, 4, None, "cpu", "dense", 3) for _ in range(2))
    assert one.data_ptr() == two.data_ptr() and one.shape == (3, 1, 24, 24)
    assert torch.equal(one[0, 0], block_diffusion_mask(12, 4)[0, 0])
    assert _two_half_mask(12, 4, docs, "cpu", "dense", 1).data_ptr() != one.data_ptr()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_equals_the_dense_mask_with_documents():
    """The block-sparse path (what GPUs run, compiled, where gpu_check also compares gradients)
    gives the dense path's hidden states and loss on packed rows, 2L = 160 spanning two flex tiles
    with partial ones; a wrong-sized BlockMask is refused."""
    from diffmoe.diffusion.blocks import block_diffusion_block_mask, use_flex

    docs = torch.tensor([[0] * 30 + [1] * 50, [0] * 80])
    x = torch.randint(3, VOCAB, (2, 80), generator=torch.Generator().manual_seed(4))
    ids, pos = torch.cat([x, x], 1), torch.arange(80).repeat(2)[None]
    model = tiny()
    with torch.no_grad():
        dense = model(ids, attention_mask=block_diffusion_mask(80, 8, docs), position_ids=pos).logits
        flex = model(ids, attention_mask=block_diffusion_block_mask(80, 8, docs), position_ids=pos).logits
        assert torch.allclose(dense, flex, atol=1e-5)
        losses = [
            float(
                block_diffusion_loss(
                    model,
                    x,
                    mask_id=MASK,
                    objective=BlockObjectiveConfig(block_length=8, attention=attention),
                    document_ids=docs,
                    generator=device_generator("cpu", 5),
                ).total
            )
            for attention in ("dense", "flex")
        ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert not use_flex("auto", "cpu") and use_flex("auto", "cuda") and not use_flex("dense", "cuda")
    wrong = block_diffusion_block_mask(40, 8)  # (80, 80): not this forward's 2L = 160
    with pytest.raises(ValueError, match="BlockMask over"):
        model(ids, attention_mask=wrong, position_ids=pos)


def test_validation_loss_of_a_block_diffusion_model_is_the_blockwise_bound():
    """``validation_loss_sum`` dispatches on the model's family: for LLaDA2 it is sum CE / p over the
    masked tokens, each block seeing only the clean blocks before it (checked block by block)."""
    from diffmoe.config import model_family
    from diffmoe.diffusion import sample_mask_prob, validation_loss_sum

    model = tiny()
    model.config.block_length = 4
    assert model_family(model.config) == "block_diffusion"
    x = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        nats, tokens = validation_loss_sum(model, x, mask_id=MASK, generator=device_generator("cpu", 9))
    g = device_generator("cpu", 9)
    p = sample_mask_prob(2, 1e-3, True, g)
    masked = torch.rand(x.shape, generator=g) < p[:, None]
    noisy = torch.where(masked, torch.full_like(x, MASK), x)
    want = 0.0
    with torch.no_grad():
        for r in range(2):
            for start in range(0, 10, 4):
                end = min(start + 4, 10)
                seq = torch.cat([x[r, :start], noisy[r, start:end]])[None]
                m = torch.tensor([[k // 4 <= q // 4 for k in range(end)] for q in range(end)])[None, None]
                logits = model(seq, attention_mask=m, position_ids=torch.arange(end)[None]).logits[0]
                for i in range(start, end):
                    if masked[r, i]:
                        want += float(F.cross_entropy(logits[i][None].float(), x[r, i : i + 1])) / float(p[r])
    assert tokens == 20 and float(nats) == pytest.approx(want, rel=1e-5)
    # the training jobs' entry point dispatches a block-diffusion model to the block objective
    from diffmoe.diffusion import ObjectiveConfig, training_loss

    obj = ObjectiveConfig(aux_loss_coef=0.0, z_loss_coef=0.0)
    via_jobs = training_loss(
        model, x, mask_id=MASK, objective=obj, generator=torch.Generator().manual_seed(3)
    )
    direct = block_diffusion_loss(model, x, mask_id=MASK, generator=torch.Generator().manual_seed(3))
    assert float(via_jobs.total) == pytest.approx(float(direct.total), rel=1e-6)
