"""The per-worker training loop that Ray Train runs: DeepSpeed engine, diffusion loss, checkpoints.

Every rank builds the same seeded model, keeps its share of the experts (expert parallelism),
takes its micro-batches from one seeded global sample order (``sample_order``), and calls the
collectives (all-to-all, gradient reduction, checkpoint, ``ray.train.report``) in lockstep.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import deepspeed
import ray.train
import torch
import torch.distributed as dist
from torch import nn

from diffmoe.config import BLOCK_DIFFUSION, model_family
from diffmoe.diffusion import training_loss, validation_loss_sum
from diffmoe.model import config_from_dict
from diffmoe.model.checkpoint import read_weights
from diffmoe.model.convert import llada2_state_from
from diffmoe.parallel import (
    build_training_model,
    init_distributed,
    initialize,
    load_published_directory,
    load_published_state,
    moe_param_groups,
)
from diffmoe.rng import device_generator

from .balance import count_expert_load, update_expert_bias
from .checkpointing import (
    check_fingerprint,
    load_weights_before_engine,
    read_state,
    restore_average,
    restore_engine,
    save_checkpoint,
)
from .config import TrainJobConfig, effective_ep_size, effective_zero_stage
from .ema import WeightAverage, averaged
from .metrics import MetricsLogger, expert_load_metrics, progress_line
from .nonfinite import NonFiniteLossError, handle_nonfinite, loss_is_finite
from .quality_check import QualityCheck
from .sample_order import SampleOrder, ShardReader, TrainStream, record_samples, resume_position
from .schedule import lr_lambda

PROBE_SEED = 1234  # fixed batch whose logits the run saves, for parity checks after export


class ObjectiveModule(nn.Module):
    """Wraps the LM so the DeepSpeed engine's forward is the whole objective of its family
    (masked diffusion, next-token for the causal AR twin, block diffusion for LLaDA2.x)."""

    def __init__(self, lm: nn.Module, cfg: TrainJobConfig):
        super().__init__()
        self.lm = lm
        self.cfg = cfg

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
        validation: bool = False,
        block_length: int | None = None,
    ):
        """The training loss terms, or with ``validation`` the shared validation loss as
        (nats summed over scored tokens, token count). ``block_length``: this step's block size
        (block diffusion; default ``train.objective.block.block_length``)."""
        ids = batch["input_ids"].long()
        response = batch["response_mask"].bool() if "response_mask" in batch else None
        documents = response is None and self.cfg.train.document_mask and "segment_ids" in batch
        block = model_family(self.lm.config) == BLOCK_DIFFUSION
        mask, document_ids = None, None
        if documents and block:
            document_ids = batch["segment_ids"]  # the block objective builds its own [2L, 2L] mask
        elif documents:
            seg = batch["segment_ids"]
            mask = (seg[:, None, :, None] == seg[:, None, None, :]).contiguous()
        if validation:
            return validation_loss_sum(
                self.lm,
                ids,
                mask_id=self.lm.config.mask_token_id,
                response_mask=response,
                attention_mask=mask,
                generator=generator,
                objective=self.cfg.train.objective,
            )
        extra = {"document_ids": document_ids, "block_length": block_length} if block else {}
        return training_loss(
            self.lm,
            ids,
            mask_id=self.lm.config.mask_token_id,
            objective=self.cfg.train.objective,
            response_mask=response,
            attention_mask=mask,
            generator=generator,
            **extra,
        )


def _ds_config(cfg: TrainJobConfig, bf16: bool, world_size: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": effective_zero_stage(cfg.deepspeed.zero_stage, world_size)},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }


def set_niceness(value: int) -> None:
    """Ray starts task and actor workers at niceness 15, so any busy process at the default 0
    (raylet, GCS, the driver, other jobs) preempts a training thread and stalls the other threads
    at the next barrier. Training workers are a node's main work: raise them back. On Linux this
    sets the calling (training) thread and the compute threads it starts later; going below the
    current value needs CAP_SYS_NICE or root, otherwise say so and carry on."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, value)
    except OSError as err:
        print(f"scaling.worker_niceness={value} not applied ({err}); staying at {os.nice(0)}", flush=True)


def _mean_across_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _batches(shard, cfg: TrainJobConfig, device, drop_last: bool = True):
    return shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size, drop_last=drop_last, device=device)


def validate(engine, shard, cfg: TrainJobConfig, device) -> float | None:
    """Validation loss per scored token (``diffusion.validation_loss_sum``: the diffusion bound,
    or the AR twin's exact NLL) over the first ``val_batches`` batches of every rank, fixed masks."""
    if shard is None:
        return None
    engine.eval()
    gen = device_generator(device, cfg.train.seed + 99)
    total, n = 0.0, 0
    with torch.no_grad():
        # keep the last partial batch: a small validation split still yields a loss
        for i, batch in enumerate(_batches(shard, cfg, device, drop_last=False)):
            if i >= cfg.train.val_batches:
                break
            nats, tokens = engine(batch, gen, validation=True)
            total += float(nats)
            n += tokens
    engine.train()
    counts = torch.tensor([total, n], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    return float(counts[0] / counts[1]) if counts[1] > 0 else None


@contextmanager
def local_copy(checkpoint):
    """The checkpoint to resume from as a local directory (None: a fresh run), for every restore
    of the start-up. Each ``as_directory()`` of a checkpoint in remote storage downloads all of it
    (weights, every rank's optimizer shards, the average), so it is opened once, not per restore."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as d:
        yield Path(d)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = TrainJobConfig.model_validate(loop_config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_cuda = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if not use_cuda:  # use exactly the cores this worker reserved (Ray may leave OMP at 1)
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    if cfg.scaling.worker_niceness is not None:
        set_niceness(cfg.scaling.worker_niceness)
    init_distributed("nccl" if use_cuda else "gloo")
    bf16 = cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and use_cuda)
    model_config = config_from_dict(loop_config["model_config"])
    ep_size = effective_ep_size(cfg.deepspeed.ep_size, world, model_config.num_experts)
    torch.manual_seed(cfg.train.seed)
    model = build_training_model(model_config, ep_size, device=device)
    if cfg.model.convert_to == "block_diffusion":  # the AR twin's weights in the LLaDA2 layout
        load_published_state(
            model, llada2_state_from(read_weights(Path(cfg.model.init_from)), model_config.num_experts)
        )
    elif cfg.model.init_from:
        load_published_directory(model, cfg.model.init_from)  # shard by shard, this rank's share
    else:
        initialize(model, cfg.train.seed)  # identical on every rank, whatever the EP size
    if cfg.model.gradient_checkpointing:
        model.model.gradient_checkpointing = True

    with local_copy(ray.train.get_checkpoint()) as restored:
        state = {"step": 0, "epoch": 0, "position": 0}
        if restored is not None:
            state = read_state(restored, world, ep_size)
            load_weights_before_engine(model, restored, state)

        optimizer = torch.optim.AdamW(
            moe_param_groups(model),
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            weight_decay=cfg.optim.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        engine, _, _, _ = deepspeed.initialize(
            model=ObjectiveModule(model, cfg),
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=_ds_config(cfg, bf16, world),
        )
        if world == 1:  # nothing to average, yet DeepSpeed would flatten, reduce and copy back every grad
            engine.enable_backward_allreduce = False  # (~3% of a tiny model's CPU step, measured)
        if restored is not None:
            restore_engine(engine, restored, state)
        # after DeepSpeed: ZeRO may have re-pointed the parameters' storage
        ema = WeightAverage(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        ema_restored = ema is not None and restored is not None and restore_average(ema, model, restored)
    resumed_from = state["step"]

    logger = MetricsLogger(loop_config, rank, world, enabled=rank == 0)
    logger.event("restored", {"from_step": resumed_from, "how": state.get("restored", "fresh")})
    earlier_run = state.get("mlflow_run_id")
    if earlier_run and earlier_run != loop_config.get("mlflow_run_id"):  # a resubmitted job: link the runs
        logger.tag("resumed_from_run_id", earlier_run)
    zero, allreduce = engine.zero_optimization_stage(), engine.enable_backward_allreduce
    logger.event(
        "deepspeed", {"zero_stage": zero, "ep_size": ep_size, "bf16": bf16, "gradient_allreduce": allreduce}
    )
    if ema is not None:
        logger.event("ema", {"decay": ema.decay, "restored": ema_restored})
    logger.event("worker_env", {k: os.environ.get(k) for k in sorted(cfg.scaling.worker_env)})
    order = SampleOrder(loop_config["train_shard_rows"], cfg.train.seed)
    reader = ShardReader(loop_config["train_shards"], keep_all=bool(loop_config.get("cache_train")))
    if reader.keep_all:
        logger.event("train_split_in_memory", {"shards": len(reader.paths), "rows": order.total})
    batch_size = cfg.train.micro_batch_size
    stream = TrainStream(
        order, reader, resume_position(state, order.total, batch_size), rank, world, batch_size, device
    )
    val_shard = (
        ray.train.get_dataset_shard(cfg.data.validation_split) if loop_config.get("has_validation") else None
    )

    step = state["step"]
    if "weights_fingerprint" in state:
        check_fingerprint(model, state)
        logger.event("weights_fingerprint", {"step": step, "value": state["weights_fingerprint"]})
    if step == 0 or resumed_from:
        val = validate(engine, val_shard, cfg, device)
        if val is not None:
            logger.log({"val/loss": val}, step)
    tok_dir = Path(loop_config["tokenizer_dir"])  # absolute: a worker's cwd is not the driver's
    check = QualityCheck(cfg.train.check, tok_dir, rank, world) if cfg.train.check.every else None
    checks = state.get("checks", [])  # [step, accuracy] of every quality check so far
    tokens, busy, waited = 0, 0.0, 0.0
    step_seconds = 0.0  # this run's optimizer steps alone: no start-up, validation, checkpoints
    started, start_step, last_progress = time.perf_counter(), step, time.perf_counter()
    last_loss, last_rate = None, None
    nonfinite = state.get("nonfinite_skipped", 0)  # micro-batches dropped for a NaN/inf loss
    last = step >= cfg.train.max_steps
    while not last:
        t0 = time.perf_counter()
        for batch, epoch, consumed, indices in stream:  # endless: epoch after epoch
            waited += time.perf_counter() - t0
            if cfg.train.sample_log:
                record_samples(
                    cfg.train.sample_log,
                    rank,
                    {
                        "step": step + 1,
                        "resumed_from": resumed_from,
                        "rank": rank,
                        "world": world,
                        "indices": indices,
                    },
                )
            gen = device_generator(
                device, cfg.train.seed * 1_000_003 + rank * 7919 + consumed + epoch * 10**6
            )
            terms = engine(batch, gen, block_length=cfg.train.objective.block_length_at(step))
            if not loss_is_finite(terms.total):
                try:
                    nonfinite = handle_nonfinite(
                        cfg.train.on_nonfinite, cfg.train.max_nonfinite_skips, step + 1, nonfinite
                    )
                except NonFiniteLossError:
                    logger.flush()  # what was logged so far reaches MLflow before the run fails
                    raise
                logger.log({"train/nonfinite_skipped": nonfinite}, step + 1)
                t0 = time.perf_counter()
                continue
            engine.backward(terms.total)
            engine.step()
            if cfg.train.objective.balance == "expert_bias":
                count_expert_load(model)  # every micro-batch's tokens count towards the step's update
            tokens += batch["input_ids"].numel() * world
            busy += time.perf_counter() - t0
            step_seconds += time.perf_counter() - t0
            if not engine.is_gradient_accumulation_boundary():
                t0 = time.perf_counter()
                continue
            step += 1
            if ema is not None:
                ema.update(step)
            if cfg.train.objective.balance == "expert_bias":
                update_expert_bias(model, cfg.train.objective.bias_update_rate)
            last, loads = step == cfg.train.max_steps, None
            if check is not None and check.due(step, cfg.train.max_steps):
                loads = expert_load_metrics(model)  # this step's routing, before the check's decoding
                with averaged(ema):  # the model the run would export now
                    acc = check.accuracy(model, device)
                checks.append([step, acc])
                logger.log({"check/accuracy": acc}, step)
                last = last or acc >= cfg.train.check.target  # at quality: the run's last step
            if step % cfg.train.log_every == 0 or last:
                metrics = {
                    "train/loss": _mean_across_ranks(terms.diffusion.item(), device),
                    "train/masked_ce": _mean_across_ranks(terms.masked_ce.item(), device),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/tokens_per_s": tokens / max(busy, 1e-9),  # data wait + compute, no eval/ckpt
                    "train/data_wait_frac": waited / max(busy, 1e-9),  # input-bound when this grows
                    "train/nonfinite_skipped": nonfinite,
                }
                tokens, busy, waited = 0, 0.0, 0.0
                if terms.aux_loss is not None:
                    metrics["train/aux_loss"] = terms.aux_loss.item()
                    metrics["train/z_loss"] = terms.z_loss.item()
                if hasattr(terms, "confidence"):  # block diffusion: the CAP term, before its weight
                    metrics["train/confidence"] = _mean_across_ranks(terms.confidence.item(), device)
                    metrics["train/block_length"] = cfg.train.objective.block_length_at(step - 1)
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                metrics.update(loads if loads is not None else expert_load_metrics(model))
                logger.log(metrics, step)
                last_loss, last_rate = metrics["train/loss"], metrics["train/tokens_per_s"]
            now = time.perf_counter()
            if rank == 0 and (now - last_progress >= cfg.train.progress_every_s or last):
                line = progress_line(
                    step, cfg.train.max_steps, start_step, now - started, last_loss, last_rate
                )
                print(line, flush=True)
                last_progress = now
            if step % cfg.train.val_every == 0 or last:
                val = validate(engine, val_shard, cfg, device)
                if val is not None:
                    logger.log({"val/loss": val}, step)
            if step % cfg.train.checkpoint_every == 0 or last:
                state = {
                    "step": step,
                    "epoch": epoch,
                    "position": stream.position,  # global samples consumed over all epochs
                    "rows_per_epoch": order.total,
                    "world_size": world,
                    "resumed_from_step": resumed_from,
                    "ep_size": ep_size,
                    "nonfinite_skipped": nonfinite,
                    "checks": checks,
                    "mlflow_run_id": loop_config.get("mlflow_run_id"),  # a resubmission links back to it
                }
                report(
                    engine,
                    model,
                    ema,
                    state,
                    rank,
                    {
                        "step": step,
                        "resumed_from_step": resumed_from,
                        "epoch": epoch,
                        "step_seconds": round(step_seconds, 3),
                        "checks": checks,
                        "stopped_at_quality": last and step < cfg.train.max_steps,
                    },
                    last,
                )
            if last:
                break
            t0 = time.perf_counter()
    logger.close()


def report(engine, model, ema, state, rank, metrics, final: bool) -> None:
    """Checkpoint on every rank into a local directory and hand it to Ray Train (collective)."""
    local = Path(tempfile.mkdtemp(prefix="diffmoe-ckpt-"))
    try:
        save_checkpoint(engine, model, state, rank, local, ema)
        if final:
            with averaged(ema):  # the probe matches the exported weights
                save_probe_logits(model, rank, local)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local)))
    finally:
        shutil.rmtree(local, ignore_errors=True)


def save_probe_logits(model, rank: int, directory: Path) -> None:
    """Logits of the training-time (expert-parallel) forward on a fixed batch, for parity tests."""
    from safetensors.torch import save_file

    gen = device_generator("cpu", PROBE_SEED)  # the same ids on every device: drawn on the CPU, then moved
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(ids.to(next(model.parameters()).device)).logits.float().cpu()
    model.train(was_training)
    if rank == 0:
        save_file({"input_ids": ids, "logits": logits}, str(directory / "probe_logits.safetensors"))
