"""Expert parallelism beside the model: the DeepSpeed-MoE adapter and the published-layout conversion.

Both training (``diffmoe.train``: every Ray Train worker) and expert-parallel serving
(``diffmoe.serve.expert_parallel``: every rank of a replica) build the same DeepSpeed-MoE model here,
so serving never imports the training package and both compute the serving model's function.
``diffmoe.model`` stays free of DeepSpeed; this package is where DeepSpeed meets it.

- ``build_training_model``: an ``LLaDAMoEModelLM`` or ``LLaDA2MoeModelLM`` whose MoE layers are
  DeepSpeed expert-parallel (``ExpertParallelMoE`` = DeepSpeed ``MoE`` + our gate ``LLaDAGate`` +
  ``StackedExperts``; ``ExpertParallelSharedMoE`` adds LLaDA2's shared experts); ``gates`` lists them.
  It is built on the meta device and only this rank's share is allocated.
- ``initialize`` / ``load_published_state`` / ``load_published_directory`` /
  ``iter_published_state`` / ``published_state`` / ``export_model`` (weights.py): weights in and
  out of the published Hugging Face key layout (all experts), from and to this rank's share.
- ``init_distributed``: ``deepspeed.init_distributed`` without its CPU shared-memory op build.
- ``moe_param_groups``: the optimizer's parameter groups, expert weights apart (ZeRO + expert parallel).
"""

from .moe import (
    ExpertParallelMoE,
    LLaDAGate,
    StackedExperts,
    build_training_model,
    gates,
    init_distributed,
    moe_param_groups,
)
from .weights import (
    export_model,
    initialize,
    iter_published_state,
    load_published_directory,
    load_published_state,
    published_state,
)

__all__ = [
    "ExpertParallelMoE",
    "LLaDAGate",
    "StackedExperts",
    "build_training_model",
    "export_model",
    "gates",
    "init_distributed",
    "initialize",
    "iter_published_state",
    "load_published_directory",
    "load_published_state",
    "moe_param_groups",
    "published_state",
]
