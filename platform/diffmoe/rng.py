"""Random generators made on the device of the tensors they fill.

A CUDA random op refuses a CPU generator (and the reverse), so a seeded draw written for the CPU
fails at the first step on a GPU. Every generator the library creates comes from
:func:`device_generator`, which records the device it was made for; tests use that record to prove,
on a CPU-only machine, that no draw uses a generator made for some other (or no stated) device.
"""

from __future__ import annotations

import weakref

import torch

# generator -> the device it was made for (weak: generators die with their request / step)
_MADE_FOR: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def device_generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """A generator on ``device``: seeded with ``seed``, or from OS entropy when it is None."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    _MADE_FOR[gen] = device
    return gen


def made_for(gen: torch.Generator) -> torch.device | None:
    """The device ``gen`` was made for by :func:`device_generator`; None for any other generator."""
    return _MADE_FOR.get(gen)


def check_generator(gen: torch.Generator | None, device: torch.device | str, what: str) -> None:
    """Raise a clear error when a caller's generator cannot draw on ``device``."""
    if gen is not None and torch.device(gen.device).type != torch.device(device).type:
        raise ValueError(
            f"{what}: the generator is on {gen.device} but the tensors are on {device}; "
            f"make it with torch.Generator(device={str(device)!r}) (or diffmoe.rng.device_generator)"
        )
