"""Learning-rate schedules as multipliers of the peak lr (for LambdaLR, so DeepSpeed saves them)."""

from __future__ import annotations

import math

from .config import OptimSection, TrainJobConfig


def lr_lambda(cfg: TrainJobConfig):
    """The run's multiplier by step: the schedule spans ``optim.schedule_steps`` when set (a run
    stopped early, or trained in resumed segments, follows the full budget's learning rates),
    else ``train.max_steps``."""
    span = cfg.optim.schedule_steps or cfg.train.max_steps
    return lambda step: lr_multiplier(step, cfg.optim, span)


def lr_multiplier(step: int, optim: OptimSection, max_steps: int) -> float:
    """Linear warmup, then cosine, warmup-stable-decay (linear decay over the last
    ``decay_fraction`` of steps) or constant, ending at ``min_lr_ratio``."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    floor = optim.min_lr_ratio
    span = max(max_steps - optim.warmup_steps, 1)
    progress = min(max(step - optim.warmup_steps, 0) / span, 1.0)
    if optim.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if optim.schedule == "wsd":
        decay_start = 1.0 - optim.decay_fraction
        if progress <= decay_start:
            return 1.0
        return 1.0 - (1 - floor) * (progress - decay_start) / optim.decay_fraction
    return 1.0
