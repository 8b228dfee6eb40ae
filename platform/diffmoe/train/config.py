"""Typed configuration of a training run (pretraining or SFT), loaded from YAML + ``--set`` overrides.

``check()`` runs on the driver before any cluster resources are claimed, so a bad ``ep_size``,
missing data or a tokenizer that does not fit the model fails in seconds with a message naming
the key.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from diffmoe.config import StrictModel
from diffmoe.diffusion import ObjectiveConfig
from diffmoe.tracking import MLflowSection


class ModelSection(StrictModel):
    name: str = "tiny"  # a named size (diffmoe.model.NAMED_CONFIGS), e.g. tiny, llada-moe-7b-a1b
    overrides: dict[str, Any] = Field(default_factory=dict)  # LLaDAMoEConfig fields to change
    init_from: str | None = None  # HF directory (ours, a real LLaDA-MoE or LLaDA2.x download) to start from
    # AR -> diffusion conversion (jobs/convert.py): init_from must be a causal (AR) checkpoint.
    # block_diffusion: its weights in the LLaDA2 layout, trained with the block-diffusion objective
    # (train.objective.block, block_schedule) and exported as a LLaDA2 directory. masked_diffusion:
    # the same LLaDA-MoE network made bidirectional, trained with the masked-diffusion objective.
    convert_to: Literal["block_diffusion", "masked_diffusion"] | None = None
    gradient_checkpointing: bool = False


class DataSection(StrictModel):
    path: str = "data/corpus"  # output of jobs/prepare_corpus.py (manifest.json + shards)
    train_split: str = "train"
    validation_split: str = "validation"
    # Keep the whole decoded train split in each worker's memory when it is at most this many MiB;
    # larger splits keep only the two shards read last (each epoch visits the shards in a seeded
    # order, rows shuffled within a shard) and re-read Parquet every epoch. 0 = never keep all.
    cache_in_memory_mb: int = Field(1024, ge=0)


class OptimSection(StrictModel):
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # final lr = lr * min_lr_ratio
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1)  # wsd: share of steps spent decaying
    # Length of the lr schedule in steps; null = train.max_steps. Set to a larger budget to stop a run
    # early (or train it in resumed segments) on exactly the learning rates of the full run.
    schedule_steps: int | None = Field(None, ge=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping


class CheckSection(StrictModel):
    """Stop at quality: every ``every`` steps the model decodes held-out prompts of a checkable task
    (diffmoe.generation.tasks) with the serving Engine (metric check/accuracy), and the run ends,
    checkpointed and exported as at its last step, once exact match reaches ``target``. The prompts
    come from their own seed, so a report scoring other prompts never chose when to stop."""

    every: int = Field(0, ge=0)  # 0: off (train the whole max_steps)
    task: Literal["reverse", "sort", "addition", "lookup"] = "sort"  # diffmoe.generation.tasks
    min_digits: int = Field(4, ge=1)  # reverse, sort and lookup (2 digits per key)
    max_digits: int = Field(12, ge=1)
    prompts: int = Field(128, ge=1)  # shared out over the workers; the counts are summed
    seed: int = 12346  # of the check prompts: keep it apart from any prompts a report scores
    seq_len: int = Field(48, ge=8)  # prompt + answer canvas: the dataset's row length
    target: float = Field(0.97, ge=0, le=1)  # exact match to stop at (0: at the first check)
    threshold: float = Field(0.9, gt=0, le=1)  # diffusion decoding (an AR model decodes greedily)
    cache: Literal["none", "prefix", "dual"] = "prefix"  # the decoding KV cache
    block_length: int | None = Field(None, ge=1)  # block diffusion: the decoding block
    max_batch_size: int = Field(32, ge=1)  # rows decoded together by the Engine


class TrainSection(StrictModel):
    kind: Literal["pretrain", "sft"] = "pretrain"
    max_steps: int = Field(100, ge=1)  # optimizer steps
    micro_batch_size: int = Field(8, ge=1)  # sequences per worker per forward
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    log_every: int = Field(1, ge=1)
    progress_every_s: float = Field(30.0, gt=0)  # rank 0 prints step, loss, tokens/s and ETA this often
    val_every: int = Field(25, ge=1)
    val_batches: int = Field(4, ge=1)  # validation batches per worker
    checkpoint_every: int = Field(25, ge=1)  # a checkpoint is also written at max_steps
    document_mask: bool = False  # pretraining: attend only within each packed document
    # A NaN/inf training loss. stop: fail the run naming the step. skip: drop that micro-batch (no
    # backward, no optimizer update from it) and count it (metric train/nonfinite_skipped).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = Field(100, ge=0)  # skip: fail once more micro-batches were dropped
    objective: ObjectiveConfig = ObjectiveConfig()
    check: CheckSection = CheckSection()
    # Keep an exponential moving average of the weights (e.g. 0.99: about the last 100 steps) and
    # make it the model: train.check decodes with it and the run exports it. Checkpoints keep it
    # beside the trained weights (ema/), so resumes continue it. null: off.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # A directory: each worker appends one JSON line per micro-batch (optimizer step, the step the
    # run resumed from, global sample indices) to rank<N>.jsonl. For audits of the data order.
    sample_log: str | None = None


class DeepSpeedSection(StrictModel):
    # ZeRO-3 does not support DeepSpeed-MoE. A run on one worker has nothing to partition and
    # trains at stage 0 (same math, without ZeRO's copies into and out of flat partitions).
    zero_stage: Literal[1, 2] = 2
    # Expert-parallel group size; must divide num_experts and a fixed worker count. With elastic
    # num_workers the run uses the largest divisor of both the current world size and ep_size.
    ep_size: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU


def effective_zero_stage(zero_stage: int, world_size: int) -> int:
    """ZeRO partitions optimizer state and gradients over data-parallel ranks. With a single rank
    stages 1 and 2 partition nothing but still copy every gradient into a flat buffer, reduce it
    and copy updated weights back each step (4-12% of a tiny model's CPU step, measured)."""
    return zero_stage if world_size > 1 else 0


def effective_ep_size(ep_size: int, world_size: int, num_experts: int) -> int:
    """Largest EP group <= ep_size that divides the world size and the expert count."""
    return max(d for d in range(1, ep_size + 1) if world_size % d == 0 and num_experts % d == 0)


# Never trim the heap, and serve allocations up to 32 MiB from it instead of fresh mmaps: each
# step's activations reuse the last step's pages instead of faulting new zeroed ones in. glibc
# reads these at process start; other allocators ignore them.
HOST_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}


class ScalingSection(StrictModel):
    # An int, or [min, max] for elastic training (Ray Train V2 resizes between them).
    num_workers: int | tuple[int, int] = 1
    use_gpu: bool = False
    # CPUs each worker reserves; on CPU also its torch thread count. On a small CPU node leave a
    # core to Ray's own processes: with every core in torch threads their wakeups preempt compute.
    cpus_per_worker: float = Field(1, gt=0)
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint; -1 = unlimited
    # Ray runs actors at niceness 15, below Ray's own daemons and drivers; training workers reset it
    # to this (best effort: lowering it needs root or CAP_SYS_NICE). null = keep Ray's.
    worker_niceness: int | None = Field(0, ge=-20, le=19)
    # Environment variables of the training worker processes. The default keeps glibc malloc from
    # handing freed activation memory back to the kernel each step and faulting it in again
    # (about one page fault per token on a tiny CPU model, ~5% of its CPU time, measured).
    # Setting it replaces the default (keep the MALLOC_* entries to keep that).
    worker_env: dict[str, str] = Field(default_factory=lambda: dict(HOST_MALLOC_ENV))

    @field_validator("worker_env", mode="before")
    @classmethod
    def _env_values_as_strings(cls, value: Any) -> Any:
        """YAML reads ``MALLOC_ARENA_MAX: 2`` as a number; environment values are strings."""
        if isinstance(value, dict):
            return {k: str(v) if isinstance(v, int | float) else v for k, v in value.items()}
        return value

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


class TrainMLflowSection(MLflowSection):
    log_system_metrics: bool = True  # CPU/GPU/memory of rank 0 as system/* metrics


class RunSection(StrictModel):
    name: str = "pretrain-tiny"
    storage_path: str = "runs"  # Ray Train checkpoints and results (shared storage on a cluster)
    output_dir: str = "artifacts/pretrain-tiny"  # the exported Hugging Face model
    # Register the exported model in the MLflow Model Registry under this name (a new version
    # linked to the run; serve it as models:/<name>/<version> or models:/<name>@<alias>).
    register_as: str | None = None
    register_alias: str | None = None  # also point this alias (e.g. "candidate") at the new version


class TrainJobConfig(StrictModel):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    scaling: ScalingSection = ScalingSection()
    mlflow: TrainMLflowSection = TrainMLflowSection()
    run: RunSection = RunSection()

    @model_validator(mode="after")
    def _check_shapes(self) -> TrainJobConfig:
        s = self.scaling
        if s.min_workers < 1 or s.min_workers > s.max_workers:
            raise ValueError(f"scaling.num_workers={s.num_workers}: need 1 <= min <= max")
        ep = self.deepspeed.ep_size
        if isinstance(s.num_workers, int) and s.num_workers % ep:
            raise ValueError(f"deepspeed.ep_size={ep} does not divide scaling.num_workers={s.num_workers}")
        if self.train.check.every and ep > 1:
            raise ValueError(
                f"train.check.every needs deepspeed.ep_size 1 (got {ep}): the check decodes each "
                "worker's share of the prompts on its own, outside the expert-parallel all-to-all"
            )
        if self.model.convert_to and not self.model.init_from:
            raise ValueError("model.convert_to needs model.init_from: the causal (AR) checkpoint to convert")
        schedule = self.train.objective.block_schedule
        if schedule:
            if any(steps < 1 or length < 1 for steps, length in schedule):
                raise ValueError(
                    f"train.objective.block_schedule={schedule}: steps and block lengths must be >= 1"
                )
            total = sum(steps for steps, _ in schedule)
            if total != self.train.max_steps:
                raise ValueError(
                    f"train.objective.block_schedule phases add up to {total} steps but "
                    f"train.max_steps={self.train.max_steps}"
                )
        return self
