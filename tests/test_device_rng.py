"""Random draws use generators on the device of the tensors they fill (GPU-fatal if not).

``GeneratorDeviceCheck`` turns the GPU failure into a CPU one: a generator not made for the target
tensor's device by ``diffmoe.rng.device_generator`` fails the draw. Each path that draws at random is
run under it: the training objective, validation-style fixed draws, ``generate`` with sampling, and
Engine steps for sampled and seeded requests (diffusion and the AR twin).
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from device_check import GeneratorDeviceCheck
from diffmoe.diffusion import ObjectiveConfig, diffusion_loss, training_loss
from diffmoe.generation import DecodingConfig, Engine, generate
from diffmoe.model import LLaDAMoEModelLM, named_config
from diffmoe.rng import check_generator, device_generator, made_for

VOCAB = 64
PLATFORM = Path(__file__).resolve().parents[1] / "platform" / "diffmoe"


def tiny(causal: bool = False) -> LLaDAMoEModelLM:
    torch.manual_seed(0)
    cfg = named_config("tiny", vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=96)
    cfg.causal = causal
    return LLaDAMoEModelLM(cfg).eval()


def test_the_check_fails_on_a_generator_not_made_for_the_device():
    """Without this the other tests could not fail: a bare torch.Generator() is refused."""
    ids = torch.randint(3, VOCAB, (2, 16))
    with pytest.raises(AssertionError, match="not made by"), GeneratorDeviceCheck():
        torch.rand(ids.shape, generator=torch.Generator(), device=ids.device)
    with pytest.raises(AssertionError, match="not made by"), GeneratorDeviceCheck():
        diffusion_loss(tiny(), ids, mask_id=1, generator=torch.Generator().manual_seed(0))


def test_training_objective_draws_on_the_batch_device():
    model = tiny().train()
    ids = torch.randint(3, VOCAB, (4, 32))
    objective = ObjectiveConfig(random_length_prob=1.0)  # the random crop draws too
    with GeneratorDeviceCheck() as check:
        terms = diffusion_loss(
            model, ids, mask_id=1, objective=objective, generator=device_generator(ids.device, 3)
        )
        terms.total.backward()
        resp = torch.zeros_like(ids, dtype=torch.bool)
        resp[:, 8:] = True
        training_loss(model, ids, mask_id=1, response_mask=resp, generator=device_generator(ids.device, 4))
    assert {name for name, _ in check.draws} >= {"rand", "randint"}


def test_sampled_generate_draws_on_the_model_device():
    model = tiny()
    prompt = torch.randint(3, VOCAB, (2, 8))
    with GeneratorDeviceCheck() as check:
        generate(
            model,
            prompt,
            gen_length=16,
            steps=8,
            block_length=8,
            temperature=0.7,
            remasking="random",
            mask_id=1,
            generator=device_generator(prompt.device, 0),
        )
    assert len(check.draws) >= 16  # Gumbel noise and random confidence at each of the 8 steps


@pytest.mark.parametrize("causal", [False, True], ids=["diffusion", "autoregressive"])
def test_engine_steps_draw_with_per_request_generators_on_the_model_device(causal):
    engine = Engine(tiny(causal), max_batch_size=4, mask_id=1, eos_id=2)
    seeded = DecodingConfig(gen_length=8, steps=4, block_length=8, temperature=0.8, seed=11, ignore_eos=True)
    unseeded = DecodingConfig(gen_length=8, steps=4, block_length=8, temperature=0.8, ignore_eos=True)
    with GeneratorDeviceCheck() as check:
        outs = engine.run([[5, 6, 7], [8, 9]], [seeded, unseeded])
    assert len(check.draws) > 0 and all(len(o.token_ids) == 8 for o in outs)
    # a seeded request is reproducible with its own device generator
    again = Engine(tiny(causal), max_batch_size=4, mask_id=1, eos_id=2).run([[5, 6, 7]], [seeded])[0]
    assert again.token_ids == outs[0].token_ids


def test_device_generator_records_its_device_and_seed():
    a, b = device_generator("cpu", 5), device_generator(torch.device("cpu"), 5)
    assert made_for(a) == torch.device("cpu") and made_for(torch.Generator()) is None
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_a_mismatched_caller_generator_is_a_clear_error():
    fake_cuda = SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match="generator is on cuda:0 but the tensors are on cpu"):
        check_generator(fake_cuda, torch.device("cpu"), "generate")
    check_generator(device_generator("cpu"), "cpu", "generate")
    check_generator(None, "cpu", "generate")


def test_no_library_code_makes_a_generator_except_through_device_generator():
    """Every generator in diffmoe is made for a stated device: no bare torch.Generator() outside rng.py."""
    offenders = []
    for path in PLATFORM.rglob("*.py"):
        if path.name == "rng.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "Generator"
            ):
                offenders.append(f"{path.relative_to(PLATFORM)}:{node.lineno}")
    assert not offenders, offenders
