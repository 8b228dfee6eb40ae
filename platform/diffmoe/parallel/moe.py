"""DeepSpeed-MoE expert parallelism for both model families, beside the models rather than inside them.

``build_training_model`` takes a plain ``LLaDAMoEModelLM`` or ``LLaDA2MoeModelLM`` and swaps each MoE
layer's routed experts for a
``deepspeed.moe.layer.MoE`` whose gate is ours (``LLaDAGate``): the model's own router (model/router.py),
so top-k weights are not renormalised and no token is dropped (capacity = the largest expert load
in the expert-parallel group). DeepSpeed then provides what it is for: expert-parallel process
groups, all-to-all token exchange, MoE optimizer parameter groups and per-expert checkpoint files.
With an expert-parallel group of one there is nothing to exchange, and the layer runs the serving
model's sorted grouped-matmul kernel on the same DeepSpeed-owned parameters instead of DeepSpeed's
capacity-padded dispatch (measured ~2x faster per MoE layer on CPU, same outputs and gradients).
The local experts' weights are stacked (``StackedExperts``) while their state dict keeps
DeepSpeed's per-expert names. LLaDA2's shared experts stay beside the DeepSpeed layer, replicated
like any dense weight (``ExpertParallelSharedMoE``); the router settings (sigmoid, groups, scaling,
selection-only bias) come from each config's ``router_options()``, so one gate serves both.
Weights convert both ways with the published key layout, so training-time and serving-time
forwards compute the same function (``tests/test_train.py::test_training_time_forward_equals_exported_model``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn

from diffmoe.model import LLaDA2MoeConfig, LLaDAMoEConfig, LLaDAMoEModelLM, lm_class
from diffmoe.model.modeling import Experts
from diffmoe.model.router import Routing, route

_EXPERTS = "mlp.moe.deepspeed_moe.experts.deepspeed_experts"
_GATE = "mlp.moe.deepspeed_moe.gate"


def init_distributed(backend: str) -> None:
    """``deepspeed.init_distributed`` without the JIT build of DeepSpeed's shared-memory all-reduce.

    On CPU, DeepSpeed compiles that C++ op with ninja at every process-group start on a node or
    virtualenv it has not seen (1-3 CPU-minutes on 2 cores, while training waits). The op serves
    only ``inference_all_reduce`` (DeepSpeed's tensor-parallel inference), which neither our
    training nor our serving calls; gloo or NCCL carries every collective we use.
    """
    import importlib

    import deepspeed

    # importlib: ``import deepspeed.comm.torch as m`` would bind the ``torch`` that deepspeed.comm re-exports
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def expert_width(config) -> int:
    """Hidden width of one routed expert under either family's field name."""
    if isinstance(config, LLaDA2MoeConfig):
        return config.moe_intermediate_size
    return config.expert_intermediate_size


class LLaDAGate(nn.Module):
    """A DeepSpeed MOELayer gate with the model's router semantics (sparse-route return format)."""

    def __init__(self, config: LLaDAMoEConfig | LLaDA2MoeConfig):
        super().__init__()
        self.config = config
        self.options = config.router_options()
        self.wg = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        if config.moe_router_enable_expert_bias:
            # the published ``expert_bias``, renamed: DeepSpeed's MoE checkpointing takes every key
            # containing "expert" under the MoE layer for an expert weight (and fails on this one)
            self.register_buffer("routing_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        self.ep_group = None
        self.routing: Routing | None = None  # last forward's routing, for the losses and metrics

    def _set_ep_group(self, group) -> None:
        self.ep_group = group

    def route(self, x: torch.Tensor) -> Routing:
        """x [N, H] -> Routing(fp32 logits [N, E], expert ids [N, k], fp32 weights [N, k]), as
        ``modeling.MoE.route``; keeps it for the z-loss and expert-load metrics."""
        self.routing = route(self.options, x, self.wg.weight, getattr(self, "routing_bias", None))
        return self.routing

    def forward(self, x, used_token=None, sparse_routes=True, use_tutel=False):
        cfg = self.config
        logits, expert_idx, weights = self.route(x)
        chosen = torch.zeros_like(logits, dtype=torch.long).scatter_(1, expert_idx, 1)
        counts = chosen.sum(0)
        capacity = counts.max().clone()
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        locations = (chosen.cumsum(0) - 1).gather(1, expert_idx)
        l_aux = torch.zeros((), device=x.device)  # load balancing is computed from self.routing
        return (
            l_aux,
            max(int(capacity), 1),
            cfg.num_experts,
            expert_idx.t().int().contiguous(),
            locations.t().int().contiguous(),
            weights.t().contiguous(),
            counts.detach(),
        )


class StackedExperts(nn.Module):
    """DeepSpeed's ``Experts`` container with the local experts' weights stacked.

    ``deepspeed_experts`` is the serving model's ``Experts`` (two [E_local, ...] parameters instead
    of three per expert), so the fast path is literally the model's kernel and the optimizer,
    ZeRO hooks and gradient clipping see 2 tensors per layer, not 3 x E_local. Its state dict still
    reads ``deepspeed_experts.{j}.{gate,up,down}_proj.weight``: DeepSpeed's per-expert checkpoint
    files and the published layout are unchanged. Parameters carry DeepSpeed's expert markers
    (``allreduce=False``, ``group_name``) so they land in the MoE optimizer groups.
    """

    def __init__(self, config: LLaDAMoEConfig, num_local_experts: int, group_name: str):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.deepspeed_experts = Experts(num_local_experts, config.hidden_size, expert_width(config))
        for param in self.deepspeed_experts.parameters():
            param.allreduce = False
            param.group_name = group_name

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """DeepSpeed MOELayer's call after the all-to-all: [ep, E_local, C, H] -> same shape."""
        ep, e, c, h = inputs.shape
        experts = self.deepspeed_experts
        x = inputs.transpose(0, 1).reshape(e, ep * c, h)
        gate, up = torch.bmm(x, experts.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, experts.down_proj.transpose(1, 2))
        return y.view(e, ep, c, h).transpose(0, 1)


class ExpertParallelMoE(nn.Module):
    """Drop-in for ``modeling.MoE``: forward(x [B, L, H]) -> (y, Routing of the B*L tokens)."""

    def __init__(self, config: LLaDAMoEConfig, ep_size: int):
        super().__init__()
        self.moe = DeepSpeedMoE(
            config.hidden_size,
            nn.Identity(),  # replaced below by the stacked container
            num_experts=config.num_experts,
            ep_size=ep_size,
            k=1,
            drop_tokens=False,
        )
        ds_moe = self.moe.deepspeed_moe
        ds_moe.gate = LLaDAGate(config)
        ds_moe.experts = StackedExperts(config, self.moe.num_local_experts, self.moe.expert_group_name)

    def forward(self, x):
        if self.moe.ep_size == 1:
            return self._local_forward(x)
        y, _, _ = self.moe(x)
        return y, self.moe.deepspeed_moe.gate.routing

    def _local_forward(self, x):
        """EP group of one: no all-to-all to make, so skip DeepSpeed's capacity-padded [E, C, H]
        dispatch (zero-filled slots, index_add backwards) and run the serving model's sorted
        grouped-matmul expert kernel on the same parameters. Same function (the model's router, no
        dropped tokens, top-k weights as routed)."""
        b, n, h = x.shape
        flat = x.reshape(-1, h)
        routing = self.moe.deepspeed_moe.gate.route(flat)
        y = self.moe.deepspeed_moe.experts.deepspeed_experts(flat, routing.expert_idx, routing.weights)
        return y.view(b, n, h), routing


class ExpertParallelSharedMoE(ExpertParallelMoE):
    """LLaDA2's sparse block: routed experts expert-parallel, shared experts replicated (the
    published ``mlp.shared_experts.*`` keys, so no renaming)."""

    def __init__(self, config: LLaDA2MoeConfig, ep_size: int, shared_experts: nn.Module):
        super().__init__(config, ep_size)
        self.shared_experts = shared_experts

    def forward(self, x):
        y, routing = super().forward(x)
        return y + self.shared_experts(x), routing


def build_training_model(config, ep_size: int):
    """The config family's LM whose MoE layers are DeepSpeed expert-parallel (torch.distributed must
    be up)."""
    if config.num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide num_experts={config.num_experts}")
    model = lm_class(config)(config)
    for layer in model.model.layers:
        if layer.is_moe:
            shared = getattr(layer.mlp, "shared_experts", None)
            if shared is not None:
                layer.mlp = ExpertParallelSharedMoE(config, ep_size, shared)
            else:
                layer.mlp = ExpertParallelMoE(config, ep_size)
            layer.mlp.moe.set_deepspeed_parallelism()
    return model


def gates(model: nn.Module) -> list[LLaDAGate]:
    """The training model's MoE gates, in layer order."""
    return [m for m in model.modules() if isinstance(m, LLaDAGate)]


def _ep_rank_and_size(model: nn.Module) -> tuple[int, int, object]:
    for module in model.modules():
        if isinstance(module, DeepSpeedMoE):
            group = module.deepspeed_moe.ep_group
            return dist.get_rank(group), module.ep_size, group
    return 0, 1, None


def load_published_state(model: LLaDAMoEModelLM, state: dict[str, torch.Tensor]) -> None:
    """Copy a published-layout state dict (all experts) into a training model (local experts only)."""
    ep_rank, ep_size, _ = _ep_rank_and_size(model)
    cfg = model.config
    local = cfg.num_experts // ep_size
    own = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) > 5 and parts[3:5] == ["mlp", "experts"]:
            j = int(parts[5])
            if ep_rank * local <= j < (ep_rank + 1) * local:
                own[".".join(parts[:3] + [_EXPERTS, str(j - ep_rank * local)] + parts[6:])] = value
        elif key.endswith("mlp.gate.weight") and "layers" in key:
            own[key.replace("mlp.gate.weight", _GATE + ".wg.weight")] = value
        elif key.endswith(("mlp.expert_bias", "mlp.gate.expert_bias")):  # LLaDA-MoE, LLaDA2
            own[key.rsplit("mlp.", 1)[0] + _GATE + ".routing_bias"] = value
        else:
            own[key] = value
    missing, unexpected = model.load_state_dict(own, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit the training model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def published_state(model: LLaDAMoEModelLM) -> dict[str, torch.Tensor] | None:
    """Gather the full published-layout state dict (all experts). Collective over the EP group;
    returns the dict on every rank (tiny and small models) — callers write it from rank 0 only."""
    ep_rank, ep_size, group = _ep_rank_and_size(model)
    cfg = model.config
    local = cfg.num_experts // ep_size
    bias_key = "mlp.gate.expert_bias" if isinstance(cfg, LLaDA2MoeConfig) else "mlp.expert_bias"
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach()  # gathered on its own device (NCCL takes CUDA tensors only), kept on the CPU
        if _EXPERTS in key:
            prefix, rest = key.split(_EXPERTS + ".")
            j, tail = rest.split(".", 1)
            pieces = [value]
            if ep_size > 1:
                pieces = [torch.empty_like(value) for _ in range(ep_size)]
                dist.all_gather(pieces, value.contiguous(), group=group)
            for r, piece in enumerate(pieces):
                out[f"{prefix}mlp.experts.{r * local + int(j)}.{tail}"] = piece.cpu()
            continue
        value = value.cpu()
        if _GATE in key:
            out[
                key.replace(_GATE + ".wg.weight", "mlp.gate.weight").replace(
                    _GATE + ".routing_bias", bias_key
                )
            ] = value
        else:
            out[key] = value
    return out


def export_model(model):
    """The plain serving-time model of the config's family holding the training model's weights."""
    state = published_state(model)
    plain = lm_class(model.config)(model.config)
    plain.load_state_dict(state, strict=True)
    return plain.eval()
