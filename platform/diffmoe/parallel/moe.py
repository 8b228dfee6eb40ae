"""DeepSpeed-MoE expert parallelism for both model families, beside the models rather than inside them.

``build_training_model`` takes a plain ``LLaDAMoEModelLM`` or ``LLaDA2MoeModelLM`` and swaps each MoE
layer's routed experts for a
``deepspeed.moe.layer.MoE`` whose gate is ours (``LLaDAGate``): the model's own router (model/router.py),
so top-k weights are not renormalised and no token is dropped. DeepSpeed then provides what it is for: expert-parallel process
groups, MoE optimizer parameter groups and per-expert checkpoint files. Tokens do not go through
DeepSpeed's capacity-padded dispatch: with an expert-parallel group of one there is nothing to
exchange and the layer runs the serving model's sorted grouped-matmul kernel on the DeepSpeed-owned
parameters (measured ~2x faster per MoE layer on CPU than the padded path, same outputs and
gradients); with more ranks, ``dispatch.sorted_expert_parallel`` sends each rank exactly the rows
routed to its experts (one all-to-all each way, no padding) and runs the same kernel there.
The local experts' weights are stacked (``StackedExperts``) while their state dict keeps
DeepSpeed's per-expert names. LLaDA2's shared experts stay beside the DeepSpeed layer, replicated
like any dense weight (``ExpertParallelSharedMoE``); the router settings (sigmoid, groups, scaling,
expert bias: selection-only for LLaDA2, mixed in for LLaDA-MoE as published) come from each
config's ``router_options()``, so one gate serves both.
Weights convert both ways with the published key layout, so training-time and serving-time
forwards compute the same function (``tests/test_train.py::test_training_time_forward_equals_exported_model``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn

from diffmoe.model import LLaDA2MoeConfig, LLaDAMoEConfig, lm_class
from diffmoe.model.layers import Experts
from diffmoe.model.router import Routing, route

from .dispatch import sorted_expert_parallel

_EXPERTS = "mlp.moe.deepspeed_moe.experts.deepspeed_experts"
_GATE = "mlp.moe.deepspeed_moe.gate"


def moe_param_groups(model: nn.Module) -> list[dict]:
    """Optimizer parameter groups with the expert weights apart, as DeepSpeed's ZeRO needs them:
    it then reduces expert gradients over the expert-data-parallel group only (ranks holding the
    same experts), and every other gradient over all ranks."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    trainable = [p for p in model.parameters() if p.requires_grad]
    return split_params_into_different_moe_groups_for_optimizer({"params": trainable, "name": "parameters"})


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
        b, n, h = x.shape
        flat = x.reshape(-1, h)
        ds_moe = self.moe.deepspeed_moe
        routing = ds_moe.gate.route(flat)
        y = sorted_expert_parallel(
            flat, routing, ds_moe.experts.deepspeed_experts, ds_moe.ep_group, self.moe.ep_size
        )
        return y.view(b, n, h), routing

    def _local_forward(self, x):
        """EP group of one: nothing to exchange, so the serving model's sorted grouped-matmul expert
        kernel runs on the same parameters. Same function (the model's router, no dropped tokens,
        top-k weights as routed)."""
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


def build_training_model(
    config, ep_size: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
):
    """The config family's LM whose MoE layers are DeepSpeed expert-parallel (torch.distributed must
    be up). Built on the meta device; only this rank's share is allocated on ``device`` (replicated
    parts + 1/ep_size of the routed experts), uninitialised: follow with ``weights.initialize`` or
    one of the ``load_published_*`` functions."""
    if config.num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide num_experts={config.num_experts}")
    with torch.device("meta"):
        model = lm_class(config)(config)
        for layer in model.model.layers:
            if layer.is_moe:
                shared = getattr(layer.mlp, "shared_experts", None)
                if shared is not None:
                    layer.mlp = ExpertParallelSharedMoE(config, ep_size, shared)
                else:
                    layer.mlp = ExpertParallelMoE(config, ep_size)
                layer.mlp.moe.set_deepspeed_parallelism()
    return allocate(model, device, dtype)


def allocate(model: nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """Give a meta-device model real (uninitialised) parameters on ``device``; floating parameters in
    ``dtype`` when given. Unlike ``Module.to_empty`` this keeps the attributes DeepSpeed puts on
    expert parameters (``allreduce``, ``group_name``). Buffers (router biases) are zeros, kept in
    their own dtype (fp32 routing)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            kind = dtype if dtype is not None and param.is_floating_point() else param.dtype
            fresh = nn.Parameter(torch.empty(param.shape, device=device, dtype=kind), param.requires_grad)
            fresh.__dict__.update(param.__dict__)
            module._parameters[name] = fresh
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = torch.zeros(buf.shape, device=device, dtype=buf.dtype)
    return model


def gates(model: nn.Module) -> list[LLaDAGate]:
    """The training model's MoE gates, in layer order."""
    return [m for m in model.modules() if isinstance(m, LLaDAGate)]


def ep_rank_and_size(model: nn.Module) -> tuple[int, int, object]:
    for module in model.modules():
        if isinstance(module, DeepSpeedMoE):
            group = module.deepspeed_moe.ep_group
            return dist.get_rank(group), module.ep_size, group
    return 0, 1, None
