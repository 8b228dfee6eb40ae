"""What a training step does with a NaN or infinite loss (``train.on_nonfinite``).

Without a check, a non-finite loss poisons the weights through backward while the metrics logger
quietly drops the NaN from MLflow and stdout: the run looks healthy and learns nothing. ``stop``
fails the run naming the step; ``skip`` drops that micro-batch (no backward, no optimizer update
from it), counts it, and fails only once more than ``train.max_nonfinite_skips`` were dropped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or infinite and ``train.on_nonfinite`` says to stop."""


def loss_is_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank. Collective when distributed: all ranks must agree
    to skip, or the next collective (expert all-to-all, gradient reduction) would pair different calls."""
    bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def handle_nonfinite(policy: str, max_skips: int, step: int, skipped: int) -> int:
    """Apply the policy to a non-finite micro-batch of optimizer step ``step`` (1-based); returns
    the run's new count of skipped micro-batches or raises ``NonFiniteLossError``."""
    where = f"non-finite training loss (NaN or inf, on at least one rank) at step {step}"
    if policy == "stop":
        raise NonFiniteLossError(
            f"{where}; train.on_nonfinite=stop ends the run (set it to 'skip' to drop such micro-batches)"
        )
    if policy != "skip":
        raise ValueError(f"train.on_nonfinite must be 'stop' or 'skip', got {policy!r}")
    skipped += 1
    if skipped > max_skips:
        raise NonFiniteLossError(
            f"{where}: {skipped} micro-batches skipped in this run, more than "
            f"train.max_nonfinite_skips={max_skips}"
        )
    return skipped
