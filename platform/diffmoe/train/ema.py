"""``train.ema_decay``: an exponential moving average of the weights, the model a run exports.

At a constant or high learning rate the weights of step k are one noisy sample around where the
run is heading; their average over the last ~1/(1 - decay) steps is steadier and usually better, which
is why diffusion models are commonly released as EMA weights. Each rank averages the parameters it
holds (its own experts under expert parallelism), in fp32, after every optimizer step.

``swapped(model)`` puts the average into the module for a while (the quality check, the
checkpoint's ``ema/`` directory, the export's probe) and restores the trained weights exactly
afterwards, so the optimizer never sees it. Checkpoints keep it in the published layout (``ema/``
beside ``model/``), so it survives resumes across worker counts like the weights do.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

EMA_DIR = "ema"  # a checkpoint's weight average, published layout: what the run exports


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must be in (0, 1)")
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().float().clone() for p in self.params]

    def decay_at(self, step: int) -> float:
        """``decay``, lowered early in a run (min(decay, (1 + step) / (10 + step)), as TensorFlow's
        ExponentialMovingAverage with num_updates) so the average is not dominated by the
        initial weights for its first ~1/(1 - decay) steps."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step``: average <- d * average + (1 - d) * weights."""
        d = self.decay_at(step)
        for avg, p in zip(self.average, self.params):
            avg.lerp_(p.detach().float(), 1.0 - d)

    @torch.no_grad()
    def take_from_module(self) -> None:
        """The module's current weights become the average (used to restore a saved one)."""
        for avg, p in zip(self.average, self.params):
            avg.copy_(p.detach().float())

    @contextmanager
    def swapped(self):
        """The average in the module inside the block; the trained weights, bit for bit, after it."""
        kept = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for avg, p in zip(self.average, self.params):
                    p.copy_(avg.to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for saved, p in zip(kept, self.params):
                    p.copy_(saved)


@contextmanager
def averaged(ema: WeightAverage | None):
    """``ema.swapped()``, or nothing when the run keeps no average."""
    if ema is None:
        yield
    else:
        with ema.swapped():
            yield
