"""Masked-diffusion objective: masking process, loss weights, SFT masking, a tiny model overfits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffmoe.diffusion import (
    ObjectiveConfig,
    diffusion_loss,
    forward_process,
    pretrain_loss,
    random_length,
    sample_mask_prob,
    sft_loss,
)
from diffmoe.model import LLaDAMoEModelLM, named_config

MASK = 1


def test_antithetic_mask_probabilities_cover_the_unit_interval():
    p = sample_mask_prob(8, eps=1e-3, antithetic=True, generator=torch.Generator().manual_seed(0))
    assert p.min() >= 1e-3 and p.max() <= 1.0
    gaps = (p.sort().values.diff()).tolist()
    assert all(abs(g - gaps[0]) < 1e-5 for g in gaps)  # evenly spaced: (u + i/B) mod 1


def test_forward_process_masks_at_rate_p_and_respects_maskable():
    ids = torch.randint(3, 100, (4, 4000))
    p = torch.tensor([0.1, 0.5, 0.9, 1.0])
    noisy, masked = forward_process(ids, MASK, p, generator=torch.Generator().manual_seed(0))
    rates = masked.float().mean(1)
    assert torch.allclose(rates, p, atol=0.03)
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], MASK))
    assert torch.equal(noisy[~masked], ids[~masked])
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, 100:] = True
    _, masked = forward_process(ids, MASK, p, maskable)
    assert not masked[:, :100].any()


def test_only_masked_positions_contribute_with_weight_one_over_p():
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (2, 6))
    masked = torch.zeros(2, 6, dtype=torch.bool)
    masked[0, 1] = masked[1, 3] = masked[1, 4] = True
    p = torch.tensor([0.25, 0.5])
    logits = torch.randn(2, 6, 10)
    loss, _ = pretrain_loss(logits, ids, masked, p)
    ce = F.cross_entropy(logits.view(-1, 10), ids.view(-1), reduction="none").view(2, 6)
    expected = (ce[0, 1] / 0.25 + ce[1, 3] / 0.5 + ce[1, 4] / 0.5) / 12
    torch.testing.assert_close(loss, expected)
    # Changing logits at an unmasked position changes nothing.
    logits2 = logits.clone()
    logits2[0, 0] += 5.0
    torch.testing.assert_close(pretrain_loss(logits2, ids, masked, p)[0], loss)


def test_sft_loss_is_response_only_and_normalised_by_response_length():
    ids = torch.randint(0, 10, (2, 6))
    response = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    p = torch.tensor([0.5, 1.0])
    _, masked = forward_process(ids, MASK, p, maskable=response, generator=torch.Generator().manual_seed(0))
    assert not (masked & ~response).any()
    logits = torch.randn(2, 6, 10)
    loss, _ = sft_loss(logits, ids, masked, p, response)
    ce = F.cross_entropy(logits.view(-1, 10), ids.view(-1), reduction="none").view(2, 6)
    expected = ((ce[0] * masked[0]).sum() / (0.5 * 4) + (ce[1] * masked[1]).sum() / (1.0 * 2)) / 2
    torch.testing.assert_close(loss, expected)
    bad = masked.clone()
    bad[0, 0] = True
    with pytest.raises(ValueError, match="prompt token"):
        sft_loss(logits, ids, bad, p, response)


def test_sft_diffusion_loss_never_scores_prompt():
    torch.manual_seed(0)
    model = LLaDAMoEModelLM(named_config("tiny"))
    ids = torch.randint(3, 1024, (2, 12))
    response = torch.zeros(2, 12, dtype=torch.bool)
    response[:, 8:] = True
    terms = diffusion_loss(
        model, ids, mask_id=MASK, response_mask=response, generator=torch.Generator().manual_seed(1)
    )
    terms.total.backward()
    # The prompt is never masked, so its embedding rows receive no gradient through the loss target.
    assert terms.num_masked <= int(response.sum())


def test_random_length_crops_about_one_percent_of_batches():
    g = torch.Generator().manual_seed(0)
    lengths = [random_length(64, 0.01, g) for _ in range(5000)]
    cropped = sum(n < 64 for n in lengths)
    assert 20 < cropped < 90 and min(lengths) >= 1
    assert random_length(64, 0.0, g) == 64


def test_tiny_model_overfits_one_fixed_batch():
    torch.manual_seed(0)
    model = LLaDAMoEModelLM(named_config("tiny"))
    ids = torch.randint(3, 1024, (4, 32))
    objective = ObjectiveConfig(random_length_prob=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def evaluate():
        with torch.no_grad():
            return diffusion_loss(
                model, ids, mask_id=MASK, objective=objective, generator=torch.Generator().manual_seed(7)
            ).diffusion.item()

    start = evaluate()
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        terms = diffusion_loss(model, ids, mask_id=MASK, objective=objective, generator=g)
        opt.zero_grad()
        terms.total.backward()
        opt.step()
    end = evaluate()
    assert terms.aux_loss is not None and terms.z_loss is not None
    assert end < 0.6 * start, (start, end)


def test_causal_twin_uses_next_token_loss_on_responses_only():
    from diffmoe.diffusion import training_loss

    torch.manual_seed(0)
    model = LLaDAMoEModelLM(named_config("tiny", causal=True))
    ids = torch.randint(3, 1024, (2, 12))
    response = torch.zeros(2, 12, dtype=torch.bool)
    response[:, 8:] = True
    terms = training_loss(model, ids, mask_id=MASK, response_mask=response)
    logits = model(ids).logits
    expected = F.cross_entropy(logits[:, 7:11].reshape(-1, 1024), ids[:, 8:12].reshape(-1))
    torch.testing.assert_close(terms.diffusion, expected, atol=1e-5, rtol=1e-5)
    assert terms.num_masked == 8
