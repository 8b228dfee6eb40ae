"""The DeepSpeed-MoE adapter in one process (a real gloo group of one, a real DeepSpeed engine):
both of its expert paths compute the serving model's function, gradients included, and DeepSpeed
still writes one checkpoint file per expert that restores the stacked weights."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from diffmoe.model import LLaDAMoEModelLM, named_config

deepspeed = pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def group_of_one():
    """deepspeed.init_distributed on a gloo world of one; torn down so no other test sees it."""
    import deepspeed.comm as ds_comm
    from deepspeed.utils import groups

    from diffmoe.parallel import init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    init_distributed("gloo")
    yield
    groups._EXPERT_PARALLEL_GROUP.clear()
    groups._EXPERT_DATA_PARALLEL_GROUP.clear()
    ds_comm.destroy_process_group()
    ds_comm.comm.cdb = None
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_process_group_start_compiles_no_cpp_op(group_of_one):
    """DeepSpeed's CPU backend would JIT-build its shared-memory all-reduce here (minutes of g++)."""
    import deepspeed.comm as ds_comm

    assert ds_comm.comm.cdb.shm_comm_op is None


def _models():
    from diffmoe.parallel import build_training_model, load_published_state

    config = named_config("tiny", num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    plain = LLaDAMoEModelLM(config).train()
    trained = build_training_model(config, ep_size=1).train()
    load_published_state(trained, plain.state_dict())
    return config, plain, trained


def test_training_forward_and_gradients_equal_the_model(group_of_one):
    config, plain, trained = _models()
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    want, got = plain(ids).logits, trained(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want.square().mean().backward()
    got.square().mean().backward()
    grads = {n: p.grad for n, p in trained.named_parameters()}
    for name, p in plain.named_parameters():
        trained_name = name.replace("mlp.gate.weight", "mlp.moe.deepspeed_moe.gate.wg.weight").replace(
            "mlp.experts.", "mlp.moe.deepspeed_moe.experts.deepspeed_experts."
        )
        torch.testing.assert_close(grads.pop(trained_name), p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert not grads, f"training-only parameters: {list(grads)}"


def test_deepspeed_dispatch_path_equals_the_grouped_kernel_path(group_of_one):
    """The path used when experts live on other ranks (capacity slots, StackedExperts.forward)."""
    _, _, trained = _models()
    layer = next(layer.mlp for layer in trained.model.layers if layer.is_moe)
    x = torch.randn(2, 24, trained.config.hidden_size, generator=torch.Generator().manual_seed(2))
    local, logits = layer._local_forward(x)
    dispatched, _, _ = layer.moe(x)
    torch.testing.assert_close(dispatched, local, rtol=1e-5, atol=1e-6)


def _engine(model, config: dict, lr: float):
    """A DeepSpeed engine over ``model`` with AdamW on DeepSpeed-MoE's parameter groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "parameters"}
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=lr), config=config)
    return engine


@pytest.mark.parametrize("zero_stage", [0, 2])  # 0: what a single-worker run uses
def test_deepspeed_checkpoint_has_one_file_per_expert_and_restores(group_of_one, tmp_path, zero_stage):
    from diffmoe.parallel import published_state

    config, _, trained = _models()
    engine = _engine(
        trained, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": zero_stage}}, lr=1e-3
    )
    saved = {k: v.clone() for k, v in published_state(trained).items()}
    engine.save_checkpoint(str(tmp_path), tag="t")
    files = sorted((tmp_path / "t").glob("layer_*_expert_*_model_states.pt"))
    moe_layers = sum(layer.is_moe for layer in trained.model.layers)
    assert len(files) == moe_layers * config.num_experts
    expert_file = torch.load(files[1], weights_only=True)
    keys = list(expert_file)
    assert keys and all(".deepspeed_experts.1." in k for k in keys), keys
    with torch.no_grad():
        for p in trained.parameters():
            p.zero_()
    engine.load_checkpoint(str(tmp_path), tag="t")
    for name, value in published_state(trained).items():
        torch.testing.assert_close(value, saved[name], msg=name)


def test_skipping_the_gradient_all_reduce_of_a_world_of_one_changes_no_update(group_of_one):
    """A single-worker run turns DeepSpeed's gradient all-reduce off (train.loop): the same steps,
    gradient clipping included, must give the same weights as with it."""
    from diffmoe.parallel import published_state

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 0},
    }
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(3))
    weights = []
    for allreduce in (True, False):
        _, _, trained = _models()
        engine = _engine(trained, config, lr=1e-2)
        engine.enable_backward_allreduce = allreduce
        for _ in range(2):
            engine.backward(engine(ids).logits.square().mean())
            engine.step()
        weights.append(published_state(trained))
    assert weights[0].keys() == weights[1].keys()
    start = published_state(_models()[2])
    assert all(not torch.equal(weights[0][n], v) for n, v in start.items() if "norm" not in n)  # it trained
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0, msg=name)


def test_expert_bias_update_counts_every_micro_batch_of_the_step(group_of_one):
    """With gradient accumulation the update reads the load of all the step's micro-batches."""
    from diffmoe.model import named_config
    from diffmoe.parallel import build_training_model, gates
    from diffmoe.train.balance import count_expert_load, update_expert_bias

    torch.manual_seed(0)
    cfg = named_config("tiny", num_experts=4, num_experts_per_tok=1, moe_router_enable_expert_bias=True)
    model = build_training_model(cfg, 1).eval()
    gate = gates(model)[0]
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    loads = []
    for favoured in (0, 3):  # two micro-batches routed to different experts
        gate.routing_bias.zero_()
        gate.routing_bias[favoured] = 5.0
        with torch.no_grad():
            model(ids)
        loads.append(torch.bincount(gate.routing.expert_idx.reshape(-1), minlength=4).double())
        count_expert_load(model)
    gate.routing_bias.zero_()
    update_expert_bias(model, 0.1)
    total = loads[0] + loads[1]
    assert gate.routing_bias.tolist() == pytest.approx((0.1 * torch.sign(total.mean() - total)).tolist())
    assert gate.pending_load is None  # the next step counts afresh
