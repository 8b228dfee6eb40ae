"""The LLaDA-MoE and LLaDA2.x models, registered with transformers' Auto classes on import.

Imports no Ray, DeepSpeed or HTTP code: training, parallelism and serving wrap it from outside.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .configuration import NAMED_CONFIGS, LLaDAConfig, LLaDAMoEConfig, named_config
from .llada2 import LLaDA2MoeModel, LLaDA2MoeModelLM
from .llada2_configuration import LLaDA2MoeConfig, llada2_named_config
from .modeling import LLaDAMoEModel, LLaDAMoEModelLM, LLaDAMoEOutput
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
    "count_parameters",
    "llada2_named_config",
    "named_config",
    "route",
    "router_losses",
]
