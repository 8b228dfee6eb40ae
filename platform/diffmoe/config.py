"""One configuration system for jobs, deployments and tests.

Every component is configured by a small pydantic model. A config is read from YAML, then
overridden from the command line with ``--set a.b=value`` (values parsed as YAML scalars), then
validated: unknown keys and wrong types fail before any cluster resources are claimed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound="StrictModel")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the offending key."""


class StrictModel(BaseModel):
    """Base for all config models: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: cannot parse value: {err}") from err
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.path=value`` override applied."""
    out = _deep_copy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def with_section_defaults(cls: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every section it names laid over that section's default in ``cls``. pydantic
    would build a section given as a mapping from its class alone, so on a config declaring
    ``task: TaskSection = TaskSection(name="reverse")`` the override ``task.min_digits=8`` would
    silently bring back the class's own ``name``; here only the keys given change."""
    out = dict(data)
    for name, field in cls.model_fields.items():
        section, kind = out.get(name), field.annotation
        if not (isinstance(section, dict) and isinstance(kind, type) and issubclass(kind, BaseModel)):
            continue
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        base = default.model_dump(exclude_unset=True) if isinstance(default, BaseModel) else {}
        out[name] = with_section_defaults(kind, _overlay(kind, base, section))
    return out


def _overlay(cls: type[BaseModel], base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = {**base, **top}
    for name, field in cls.model_fields.items():
        kind = field.annotation
        if isinstance(base.get(name), dict) and isinstance(top.get(name), dict):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                out[name] = _overlay(kind, base[name], top[name])
    return out


def build(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Validate ``data`` as ``cls``; errors list every bad key with its dotted path."""
    try:
        return cls.model_validate(with_section_defaults(cls, data))
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "<root>"
            lines.append(f"  {loc}: {e['msg']}")
        raise ConfigError(f"invalid {source} ({cls.__name__}):\n" + "\n".join(lines)) from None


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from an optional YAML file plus ``--set`` style overrides."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides)
    return build(cls, data, source=str(path) if path else "config")


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}; used to log resolved configs as MLflow params."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = data
    return out


def add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """The two flags every job shares: ``--config FILE`` and repeatable ``--set key=value``."""
    parser.add_argument("--config", default=default, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-3 (repeatable)",
    )


# How a model is trained and decoded: the seam between model families and the engine, the
# training objective, validation and the benchmarks. A model config states its own (``.family``).
MASKED_DIFFUSION, BLOCK_DIFFUSION, AUTOREGRESSIVE = "masked_diffusion", "block_diffusion", "autoregressive"


def model_family(model_config) -> str:
    """``config.family``: "masked_diffusion" (LLaDA-MoE), "block_diffusion" (LLaDA2.x) or
    "autoregressive" (the causal twin); a config without one is LLaDA-MoE-like."""
    family = getattr(model_config, "family", None)
    if family is None:
        return AUTOREGRESSIVE if bool(getattr(model_config, "causal", False)) else MASKED_DIFFUSION
    return family
