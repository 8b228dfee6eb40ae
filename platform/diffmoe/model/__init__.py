"""The LLaDA-MoE and LLaDA2.x models, registered with transformers' Auto classes on import.

Imports no Ray, DeepSpeed or HTTP code: training, parallelism and serving wrap it from outside.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .configuration import NAMED_CONFIGS, LLaDAConfig, LLaDAMoEConfig, named_config
from .layers import LLaDAMoEOutput
from .llada2 import LLaDA2MoeModel, LLaDA2MoeModelLM
from .llada2_configuration import LLaDA2MoeConfig, llada2_named_config
from .modeling import LLaDAMoEModel, LLaDAMoEModelLM
from .params import count_parameters
from .router import RouterOptions, Routing, route, router_losses


class LLaDAModel(LLaDAMoEModel):
    """What AutoModel builds for a published config.json (``model_type`` "llada")."""

    config_class = LLaDAConfig


class LLaDAModelLM(LLaDAMoEModelLM):
    """What AutoModelForMaskedLM builds for a published config.json (``model_type`` "llada")."""

    config_class = LLaDAConfig


def _register() -> None:
    for config_cls, backbone, lm in (
        (LLaDAMoEConfig, LLaDAMoEModel, LLaDAMoEModelLM),
        (LLaDAConfig, LLaDAModel, LLaDAModelLM),
        (LLaDA2MoeConfig, LLaDA2MoeModel, LLaDA2MoeModelLM),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, backbone, exist_ok=True)
        AutoModelForMaskedLM.register(config_cls, lm, exist_ok=True)


_register()


def lm_class(config) -> type:
    """The LM class that builds ``config``'s family (checkpoint adapters and training ask here)."""
    return LLaDA2MoeModelLM if isinstance(config, LLaDA2MoeConfig) else LLaDAMoEModelLM


def config_from_dict(data: dict) -> LLaDAMoEConfig | LLaDA2MoeConfig:
    """A model config from ``config.to_dict()`` / config.json contents, by its ``model_type``."""
    fields = {k: v for k, v in data.items() if k != "model_type"}
    if data.get("model_type") == LLaDA2MoeConfig.model_type:
        return LLaDA2MoeConfig.from_dict(fields)
    return LLaDAMoEConfig.from_dict(fields)


__all__ = [
    "NAMED_CONFIGS",
    "LLaDA2MoeConfig",
    "LLaDA2MoeModel",
    "LLaDA2MoeModelLM",
    "LLaDAConfig",
    "LLaDAMoEConfig",
    "LLaDAMoEModel",
    "LLaDAMoEModelLM",
    "LLaDAMoEOutput",
    "RouterOptions",
    "Routing",
    "config_from_dict",
    "count_parameters",
    "lm_class",
    "llada2_named_config",
    "named_config",
    "route",
    "router_losses",
]
