"""``CompareConfig``: every setting of the diffusion-vs-AR comparison, from YAML + ``--set``.

The masked-diffusion side and the AR twin differ only in ``model.overrides.causal`` (added for the
AR side) and in how the answer is decoded; data, steps, batch, optimiser, server, prompts and answer
lengths are shared. The third side (``block``) is the AR twin converted to LLaDA2-style block
diffusion and trained further on the same data (its own step budget, counted on top of the AR's).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from diffmoe.config import StrictModel
from diffmoe.tracking import MLflowSection


class TaskSection(StrictModel):
    # sort (the default): harder than copying, every answer token depends on the whole prompt; both
    # twins reach 0.99 in 1500 steps. reverse: solved by every side, no longer separates them.
    # lookup: values of keys in a fixed table, i.e. knowledge (the conversion benchmark's task).
    name: Literal["reverse", "sort", "addition", "lookup"] = "sort"  # diffmoe.generation.tasks
    min_digits: int = Field(4, ge=1)  # reverse, sort and lookup (2 digits per key)
    max_digits: int = Field(12, ge=1)
    train_examples: int = Field(40000, ge=16)  # written as JSONL, then the SFT data pipeline
    validation_fraction: float = Field(0.05, gt=0, lt=1)  # held out by the pipeline (example hash)
    seq_len: int = Field(48, ge=8)  # rows: prompt + answer + EOS padding
    eval_examples: int = Field(256, ge=1)  # held-out prompts (another seed) for exact-match accuracy
    eval_seed: int = 12345
    # Quality gate: sides are compared for speed only when every one reaches this exact match on
    # the held-out prompts; otherwise the report says which did not and gives no speed ratio.
    target_accuracy: float = Field(0.97, gt=0, le=1)


class ModelSection(StrictModel):
    name: str = "tiny"  # diffmoe.model.NAMED_CONFIGS
    overrides: dict[str, Any] = Field(
        default_factory=lambda: {"num_key_value_heads": 4, "expert_intermediate_size": 64}
    )


class TrainSection(StrictModel):
    steps: int = Field(3000, ge=1)  # budget per side (the lr schedule spans it); see check_every
    micro_batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    seed: int = 0
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    val_batches: int = Field(4, ge=1)  # the training loop's own val/loss (logged to MLflow)
    # Train until the target: every check_every steps a side's training run decodes check_prompts
    # held-out prompts (a seed apart from the reported ones) and ends once that exact match reaches
    # task.target_accuracy (the job's train.check); ``steps`` (block.steps) is then the budget, and
    # the lr schedule spans it. 0 = train every side its full budget, no checks.
    check_every: int = Field(250, ge=0)
    check_prompts: int = Field(128, ge=1)


class BlockSideSection(StrictModel):
    """The block-diffusion side: the trained AR twin's weights in the LLaDA2 layout, trained on by
    the conversion job (``model.convert_to: block_diffusion``) under a block-size ladder."""

    enabled: bool = True  # false: compare the masked-diffusion side and the AR twin only
    steps: int = Field(1500, ge=1)  # conversion budget, after (and on top of) the AR twin's steps
    lr: float = Field(3e-3, gt=0)  # 3e-3: 0.863 exact match after 400 steps, 1e-3: 0.723 (reverse)
    ladder: list[tuple[int, int]] = Field(default_factory=lambda: [(25, 1), (25, 4)])  # [steps, block]
    block_length: int = Field(8, ge=1)  # the ladder ends here; decoding and serving use it


class DecodingSection(StrictModel):
    threshold: float = Field(0.9, gt=0, le=1)  # diffusion: Fast-dLLM confidence threshold
    # Thresholds tried offline on the held-out prompts (the accuracy-vs-speed curve); the diffusion
    # side is served at the fastest (fewest forwards per answer token) within 1 point of the best
    # accuracy. [] = serve at ``threshold``.
    threshold_sweep: list[float] = Field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    cache: Literal["none", "prefix", "dual"] = "prefix"  # diffusion KV cache
    temperature: float = Field(0.0, ge=0)  # 0: greedy for both sides
    val_draws: int = Field(4, ge=1)  # mask draws per validation row for the diffusion bound


class LoadSection(StrictModel):
    concurrency: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    # open loop: Poisson arrivals at each rate (requests/s) for poisson_duration_s, after the closed
    # loop; [] = none. The top rates are meant to pass both sides' capacity (saturation).
    poisson_rates: list[float] = Field(default_factory=lambda: [8.0, 16.0, 32.0, 64.0, 128.0])
    poisson_duration_s: float = Field(8.0, gt=0)
    requests_per_client: int = Field(4, ge=1)  # per level: max(min_requests, this x concurrency)
    min_requests: int = Field(16, ge=1)
    duration_s: float = Field(60.0, gt=0)  # cap on sending time per level
    prompts: int = Field(64, ge=1)  # held-out prompts cycled by the clients (same order, both sides)
    warmup_requests: int = Field(8, ge=0)
    # False (the headline): each side stops at its own end marker, as users are served. True: every
    # answer is decoded to its full canvas (EOS padding counted as output), a variant that flatters
    # the side that fills padding in parallel.
    ignore_eos: bool = False
    replica_cpus: float = Field(2.0, gt=0)
    replica_gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(32, ge=1)
    http_port: int = Field(0, ge=0, le=65535)  # 0: a free loopback port


class OutputSection(StrictModel):
    work_dir: str = "artifacts/dllm_vs_ar"  # data, Ray Train storage, exported models
    report_dir: str | None = "docs/benchmarks"  # <name>.json/.md/*.png; null = no report files
    name: str = "dllm_vs_ar"


class CompareConfig(StrictModel):
    task: TaskSection = TaskSection()
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    block: BlockSideSection = BlockSideSection()
    decoding: DecodingSection = DecodingSection()
    load: LoadSection = LoadSection()
    mlflow: MLflowSection = MLflowSection(experiment="dllm_vs_ar")  # run_name: prefix of benchmark-<side>
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _check(self) -> CompareConfig:
        if "causal" in self.model.overrides:
            raise ValueError("model.overrides.causal is set per side by the comparison; remove it")
        if not self.load.concurrency or min(self.load.concurrency) < 1:
            raise ValueError(f"load.concurrency={self.load.concurrency}: need levels >= 1")
        if any(not 0 < t <= 1 for t in self.decoding.threshold_sweep):
            raise ValueError(f"decoding.threshold_sweep={self.decoding.threshold_sweep}: need 0 < t <= 1")
        if self.load.poisson_rates and min(self.load.poisson_rates) <= 0:
            raise ValueError(f"load.poisson_rates={self.load.poisson_rates}: rates must be > 0")
        if self.task.min_digits > self.task.max_digits:
            raise ValueError("task.min_digits exceeds task.max_digits")
        lengths = [self.block.block_length] + [b for _, b in self.block.ladder]
        if self.block.enabled and any(self.task.seq_len % b for b in lengths):
            raise ValueError(
                f"block.block_length / block.ladder lengths {lengths} must all divide task.seq_len={self.task.seq_len}"
            )
        return self
