"""One rank's share of the expert-parallel model: allocate it, initialise it, load and gather it.

A 7B model at expert-parallel size E must never be whole on one rank: ``build_training_model``
builds on the meta device and ``allocate`` gives memory only to what this rank owns (the replicated
dense parts and 1/E of each layer's routed experts). Everything else here speaks the published
Hugging Face key names through ``published_views``, the map from each published key this rank
owns to the tensor holding it (views into the stacked expert parameters), so that
- ``initialize`` seeds every published tensor from its own name: the initial weights are the same
  whatever the expert-parallel size (and equal to ``initialize`` on the plain model);
- ``load_published_directory`` reads a safetensors checkpoint shard by shard and only the tensors
  this rank owns;
- ``iter_published_state`` streams the whole model, one tensor at a time and in key order, broadcasting
  each expert from the rank that owns it (collective), so checkpoints and exports are written shard
  by shard and no rank ever holds every expert.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from diffmoe.model import LLaDA2MoeConfig, lm_class
from diffmoe.rng import device_generator

from .moe import _EXPERTS, _GATE, ep_rank_and_size


def _published_key(key: str, first_expert: int, bias_key: str) -> str:
    if _EXPERTS in key:
        prefix, rest = key.split(_EXPERTS + ".")
        j, tail = rest.split(".", 1)
        return f"{prefix}mlp.experts.{first_expert + int(j)}.{tail}"
    return key.replace(_GATE + ".wg.weight", "mlp.gate.weight").replace(_GATE + ".routing_bias", bias_key)


def published_views(model: nn.Module) -> dict[str, torch.Tensor]:
    """Published key -> the tensor of this rank that holds it (shares storage with the parameter),
    for every key this rank owns. Works for the plain model too (its keys are already published)."""
    ep_rank, ep_size, _ = ep_rank_and_size(model)
    cfg = model.config
    first = ep_rank * (cfg.num_experts // ep_size)
    bias_key = "mlp.gate.expert_bias" if isinstance(cfg, LLaDA2MoeConfig) else "mlp.expert_bias"
    return {_published_key(k, first, bias_key): v for k, v in model.state_dict().items()}


def _seed_of(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def initialize(model: nn.Module, seed: int) -> None:
    """Initial weights, each published tensor drawn from a generator seeded by (seed, its name) on its
    own device: norms 1, biases 0, every other weight N(0, initializer_range). Independent of module
    order, expert-parallel size and rank, so every rank agrees on the replicated weights and a run
    at EP 8 starts from the same model as at EP 1."""
    std = model.config.initializer_range
    for key, tensor in published_views(model).items():
        if key.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif key.endswith("bias"):
            tensor.zero_()
        else:
            gen = device_generator(tensor.device, _seed_of(seed, key))
            tensor.normal_(0.0, std, generator=gen)


def _is_routed_expert_key(key: str) -> bool:
    parts = key.split(".")
    return len(parts) > 5 and parts[3:5] == ["mlp", "experts"]


def _copy(views: dict, key: str, read, source: str, loaded: set, num_experts: int) -> None:
    target = views.get(key)
    if target is None:
        if not _is_routed_expert_key(key):
            raise ValueError(f"{source}: {key} is not a weight of this model")
        if int(key.split(".")[5]) >= num_experts:  # another rank's expert, unless beyond the config's
            raise ValueError(f"{source}: {key} is beyond this model's num_experts={num_experts}")
        return
    value = read(key)
    if value.shape != target.shape:
        raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, the model {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value)
    loaded.add(key)


def _check_complete(views: dict, loaded: set, source: str) -> None:
    missing = sorted(set(views) - loaded)
    if missing:
        raise ValueError(f"{source}: {len(missing)} weights of the model are missing, e.g. {missing[:5]}")


def _load(model: nn.Module, tensors: Iterable[tuple[str, str, Callable]], whole: str) -> None:
    """Copy each (source, key, read) the rank owns into its share; then every weight must be there."""
    views, loaded = published_views(model), set()
    for source, key, read in tensors:
        _copy(views, key, read, source, loaded, model.config.num_experts)
    _check_complete(views, loaded, whole)


def load_published_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a published-layout state dict (all experts) into this rank's share."""
    _load(model, (("state dict", key, state.__getitem__) for key in state), "state dict")


def load_published_directory(model: nn.Module, directory: str | Path) -> None:
    """Load a published-layout safetensors checkpoint (single or sharded) into this rank's share,
    one file at a time, reading only the tensors this rank owns."""
    from safetensors import safe_open

    from diffmoe.model.checkpoint import weight_files

    directory = Path(directory)

    def tensors():
        for name in weight_files(directory):
            with safe_open(str(directory / name), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield str(directory / name), key, f.get_tensor

    _load(model, tensors(), str(directory))


def iter_published_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every published tensor (all experts), in sorted key order, on the CPU. Collective over the
    expert-parallel group: every rank must run it to the end; each expert is broadcast from its owner,
    so memory beyond this rank's share is one tensor at a time."""
    ep_rank, ep_size, group = ep_rank_and_size(model)
    views = published_views(model)
    if ep_size == 1:
        for key in sorted(views):
            yield key, views[key].detach().cpu()
        return
    local = model.config.num_experts // ep_size
    plan: dict[str, tuple[int, torch.Tensor]] = {}
    for key, tensor in views.items():
        if not _is_routed_expert_key(key):
            plan[key] = (-1, tensor)
            continue
        parts = key.split(".")
        j = int(parts[5]) - ep_rank * local
        for owner in range(ep_size):
            parts[5] = str(owner * local + j)
            plan[".".join(parts)] = (owner, tensor)
    for key in sorted(plan):
        owner, tensor = plan[key]
        if owner < 0:
            yield key, tensor.detach().cpu()
            continue
        buf = tensor.detach().contiguous() if owner == ep_rank else torch.empty_like(tensor)
        dist.broadcast(buf, src=dist.get_global_rank(group, owner), group=group)
        yield key, buf.cpu()


def published_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole published-layout state dict on every rank (collective). For small models and
    tests; checkpoints and exports stream ``iter_published_state`` instead."""
    return dict(iter_published_state(model))


def export_model(model):
    """The plain serving-time model of the config's family holding the training model's weights."""
    plain = lm_class(model.config)(model.config)
    load_published_state(plain, published_state(model))
    return plain.eval()
