"""AR -> diffusion conversion, measured: accuracy against training tokens for four sides.

Same task data (the comparison's SFT set), backbone and batch for every side, each trained by the
platform's own training job (Ray Train + DeepSpeed + MLflow):

- ``ar``: the causal twin (next-token loss);
- ``converted``: ``ar``'s final weights in the LLaDA2 layout (``model.convert_to: block_diffusion``),
  trained on under a block-size ladder that ends at the serving block length;
- ``mdlm``: masked diffusion from scratch (the LLaDA-MoE recipe);
- ``block_scratch``: block diffusion from scratch: the same conversion job started from the causal
  twin's *initial* (untrained) weights, so backbone, init and objective match ``converted``.

A side is one training run to its budget, observed along the way: the run measures its own exact
match (``train.check``) every ``curve_every`` steps on the held-out prompts, decoded by the serving
Engine (threshold decoding for the diffusion sides, block diffusion in blocks of
``serving_block_length``). Learning rates are constant after warm-up, so the model at step k is the
model a run of k steps would end with: its weight average (``conversion.ema_decay``), which is what
such a run exports. Conversion at 0 steps is measured too: the AR weights decoded
by the block sampler before any diffusion training.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from diffmoe.config import StrictModel
from diffmoe.tracking import MLflowSection

from .config import CompareConfig, OutputSection, TaskSection
from .quality import (
    accuracy,
    check_section,
    convert_job,
    load_model,
    prepare_data,
    schedule_upto,
    sweep_point,
    threshold_sweep,
    train_config,
)

SIDES = ("ar", "converted", "mdlm", "block_scratch")


class ConversionSection(StrictModel):
    # steps at which each side's accuracy is reported; the last is the side's budget
    # The AR run stops once every reported prompt is right. On lookup the twin learnt the table in
    # 550-600 steps at seeds 0 and 1 but needed 2650 at seed 2 (0.50 exact match at 1500), so the
    # budget leaves room: conversion should start from a twin that knows the task.
    ar_checkpoints: list[int] = Field(default_factory=lambda: [500, 3000])
    convert_checkpoints: list[int] = Field(default_factory=lambda: [0, 100, 200, 400, 800, 1500])
    scratch_checkpoints: list[int] = Field(default_factory=lambda: [500, 1000, 1500])
    # conversion's warm-up ladder [[steps, block_length], ...] before the serving block length
    ladder: list[tuple[int, int]] = Field(default_factory=lambda: [(25, 1), (25, 4)])
    serving_block_length: int = Field(8, ge=1)
    # 3e-3 (the from-scratch lr): 0.41 / 0.62 / 0.86 exact match on reverse after 100 / 200 / 400
    # conversion steps, against 0.37 / 0.54 / 0.72 at 1e-3
    convert_lr: float = Field(3e-3, gt=0)
    target_accuracy_share: float = Field(0.95, gt=0, le=1)  # converted must reach this share of AR's
    # Each side is one training run whose accuracy is measured inside it (train.check on the reported
    # prompts) every gcd(curve_every, checkpoints) steps: the curve has every checkpoint, and more.
    curve_every: int = Field(50, ge=1)
    # Every side is measured and exported as its weight average (train.ema_decay): at the constant
    # lr 3e-3 the last step's weights swung by up to 0.25 exact match between neighbouring points.
    # null: the last step's weights.
    ema_decay: float | None = Field(0.99, gt=0, lt=1)
    # Loss weighting of every block-diffusion side (converted and from scratch alike). token_mean
    # (dFactory's mean CE over masked tokens): block diffusion from scratch on sort reached 0.93 /
    # 0.97 exact match at 400 / 500 steps, against 0.59 / 0.82 under elbo (LLaDA's CE / p with p
    # down to 0.001: a few rows with huge weights dominate the gradient).
    weighting: Literal["elbo", "token_mean"] = "token_mean"


class ConversionBenchConfig(CompareConfig):
    # lookup (keys -> values of a fixed table): knowledge the AR twin holds in its weights, which is
    # what conversion is for. On sort (a skill, nothing to remember) block diffusion from scratch
    # learns about as fast as the AR twin, and conversion needed 1/1.7 - 1/3 of its tokens.
    task: TaskSection = TaskSection(name="lookup", min_digits=6, max_digits=12)
    conversion: ConversionSection = ConversionSection()
    mlflow: MLflowSection = MLflowSection(experiment="ar_to_diffusion")
    output: OutputSection = OutputSection(work_dir="artifacts/ar_to_diffusion", name="ar_to_diffusion")

    @model_validator(mode="after")
    def _check_conversion(self) -> ConversionBenchConfig:
        c = self.conversion
        for name in ("ar_checkpoints", "convert_checkpoints", "scratch_checkpoints"):
            points = getattr(c, name)
            if not points or points != sorted(set(points)) or points[0] < 0:
                raise ValueError(f"conversion.{name}={points}: need increasing step counts >= 0")
        if self.task.seq_len % c.serving_block_length or any(self.task.seq_len % b for _, b in c.ladder):
            raise ValueError(f"every block length must divide task.seq_len={self.task.seq_len}")
        return self


def side_job(
    cfg: ConversionBenchConfig,
    side: str,
    data_dir: Path,
    steps: int,
    init_from: str | None,
    confidence_beta: float = 0.0,
    check: dict | None = None,
):
    """The training job of ``side`` for ``steps``; ``confidence_beta`` turns on CAP for a
    block-diffusion side; ``check`` (a ``train.check`` section) measures the curve inside the run."""
    from diffmoe.train.config import TrainJobConfig

    c = cfg.conversion
    job = train_config(cfg, "ar" if side == "ar" else "dllm", data_dir).model_dump()
    job["optim"].update(schedule="constant")
    job["train"]["check"] = {"every": 0} if check is None else check
    job["train"]["ema_decay"] = c.ema_decay
    job["train"].update(max_steps=steps, checkpoint_every=steps, val_every=steps)
    job["mlflow"]["run_name"] = job["run"]["name"] = f"conversion-{side}"
    job["run"]["output_dir"] = str(Path(job["run"]["output_dir"]).with_name(side))
    if side.startswith("converted") or side == "block_scratch":
        ladder = c.ladder if side.startswith("converted") else []
        lr = c.convert_lr if side.startswith("converted") else None
        schedule = schedule_upto(ladder, steps, c.serving_block_length)
        convert_job(job, init_from, schedule, lr, confidence_beta, c.weighting)
    return TrainJobConfig.model_validate(job)


def save_initial_twin(cfg: ConversionBenchConfig, data_dir: Path, out: Path) -> Path:
    """The causal twin's untrained weights (the training job's init, same seed) as a directory."""
    from diffmoe.model import LLaDAMoEModelLM
    from diffmoe.parallel import initialize
    from diffmoe.train.trainer import preflight

    model_config, _ = preflight(train_config(cfg, "ar", data_dir))
    model = LLaDAMoEModelLM(model_config)
    initialize(model, cfg.train.seed)  # what the training job starts from at this seed
    model.save_pretrained(out)
    for f in (data_dir / "tokenizer").iterdir():
        shutil.copy2(f, out / f.name)
    return out


def converted_in_memory(ar_dir: str):
    """The AR twin's weights as a LLaDA2 model, untrained: the 0-step point of the converted curve."""
    from diffmoe.model import LLaDA2MoeModelLM
    from diffmoe.model.checkpoint import load_config, read_weights
    from diffmoe.model.convert import llada2_config_from, llada2_state_from

    config = llada2_config_from(load_config(Path(ar_dir)))
    model = LLaDA2MoeModelLM(config)
    model.load_state_dict(llada2_state_from(read_weights(Path(ar_dir)), config.num_experts), strict=True)
    return model.eval()


def measure(cfg: ConversionBenchConfig, model, tokenizer_dir: str, block: bool) -> dict:
    from diffmoe.data import load_tokenizer

    tok, special = load_tokenizer(tokenizer_dir)
    q = accuracy(cfg, model, tok, special, cfg.conversion.serving_block_length if block else None)
    return {
        k: q[k] for k in ("accuracy", "correct", "total", "forwards_per_token", "tokens_per_step") if k in q
    }


def run_side(
    cfg,
    side: str,
    data_dir: Path,
    points: list[int],
    init_from: str | None,
    tokens_per_step: int,
    log,
    confidence_beta: float = 0.0,
):
    """Train ``side`` in one run to its last point (CAP with ``confidence_beta``), its exact match
    measured inside the run on the reported prompts (``train.check``, target 1.0: a run stops early
    only when perfect) every gcd(curve_every, points) steps. The last point is measured again on
    the exported model, with decoding speed. Returns the curve and the exported model directory."""
    from diffmoe.train.trainer import run_training

    storage = Path(cfg.output.work_dir).resolve() / "runs" / f"conversion-{side}"
    shutil.rmtree(storage, ignore_errors=True)  # a fresh run, never a resume of an older benchmark
    block = side.startswith("converted") or side == "block_scratch"
    curve = []
    if points and points[0] == 0:  # the AR weights decoded as a block-diffusion model, untrained
        point = {"steps": 0, "tokens": 0, **measure(cfg, converted_in_memory(init_from), init_from, block)}
        log(f"{side} @ 0 steps: accuracy {point['accuracy']:.3f}")
        curve.append(point)
    steps = [p for p in points if p > 0]
    if not steps:
        return curve, None
    check = curve_check(cfg, math.gcd(cfg.conversion.curve_every, *steps), block)
    job = side_job(cfg, side, data_dir, steps[-1], init_from, confidence_beta, check)
    start = time.perf_counter()
    result = run_training(job)
    seconds = round(time.perf_counter() - start, 1)
    for at, acc in result.metrics["checks"]:
        curve.append({"steps": at, "tokens": at * tokens_per_step, "accuracy": acc})
        log(f"{side} @ {at} steps: accuracy {acc:.3f}")
    last = curve[-1]
    last.update(measure(cfg, load_model(result.model_dir), result.model_dir, block))
    last.update(train_seconds=seconds, step_seconds=round(float(result.metrics["step_seconds"]), 1))
    return curve, result.model_dir


def curve_check(cfg, every: int, block: bool) -> dict:
    """The in-run measurement of a curve: the reported prompts and decoding, never a reason to stop
    before the budget unless every answer is right."""
    block_length = cfg.conversion.serving_block_length if block else None
    t = cfg.task
    return check_section(
        cfg, every=every, prompts=t.eval_examples, seed=t.eval_seed, target=1.0, block_length=block_length
    )


def first_crossing(curve: list[dict], level: float) -> dict | None:
    """The first measured point at or above ``level`` accuracy (None: never reached)."""
    return next((p for p in curve if p["accuracy"] >= level), None)


def run_conversion_benchmark(cfg: ConversionBenchConfig, log=print) -> dict:
    start = time.perf_counter()
    prepared = prepare_data(cfg, log=log)
    data = prepared.data_dir
    t = cfg.train
    tokens_per_step = t.micro_batch_size * t.num_workers * cfg.task.seq_len
    c = cfg.conversion
    curves = {}
    curves["ar"], ar_dir = run_side(cfg, "ar", data, c.ar_checkpoints, None, tokens_per_step, log)
    curves["converted"], _ = run_side(
        cfg, "converted", data, c.convert_checkpoints, ar_dir, tokens_per_step, log
    )
    curves["mdlm"], _ = run_side(cfg, "mdlm", data, c.scratch_checkpoints, None, tokens_per_step, log)
    init = save_initial_twin(cfg, data, Path(cfg.output.work_dir).resolve() / "models" / "ar-init")
    curves["block_scratch"], _ = run_side(
        cfg, "block_scratch", data, c.scratch_checkpoints, str(init), tokens_per_step, log
    )
    return {
        "curves": curves,
        "tokens_per_step": tokens_per_step,
        "train_rows": prepared.train_rows,
        "seconds": round(time.perf_counter() - start, 1),
    }


class CapSection(StrictModel):
    """CAP (confidence-aware parallel training) on top of conversion: same run with the confidence
    term on, compared at equal steps for accuracy and tokens decoded per forward."""

    confidence_beta: float = Field(1.0, gt=0)
    checkpoints: list[int] = Field(default_factory=lambda: [600, 1200])
    ar_model: str | None = None  # a trained AR twin to convert (skips training one)


class CapBenchConfig(ConversionBenchConfig):
    # Sort 8-24 digits decoded in LLaDA2's blocks of 32: answers take up to 25 positions of one or
    # two blocks, so tokens per forward has room to grow. Both earlier settings hit a ceiling of one
    # forward per block for both runs (CAP 1.0x): reverse 4-12 in blocks of 8 (~4.25 tokens per
    # forward) and reverse 8-24 in blocks of 32 (~10; every reversed digit is a copy, decoded at once).
    task: TaskSection = TaskSection(name="sort", min_digits=8, max_digits=24, seq_len=64)
    conversion: ConversionSection = ConversionSection(serving_block_length=32)
    cap: CapSection = CapSection()
    output: OutputSection = OutputSection(work_dir="artifacts/cap", name="cap")


def run_cap_benchmark(cfg: CapBenchConfig, log=print) -> dict:
    """The AR twin (trained, or ``cap.ar_model``) converted twice, without and with CAP."""
    start = time.perf_counter()
    data = prepare_data(cfg, log=log).data_dir
    t = cfg.train
    tokens_per_step = t.micro_batch_size * t.num_workers * cfg.task.seq_len
    ar_dir = cfg.cap.ar_model
    curves = {}
    if ar_dir is None:
        points = cfg.conversion.ar_checkpoints
        curves["ar"], ar_dir = run_side(cfg, "ar", data, points, None, tokens_per_step, log)
    points = cfg.cap.checkpoints
    curves["converted"], plain_dir = run_side(cfg, "converted", data, points, ar_dir, tokens_per_step, log)
    curves["converted_cap"], cap_dir = run_side(
        cfg, "converted_cap", data, points, ar_dir, tokens_per_step, log, cfg.cap.confidence_beta
    )
    sweeps = {side: final_sweep(cfg, d) for side, d in (("converted", plain_dir), ("converted_cap", cap_dir))}
    for side, sweep in sweeps.items():
        log(f"{side}: threshold sweep {sweep}")
    return {
        "curves": curves,
        "sweeps": sweeps,
        "ar_model": ar_dir,
        "seconds": round(time.perf_counter() - start, 1),
    }


def final_sweep(cfg: CapBenchConfig, model_dir: str) -> list[dict]:
    """The final model's accuracy and tokens per forward at each threshold of the sweep (the served
    one included), decoded by the serving Engine in blocks of ``serving_block_length``."""
    from diffmoe.data import load_tokenizer

    thresholds = sorted({*cfg.decoding.threshold_sweep, cfg.decoding.threshold})
    cfg = cfg.model_copy(update={"decoding": cfg.decoding.model_copy(update={"threshold_sweep": thresholds})})
    tok, special = load_tokenizer(model_dir)
    sweep = threshold_sweep(cfg, load_model(model_dir), tok, special, cfg.conversion.serving_block_length)
    return [sweep_point(x) for x in sweep]


def at_matched_accuracy(plain: list[dict], cap: list[dict], served: float, tolerance: float) -> dict:
    """CAP's speed at equal quality: each model at its fastest threshold (most tokens per forward)
    whose accuracy is at least the plain model's at the served threshold minus ``tolerance``. Both
    pick from the same sweep, so a lower threshold helps neither more than the other. ``ratio`` is
    None when no CAP setting gets there."""
    level = next(x["accuracy"] for x in plain if x["threshold"] == served) - tolerance

    def fastest(sweep):
        ok = [x for x in sweep if x["accuracy"] >= level]
        return max(ok, key=lambda x: (x["tokens_per_step"], x["threshold"])) if ok else None

    without, with_cap = fastest(plain), fastest(cap)
    ratio = None if with_cap is None else with_cap["tokens_per_step"] / without["tokens_per_step"]
    return {"accuracy_level": round(level, 4), "without_cap": without, "with_cap": with_cap, "ratio": ratio}
