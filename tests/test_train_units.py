"""Training-loop logic without Ray: document masks, non-finite losses, checkpoint fingerprints."""

from __future__ import annotations

import pytest
import torch

from diffmoe.model import LLaDAMoEModelLM, named_config
from diffmoe.train.config import TrainJobConfig
from diffmoe.train.loop import ObjectiveModule


def _tiny(seed: int = 0, **overrides) -> LLaDAMoEModelLM:
    torch.manual_seed(seed)
    return LLaDAMoEModelLM(named_config("tiny", vocab_size=128, **overrides))


def _packed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (4, 32), generator=gen)
    seg = torch.zeros(4, 32, dtype=torch.long)
    seg[:, 10:] = 1  # two documents packed per row, as data/pack.py writes them
    seg[:, 25:] = 2
    return {"input_ids": ids, "segment_ids": seg}


@pytest.mark.parametrize("random_length_prob", [0.0, 1.0])  # 1.0: every batch cropped
def test_document_mask_trains_a_step(random_length_prob):
    cfg = TrainJobConfig.model_validate(
        {"train": {"document_mask": True, "objective": {"random_length_prob": random_length_prob}}}
    )
    model = _tiny()
    objective = ObjectiveModule(model, cfg)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.lm_head.weight.detach().clone()
    terms = objective(_packed_batch(), torch.Generator().manual_seed(1))
    terms.total.backward()
    optim.step()
    assert torch.isfinite(terms.total) and terms.num_masked > 0
    assert not torch.equal(before, model.lm_head.weight)
    # The mask reached attention: without it the same draws give a different loss.
    plain = ObjectiveModule(model, TrainJobConfig.model_validate({"train": {"document_mask": False}}))
    with torch.no_grad():
        a = objective(_packed_batch(), torch.Generator().manual_seed(2)).diffusion
        b = plain(_packed_batch(), torch.Generator().manual_seed(2)).diffusion
    assert not torch.allclose(a, b)


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped_and_counted():
    from diffmoe.train.nonfinite import NonFiniteLossError, handle_nonfinite, loss_is_finite

    model = _tiny()
    objective = ObjectiveModule(model, TrainJobConfig())
    batch = {"input_ids": _packed_batch()["input_ids"]}
    assert loss_is_finite(objective(batch, torch.Generator().manual_seed(0)).total)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")  # one poisoned parameter
    terms = objective(batch, torch.Generator().manual_seed(0))
    assert not loss_is_finite(terms.total)
    with pytest.raises(NonFiniteLossError, match="at step 7; train.on_nonfinite=stop"):
        handle_nonfinite("stop", 100, 7, 0)
    assert handle_nonfinite("skip", 2, 7, 0) == 1
    assert handle_nonfinite("skip", 2, 8, 1) == 2
    with pytest.raises(NonFiniteLossError, match="step 9: 3 micro-batches skipped.*max_nonfinite_skips=2"):
        handle_nonfinite("skip", 2, 9, 2)


def test_checkpoint_fingerprint_sees_permuted_experts():
    from diffmoe.train.checkpointing import fingerprint

    state = _tiny().state_dict()  # published layout: one entry per expert
    swapped = dict(state)
    for part in ("gate_proj", "up_proj", "down_proj"):
        a, b = (f"model.layers.0.mlp.experts.{j}.{part}.weight" for j in (0, 1))
        swapped[a], swapped[b] = state[b], state[a]
    assert sum(t.abs().sum() for t in swapped.values()) == sum(t.abs().sum() for t in state.values())
    assert fingerprint(swapped) != fingerprint(state)
    assert fingerprint({k: v.clone() for k, v in state.items()}) == fingerprint(state)
    rounded = {k: v.bfloat16() for k, v in state.items()}  # same values, other dtype: same print
    assert fingerprint(rounded) == fingerprint({k: v.float() for k, v in rounded.items()})


class _Rows:
    """The slice of a Ray Data shard that ``loop.validate`` reads: ``iter_torch_batches``."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def iter_torch_batches(self, batch_size: int, drop_last: bool, device):
        n = len(next(iter(self.columns.values())))
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            yield {k: v[i : i + batch_size].to(device) for k, v in self.columns.items()}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sft", [False, True])
def test_training_validation_evaluate_and_benchmark_share_one_loss(tmp_path, causal, sft):
    """Same model, rows, batch size and seed: train-time validation, jobs/evaluate.py and the
    benchmark report the same loss per scored token (uneven answer lengths, a partial last batch)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from diffmoe.bench.quality import validation_loss
    from diffmoe.evaluate import loss_per_token
    from diffmoe.train.loop import validate

    model = _tiny(causal=causal).eval()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 120, (10, 24), generator=gen)
    response = torch.zeros(10, 24, dtype=torch.bool)
    for row in range(10):
        response[row, 6 + row :] = True  # answers of 18 down to 9 tokens
    columns = {"input_ids": ids, **({"response_mask": response} if sft else {})}
    resp = response if sft else None
    cfg = TrainJobConfig.model_validate(
        {"train": {"kind": "sft" if sft else "pretrain", "seed": 1, "micro_batch_size": 4, "val_batches": 99}}
    )
    seed = cfg.train.seed + 99  # what validate() seeds its mask draws with
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        trained = validate(ObjectiveModule(model, cfg), _Rows(columns), cfg, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    nats, tokens = loss_per_token(model, ids, resp, 4, torch.Generator().manual_seed(seed), "cpu")
    bench = validation_loss(model, ids, response if sft else torch.ones_like(response), 1, batch=4, seed=seed)
    assert tokens == bench["val_tokens"]
    assert trained == pytest.approx(nats / tokens, rel=1e-5)
    assert bench["val_loss_per_token"] == pytest.approx(nats / tokens, rel=1e-5)
    if causal:  # the exact NLL, by hand from the full logits
        scored = (resp if sft else torch.ones_like(response))[:, 1:]
        with torch.no_grad():
            logits = model(ids).logits[:, :-1]
        want = F.cross_entropy(logits[scored], ids[:, 1:][scored], reduction="mean")
        assert trained == pytest.approx(float(want), rel=1e-4)


def test_sample_order_is_exactly_once_per_epoch_across_a_resize(tmp_path):
    """Stream positions map to a (seed, epoch) permutation of global indices; 2 workers stop at a
    checkpointed position and 1 worker goes on from it: each epoch trains every row once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffmoe.train.sample_order import SampleOrder, ShardReader, TrainStream, resume_position

    rows = [7, 0, 5, 9]  # four shards (one empty), 21 rows; row i of the split holds the value i
    paths, start = [], 0
    for i, n in enumerate(rows):
        ids = [[start + r] * 4 for r in range(n)]
        paths.append(str(tmp_path / f"shard-{i}.parquet"))
        pq.write_table(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32()))}), paths[-1])
        start += n
    order = SampleOrder(rows, seed=5)
    for epoch in (0, 1):
        seen = [order.global_index(*order.locate(epoch * 21 + k)[1:]) for k in range(21)]
        assert sorted(seen) == list(range(21))
    epoch0 = [order.global_index(*order.locate(k)[1:]) for k in range(21)]
    assert epoch0 != [order.global_index(*order.locate(21 + k)[1:]) for k in range(21)]
    assert epoch0 == [
        SampleOrder(rows, 5).global_index(*SampleOrder(rows, 5).locate(k)[1:]) for k in range(21)
    ]
    assert epoch0 != sorted(epoch0)

    def train(world: int, position: int, steps: int) -> tuple[list[int], int]:
        streams = [
            iter(TrainStream(order, ShardReader(paths, keep_all=False), position, r, world, 2, "cpu"))
            for r in range(world)
        ]
        got = []
        for _ in range(steps):
            for s in streams:
                batch, _, _, indices = next(s)
                assert batch["input_ids"][:, 0].tolist() == indices  # the rows are the ones named
                got += indices
        return got, position + steps * world * 2

    first, position = train(world=2, position=0, steps=3)  # 12 samples, then a "checkpoint"
    state = {"position": position}
    second, _ = train(world=1, position=resume_position(state, 21, 2), steps=9)  # 18 more
    trained = first + second
    assert sorted(trained[:21]) == list(range(21)) and trained[:21] == epoch0
    assert len(set(trained[21:])) == len(trained[21:])  # epoch 1 so far: no repeats


def test_progress_line_reports_step_loss_rate_and_eta():
    from diffmoe.train.metrics import progress_line

    line = progress_line(60, 100, 10, 100.0, 2.34567, 12345.6)
    # 50 steps in this session took 100 s: 40 steps to go is 80 s
    assert line == "progress: step 60/100 (60%) loss 2.3457 tokens/s 12,346 elapsed 1m40s eta 1m20s"
    assert "eta ?" in progress_line(10, 100, 10, 0.0, None, None)
    assert "eta 0m00s" in progress_line(100, 100, 0, 3725.0, 1.0, 1.0) and "elapsed 1h02m" in progress_line(
        100, 100, 0, 3725.0, 1.0, 1.0
    )


def test_schedule_steps_makes_a_segment_follow_the_whole_budgets_learning_rates():
    from diffmoe.train.schedule import lr_lambda, lr_multiplier

    whole = TrainJobConfig.model_validate({"train": {"max_steps": 3000}, "optim": {"warmup_steps": 100}})
    segment = whole.model_copy(deep=True)
    segment.train.max_steps, segment.optim.schedule_steps = 500, 3000
    assert [lr_lambda(segment)(s) for s in (0, 250, 499)] == [lr_lambda(whole)(s) for s in (0, 250, 499)]
    alone = whole.model_copy(deep=True)
    alone.train.max_steps = 500  # without schedule_steps the cosine would end at step 500
    assert lr_lambda(alone)(499) < lr_lambda(segment)(499)
    assert lr_lambda(segment)(499) == lr_multiplier(499, whole.optim, 3000)


def test_block_schedule_picks_each_phase_and_keeps_the_last():
    from diffmoe.diffusion import ObjectiveConfig

    obj = ObjectiveConfig(block_schedule=[(2, 1), (3, 8), (1, 4)])
    assert [obj.block_length_at(s) for s in range(7)] == [1, 1, 8, 8, 8, 4, 4]
    assert ObjectiveConfig().block_length_at(5) == 32  # no schedule: block.block_length
    assert ObjectiveConfig(balance="expert_bias").router_loss_coefs == (0.0, 0.0)
    assert ObjectiveConfig(balance="none").router_loss_coefs == (0.0, 0.0)
    assert ObjectiveConfig().router_loss_coefs == (0.01, 0.001)


def test_expert_bias_moves_towards_underloaded_experts():
    from diffmoe.train.balance import bias_step

    bias = torch.zeros(4)
    bias_step(bias, torch.tensor([6.0, 2.0, 4.0, 4.0]), 0.1)
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])


def test_block_diffusion_objective_module_honours_documents_and_block_length():
    """A LLaDA2 model trains with the block objective: documents become the [2L, 2L] mask's document
    term (no 4-D mask), the step's block length is used, and aux-free balancing adds no router loss."""
    from diffmoe.model import LLaDA2MoeModelLM, llada2_named_config

    torch.manual_seed(0)
    lm = LLaDA2MoeModelLM(llada2_named_config("llada2-tiny", vocab_size=128))
    cfg = TrainJobConfig.model_validate(
        {
            "train": {
                "document_mask": True,
                "objective": {"balance": "expert_bias", "block": {"confidence_beta": 1.0}},
            }
        }
    )
    module = ObjectiveModule(lm, cfg)
    batch = _packed_batch()
    terms = module(batch, torch.Generator().manual_seed(1), block_length=8)
    assert terms.aux_loss is None and terms.num_masked > 0
    assert torch.isfinite(terms.total) and float(terms.confidence) >= 0
    terms.total.backward()
    # same draws, other block length: another mask, so another loss
    other = module(batch, torch.Generator().manual_seed(1), block_length=16)
    assert float(other.diffusion) != pytest.approx(float(terms.diffusion))
    aux = ObjectiveModule(lm, TrainJobConfig())(batch, torch.Generator().manual_seed(1), block_length=8)
    assert aux.aux_loss is not None and float(aux.total) > float(aux.diffusion)


def test_workers_get_an_absolute_init_from(tmp_path, monkeypatch):
    """Ray Train workers do not start in the driver's directory: a relative model.init_from that
    preflight found must reach them as an absolute path."""
    from diffmoe.train.trainer import worker_view

    monkeypatch.chdir(tmp_path)
    cfg = TrainJobConfig.model_validate({"model": {"init_from": "artifacts/ar"}})
    assert worker_view(cfg)["model"]["init_from"] == str(tmp_path / "artifacts" / "ar")
    assert worker_view(TrainJobConfig())["model"]["init_from"] is None


def test_weight_average_updates_swaps_in_and_restores_exactly():
    from diffmoe.train.ema import WeightAverage

    model = _tiny()
    start = [p.detach().clone() for p in model.parameters()]
    ema = WeightAverage(model, 0.75)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert ema.decay_at(0) == 0.1 and ema.decay_at(26) == 0.75  # early steps weigh the init less
    ema.update(step=1000)  # 0.75 * start + 0.25 * (start + 1)
    trained = [p.detach().clone() for p in model.parameters()]
    with ema.swapped():
        for p, s0 in zip(model.parameters(), start):
            torch.testing.assert_close(p, s0 + 0.25)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))  # bit for bit
    with pytest.raises(RuntimeError), ema.swapped():
        raise RuntimeError("a failing check still gets the trained weights back")
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    ema.take_from_module()
    with ema.swapped():
        assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    with pytest.raises(ValueError, match="ema_decay=1.0"):
        WeightAverage(model, 1.0)
