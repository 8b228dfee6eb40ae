"""A test helper that makes device-mismatched random draws fail on a CPU-only machine.

On a GPU, ``torch.rand(..., device="cuda", generator=cpu_generator)`` raises; on the CPU every
tensor and generator is on the CPU, so the same bug passes unseen. Inside
:class:`GeneratorDeviceCheck`, every random op that is given a generator must have one made by
``diffmoe.rng.device_generator`` for the device of the tensor it fills: a bare ``torch.Generator()``
or one made for another device fails here as it would fail on a GPU.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from diffmoe.rng import made_for

# ops that create a tensor (target device: their device= argument, else the default device)
_CREATE = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal}
# ops that fill or sample from an input tensor (target device: that tensor's)
_FROM_INPUT = {
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
    torch.multinomial,
    torch.bernoulli,
    torch.poisson,
    torch.Tensor.uniform_,
    torch.Tensor.normal_,
    torch.Tensor.bernoulli_,
    torch.Tensor.exponential_,
    torch.Tensor.random_,
    torch.Tensor.geometric_,
    torch.Tensor.cauchy_,
    torch.Tensor.log_normal_,
    torch.Tensor.multinomial,
    torch.Tensor.bernoulli,
}


class GeneratorDeviceCheck(TorchFunctionMode):
    """Records every seeded random draw and raises on one whose generator is not made for its device."""

    def __init__(self):
        super().__init__()
        self.draws: list[tuple[str, torch.device]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gen = kwargs.get("generator")
        if gen is not None and (func in _CREATE or func in _FROM_INPUT):
            if func in _CREATE:
                target = torch.device(kwargs.get("device") or torch.get_default_device())
            else:
                target = args[0].device
            made = made_for(gen)
            name = getattr(func, "__name__", str(func))
            if made is None:
                raise AssertionError(
                    f"{name}: generator not made by diffmoe.rng.device_generator (so not made for {target})"
                )
            if made.type != target.type or gen.device.type != target.type:
                raise AssertionError(f"{name}: generator made for {made} fills a tensor on {target}")
            self.draws.append((name, target))
        return func(*args, **kwargs)
