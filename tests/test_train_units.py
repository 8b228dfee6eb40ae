"""Training-loop logic without Ray: document masks, non-finite losses, checkpoint fingerprints."""

from __future__ import annotations

import pytest
import torch

from diffmoe.model import LLaDAMoEModelLM, named_config
from diffmoe.train.config import TrainJobConfig
from diffmoe.train.loop import ObjectiveModule


def _tiny(seed: int = 0, **overrides) -> LLaDAMoEModelLM:
    torch.manual_seed(seed)
    return LLaDAMoEModelLM(named_config("tiny", vocab_size=128, **overrides))


def _packed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (4, 32), generator=gen)
    seg = torch.zeros(4, 32, dtype=torch.long)
    seg[:, 10:] = 1  # two documents packed per row, as data/pack.py writes them
    seg[:, 25:] = 2
    return {"input_ids": ids, "segment_ids": seg}


@pytest.mark.parametrize("random_length_prob", [0.0, 1.0])  # 1.0: every batch cropped
def test_document_mask_trains_a_step(random_length_prob):
    cfg = TrainJobConfig.model_validate(
        {"train": {"document_mask": True, "objective": {"random_length_prob": random_length_prob}}}
    )
    model = _tiny()
    objective = ObjectiveModule(model, cfg)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.lm_head.weight.detach().clone()
    terms = objective(_packed_batch(), torch.Generator().manual_seed(1))
    terms.total.backward()
    optim.step()
    assert torch.isfinite(terms.total) and terms.num_masked > 0
    assert not torch.equal(before, model.lm_head.weight)
    # The mask reached attention: without it the same draws give a different loss.
    plain = ObjectiveModule(model, TrainJobConfig.model_validate({"train": {"document_mask": False}}))
    with torch.no_grad():
        a = objective(_packed_batch(), torch.Generator().manual_seed(2)).diffusion
        b = plain(_packed_batch(), torch.Generator().manual_seed(2)).diffusion
    assert not torch.allclose(a, b)


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped_and_counted():
    from diffmoe.train.nonfinite import NonFiniteLossError, handle_nonfinite, loss_is_finite

    model = _tiny()
    objective = ObjectiveModule(model, TrainJobConfig())
    batch = {"input_ids": _packed_batch()["input_ids"]}
    assert loss_is_finite(objective(batch, torch.Generator().manual_seed(0)).total)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")  # one poisoned parameter
    terms = objective(batch, torch.Generator().manual_seed(0))
    assert not loss_is_finite(terms.total)
    with pytest.raises(NonFiniteLossError, match="at step 7; train.on_nonfinite=stop"):
        handle_nonfinite("stop", 100, 7, 0)
    assert handle_nonfinite("skip", 2, 7, 0) == 1
    assert handle_nonfinite("skip", 2, 8, 1) == 2
    with pytest.raises(NonFiniteLossError, match="step 9: 3 micro-batches skipped.*max_nonfinite_skips=2"):
        handle_nonfinite("skip", 2, 9, 2)


def test_checkpoint_fingerprint_sees_permuted_experts():
    from diffmoe.train.checkpointing import fingerprint

    state = _tiny().state_dict()  # published layout: one entry per expert
    swapped = dict(state)
    for part in ("gate_proj", "up_proj", "down_proj"):
        a, b = (f"model.layers.0.mlp.experts.{j}.{part}.weight" for j in (0, 1))
        swapped[a], swapped[b] = state[b], state[a]
    assert sum(t.abs().sum() for t in swapped.values()) == sum(t.abs().sum() for t in state.values())
    assert fingerprint(swapped) != fingerprint(state)
    assert fingerprint({k: v.clone() for k, v in state.items()}) == fingerprint(state)
    rounded = {k: v.bfloat16() for k, v in state.items()}  # same values, other dtype: same print
    assert fingerprint(rounded) == fingerprint({k: v.float() for k, v in rounded.items()})
