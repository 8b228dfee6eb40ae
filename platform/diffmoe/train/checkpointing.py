"""Training checkpoints: DeepSpeed's native state plus a world-size-independent copy of the weights.

A checkpoint directory holds
- ``deepspeed/``: ``engine.save_checkpoint`` output (model, ZeRO optimizer shards, scheduler and
  one file per expert). Exact resume, but only for the same data- and expert-parallel sizes.
- ``model/``: the consolidated weights in the published Hugging Face layout (all experts), streamed
  to rank 0's writer one tensor at a time (no rank holds the whole model).
- ``ema/``: with ``train.ema_decay``, the weight average in the same layout (``ema.py``).
- ``trainer_state.json``: step, epoch, the data stream position (``sample_order.py``), world and EP size,
  and the MLflow run that wrote it (a resubmitted job tags its new run ``resumed_from_run_id``).

Resuming with the same sizes loads ``deepspeed/``; with different sizes it loads ``model/`` and
fast-forwards the lr schedule, and the AdamW moments restart from zero (logged as
``restored: weights``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from diffmoe.model.checkpoint import ShardWriter
from diffmoe.parallel import iter_published_state, load_published_directory

from .ema import EMA_DIR

STATE_FILE = "trainer_state.json"
DS_TAG = "ckpt"


def save_checkpoint(engine, model, state: dict[str, Any], rank: int, directory: Path, ema=None) -> None:
    """Collective: every rank calls it with its own local ``directory``. With a weight average
    (``ema``) its published-layout copy goes to ``ema/``."""
    engine.save_checkpoint(str(directory / "deepspeed"), tag=DS_TAG)
    digest = _write_published(model, rank, directory / "model", fingerprint=True)
    if ema is not None:
        with ema.swapped():
            _write_published(model, rank, directory / EMA_DIR, fingerprint=False)
    if rank == 0:
        state = {**state, "weights_fingerprint": digest}
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2))


def _write_published(model, rank: int, directory: Path, fingerprint: bool) -> str | None:
    """Stream the weights in the published layout to rank 0's writer; with ``fingerprint`` rank 0
    gets their digest (the resume check reads the trained weights' only)."""
    writer = ShardWriter(directory) if rank == 0 else None
    digest = hashlib.sha256() if fingerprint and writer is not None else None
    for name, tensor in iter_published_state(model):  # collective: every rank runs it to the end
        if writer is not None:
            if digest is not None:
                _digest_update(digest, name, tensor)
            writer.add(name, tensor)
    if writer is not None:
        writer.close(model.config)
    return None if digest is None else digest.hexdigest()


def restore_average(ema, model, directory: Path) -> bool:
    """Load the checkpoint's ``ema/`` into the average (this rank's share); False when it has none."""
    if not (directory / EMA_DIR).is_dir():
        return False
    with ema.swapped():  # the module is the scratch space; the trained weights come back after
        load_published_directory(model, directory / EMA_DIR)
        ema.take_from_module()
    return True


def _digest_update(digest, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach()
    t = (t.float() if t.is_floating_point() else t).cpu().contiguous()
    digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy())


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, shape and values (floats as fp32), in key order.

    World-size-independent (it reads the gathered published layout) and sensitive to where each
    value sits: a sum such as sum |w| could not tell two swapped experts, rows or layers apart.
    ``save_checkpoint`` computes the same digest while it streams the weights.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        _digest_update(digest, name, state[name])
    return digest.hexdigest()


def check_fingerprint(model, state: dict[str, Any]) -> None:
    """After a restore, the weights must be exactly what was saved, whatever the new world size."""
    want = state["weights_fingerprint"]
    digest, total = hashlib.sha256(), 0.0
    for name, tensor in iter_published_state(model):  # collective, sorted keys
        if isinstance(want, int | float):  # written before fingerprints were hashes: sum of |w|
            total += float(tensor.double().abs().sum())
        else:
            _digest_update(digest, name, tensor)
    if isinstance(want, int | float):
        got = total
        ok = abs(got - want) <= 1e-6 * max(abs(want), 1.0)
    else:
        got = digest.hexdigest()
        ok = got == want
    if not ok:
        raise RuntimeError(f"restored weights differ from the checkpoint (fingerprint {got} != {want})")


def read_state(directory: Path, world_size: int, ep_size: int) -> dict[str, Any]:
    """The saved trainer state, with ``restored`` set to how this run can resume from it."""
    state = json.loads((directory / STATE_FILE).read_text())
    same_shape = state.get("world_size") == world_size and state.get("ep_size") == ep_size
    state["restored"] = (
        "deepspeed" if same_shape and (directory / "deepspeed" / DS_TAG).is_dir() else "weights"
    )
    return state


def load_weights_before_engine(model, directory: Path, state: dict[str, Any]) -> None:
    """Weights must be in place before ``deepspeed.initialize``: ZeRO copies them into its fp32
    partitions there, and later writes to the module would be overwritten by the next step."""
    if state["restored"] == "weights":
        load_published_directory(model, directory / "model")


def restore_engine(engine, directory: Path, state: dict[str, Any]) -> None:
    if state["restored"] == "deepspeed":
        path, _ = engine.load_checkpoint(str(directory / "deepspeed"), tag=DS_TAG)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory / 'deepspeed'}")
    else:
        for _ in range(state["step"]):
            engine.lr_scheduler.step()
