"""Hugging Face checkpoint I/O in the published LLaDA-MoE / LLaDA2 layouts (safetensors + config.json).

The model's ``state_dict`` already uses the published key names; this file shards it into
safetensors files (written to temporary names, then renamed, so an interrupted save never leaves a
directory that looks complete) and loads single or sharded checkpoints onto the meta device and
assigns the tensors, so a 7B model is never initialised just to be overwritten.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .configuration import LLaDAConfig, LLaDAMoEConfig
from .llada2_configuration import LLaDA2MoeConfig, apply_tokenizer_ids, token_ids_from_tokenizer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Loading options that would change what is loaded; anything else transformers passes is harmless.
_UNSUPPORTED = ("device_map", "quantization_config", "load_in_8bit", "load_in_4bit", "tp_plan", "gguf_file")
_HUB_KWARGS = {"cache_dir", "revision", "token", "local_files_only", "force_download", "proxies", "subfolder"}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r} must be an int or like '5GB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[m.group(2)])


def save_pretrained(model, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    save_state(model.state_dict(), model.config, save_directory, max_shard_size)


def save_state(
    state: dict[str, torch.Tensor], config, save_directory, max_shard_size: int | str = "5GB"
) -> None:
    """Write a published-layout state dict + config.json as a Hugging Face directory."""
    writer = ShardWriter(save_directory, max_shard_size)
    for name, tensor in state.items():
        writer.add(name, tensor)
    writer.close(config)


class ShardWriter:
    """Streams (name, tensor) pairs into size-bounded safetensors shards, so a model can be written
    while it is gathered one tensor at a time (at most one shard is held). Shards go to temporary
    names and are renamed only in ``close``, so an interrupted save never leaves a directory that
    looks complete."""

    def __init__(self, save_directory, max_shard_size: int | str = "5GB"):
        self.out = Path(save_directory)
        self.out.mkdir(parents=True, exist_ok=True)
        self.limit = _parse_size(max_shard_size)
        self.pending: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self._flush()
        # Clone: expert weights are views into stacked tensors and safetensors refuses shared storage.
        self.pending[name] = tensor.detach().contiguous().clone()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        tmp = self.out / f".shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(tmp), metadata={"format": "pt"})
        self.shards.append((tmp, list(self.pending)))
        self.pending, self.size = {}, 0

    def close(self, config) -> None:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        written = [(tmp, self.out / name) for (tmp, _), name in zip(self.shards, names)]
        if n > 1:
            index = {
                "metadata": {"total_size": self.total},
                "weight_map": {k: name for (_, keys), name in zip(self.shards, names) for k in keys},
            }
            tmp = self.out / f".{INDEX_NAME}.tmp"
            tmp.write_text(json.dumps(index, indent=2, sort_keys=True))
            written.append((tmp, self.out / INDEX_NAME))
        config.save_pretrained(self.out)
        for tmp, final in written:
            os.replace(tmp, final)
        # Remove weights of an earlier save with a different sharding so the directory stays unambiguous.
        keep = {final.name for _, final in written}
        for stale in self.out.glob("model*.safetensors*"):
            if stale.name not in keep:
                stale.unlink()


def resolve_directory(path: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local directory as is; otherwise a Hugging Face Hub repo id downloaded to the cache."""
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists() or str(path).startswith((".", "/")):
        raise FileNotFoundError(f"model directory not found: {path}")
    from huggingface_hub import snapshot_download

    kwargs = {k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS and k != "proxies"}
    return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.txt"], **kwargs))


def load_config(directory: Path) -> LLaDAMoEConfig | LLaDA2MoeConfig:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json")
    data = json.loads(config_file.read_text())
    model_type = data.get("model_type")
    if model_type == LLaDA2MoeConfig.model_type:
        fields = {**token_ids_from_tokenizer(directory), **data}  # config.json wins
        return LLaDA2MoeConfig.from_dict({k: v for k, v in fields.items() if k != "model_type"})
    if model_type not in (LLaDAMoEConfig.model_type, LLaDAConfig.model_type):
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is not a LLaDA-MoE model ('lladamoe' or 'llada') "
            "or a LLaDA2 model ('llada2_moe')"
        )
    return LLaDAMoEConfig.from_dict({k: v for k, v in data.items() if k != "model_type"})


def weight_files(directory: Path) -> list[str]:
    """The safetensors files of a checkpoint directory (the index's shards, or the single file)."""
    index = directory / INDEX_NAME
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (directory / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME]
    raise FileNotFoundError(
        f"{directory} has no {WEIGHTS_NAME} or {INDEX_NAME} (only safetensors checkpoints are loaded)"
    )


def read_tensor(directory: Path, key: str) -> torch.Tensor:
    """One tensor of a checkpoint directory, read from the shard that holds it (nothing else)."""
    for name in weight_files(directory):
        with safe_open(str(directory / name), framework="pt", device="cpu") as f:
            if key in f.keys():
                return f.get_tensor(key)
    raise KeyError(f"{directory} has no tensor {key!r}")


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name in weight_files(directory):
        with safe_open(str(directory / name), framework="pt", device="cpu") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def from_pretrained(cls, path, config: LLaDAMoEConfig | None = None, dtype=None, device=None, **kwargs):
    """Load ``cls`` (model or LM) from a directory or Hub id in the published layout."""
    dtype = kwargs.pop("torch_dtype", dtype)
    unsupported = sorted(k for k in _UNSUPPORTED if kwargs.get(k) not in (None, False, {}))
    if unsupported:
        raise TypeError(f"from_pretrained does not support {unsupported} for LLaDA-MoE models")
    directory = resolve_directory(path, **kwargs)
    config = config if config is not None else load_config(directory)
    if isinstance(config, LLaDA2MoeConfig) != issubclass(cls.config_class, LLaDA2MoeConfig):
        raise ValueError(
            f"{directory} holds a {config.model_type!r} model; {cls.__name__} cannot load it "
            "(use AutoModelForMaskedLM)"
        )
    if isinstance(config, LLaDA2MoeConfig):
        apply_tokenizer_ids(config, directory)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    state = read_weights(directory)
    with torch.device("meta"):
        model = cls(config)
    if cls.base_model_prefix and not hasattr(model, "lm_head"):
        # A backbone loads from an LM checkpoint by dropping the "model." prefix and the head.
        prefix = cls.base_model_prefix + "."
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint in {directory} does not match the config: {err}") from None
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    model.eval()
    model.name_or_path = str(path)
    return model
