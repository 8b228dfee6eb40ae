"""Data, training and quality for the comparison: one SFT dataset through the data pipeline, both
twins trained by the platform's training job (``run_training``: Ray Train + DeepSpeed + MLflow) with
the same steps and batch, then validation loss per response token and exact-match accuracy.

Validation loss, on the same held-out rows and the same scored tokens (response + EOS padding, as
the SFT objective scores them), in nats per token, from the platform's one validation loss
(``diffusion.validation_loss_sum``, also used by training-time validation and jobs/evaluate.py):
- diffusion: the masked-diffusion bound, sum over masked response tokens of CE / p, averaged over
  ``val_draws`` mask draws per row and divided by the number of response tokens. It is an
  **upper bound** on the NLL (the ELBO), not the NLL itself;
- AR: the **exact** next-token NLL of the same tokens.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffmoe.config import model_family
from diffmoe.generation import DecodingConfig, task_check
from diffmoe.generation.tasks import make_examples, write_char_tokenizer, write_jsonl
from diffmoe.rng import device_generator

from .config import CompareConfig

SIDES = ("dllm", "ar")  # the two twins trained from scratch; ``sides(cfg)`` adds the converted one
OBJECTIVES = {
    "dllm": "masked diffusion (bidirectional)",
    "ar": "next-token (causal mask)",
    "block": "block diffusion (LLaDA2 layout), converted from the AR twin",
}


def sides(cfg: CompareConfig) -> tuple[str, ...]:
    """The compared sides, in training order (``block`` starts from the trained AR twin)."""
    return SIDES + (("block",) if cfg.block.enabled else ())


def block_length_of(cfg: CompareConfig, side: str) -> int | None:
    """The decoding block of a block-diffusion side; None: one block over the whole canvas."""
    return cfg.block.block_length if side == "block" else None


@dataclass
class Prepared:
    data_dir: Path
    train_rows: int
    validation_rows: int


# the seed the task's training examples are drawn with (held-out prompts use cfg.task.eval_seed)
TRAIN_SEED = 1


def make_task(cfg: CompareConfig):
    return task_check.make_task(cfg.task.name, cfg.task.min_digits, cfg.task.max_digits)


def prepare_data(cfg: CompareConfig, log=print) -> Prepared:
    """Task JSONL -> chat-templated SFT Parquet shards (train + validation) with a char tokenizer.
    A rerun over the same work directory reuses them, or rebuilds them when the task changed."""
    from diffmoe.data import CorpusConfig, prepare_corpus

    root = Path(cfg.output.work_dir) / "data"
    write_char_tokenizer(root / "tokenizer")
    write_jsonl(make_examples(make_task(cfg), cfg.task.train_examples, seed=TRAIN_SEED), root / "task.jsonl")
    corpus = CorpusConfig(
        kind="sft",
        inputs=[str(root / "task.jsonl")],
        tokenizer={"path": str(root / "tokenizer")},
        seq_len=cfg.task.seq_len,
        validation_fraction=cfg.task.validation_fraction,
        output_dir=str(root / "sft"),
        overwrite=True,  # the benchmark's own copy: reused when unchanged, rebuilt when the task changed
    )
    manifest = prepare_corpus(corpus, log=log)
    rows = {name: entry.sequences for name, entry in manifest.splits.items()}
    return Prepared(root / "sft", rows.get("train", 0), rows.get("validation", 0))


def budget_of(cfg: CompareConfig, side: str) -> int:
    """A side's training budget in steps (the block side's conversion steps are its own)."""
    return cfg.block.steps if side == "block" else cfg.train.steps


def train_config(cfg: CompareConfig, side: str, data_dir: Path, init_from: str | None = None):
    """The training job's config for one side: identical except ``causal`` for the AR twin; the
    ``block`` side converts ``init_from`` (the trained AR twin) with its own steps and lr. With
    ``train.check_every`` the run checks its exact match on the check prompts that often and ends
    once it reaches ``task.target_accuracy`` (``train.check``, measured inside the run)."""
    from diffmoe.train.config import TrainJobConfig

    work = Path(cfg.output.work_dir).resolve()
    t = cfg.train
    steps = budget_of(cfg, side)
    overrides = {**cfg.model.overrides, **({"causal": True} if side == "ar" else {})}
    job = {
        "model": {"name": cfg.model.name, "overrides": overrides},
        "data": {"path": str(data_dir)},
        "optim": {
            "lr": t.lr,
            "warmup_steps": t.warmup_steps,
            "schedule": "cosine",
            "weight_decay": 0.01,
        },
        "train": {
            "kind": "sft",
            "max_steps": steps,
            "micro_batch_size": t.micro_batch_size,
            "seed": t.seed,
            "log_every": max(1, steps // 20),
            "val_every": steps,
            "val_batches": t.val_batches,
            "checkpoint_every": steps,
            "check": check_section(
                cfg,
                every=t.check_every,
                prompts=t.check_prompts,
                seed=check_seed(cfg),
                target=cfg.task.target_accuracy,
                block_length=block_length_of(cfg, side),
            ),
        },
        "scaling": {"num_workers": t.num_workers, "cpus_per_worker": t.cpus_per_worker, "max_failures": 0},
        "mlflow": {
            "tracking_uri": cfg.mlflow.tracking_uri,
            "experiment": cfg.mlflow.experiment,
            "run_name": f"train-{side}",
            "log_system_metrics": False,
        },
        "run": {
            "name": f"train-{side}",
            "storage_path": str(work / "runs"),
            "output_dir": str(work / "models" / side),
        },
    }
    if side == "block":
        b = cfg.block
        if init_from is None:
            raise ValueError("the block side converts the trained AR twin: pass its model directory")
        convert_job(job, init_from, schedule_upto(b.ladder, steps, b.block_length), b.lr)
    return TrainJobConfig.model_validate(job)


def check_section(cfg: CompareConfig, *, every, prompts, seed, target, block_length) -> dict:
    """A training job's ``train.check`` for this config's task and decoding: ``prompts`` from
    ``seed``, ending the run at ``target`` exact match."""
    return {
        "every": every,
        "task": cfg.task.name,
        "min_digits": cfg.task.min_digits,
        "max_digits": cfg.task.max_digits,
        "prompts": prompts,
        "seed": seed,
        "seq_len": cfg.task.seq_len,
        "target": target,
        "threshold": cfg.decoding.threshold,
        "cache": cfg.decoding.cache,
        "block_length": block_length,
        "max_batch_size": cfg.load.max_batch_size,
    }


def convert_job(
    job: dict,
    init_from: str,
    block_schedule,
    lr: float | None,
    confidence_beta: float = 0.0,
    weighting: str | None = None,
):
    """Turn a training job (dict) into AR -> block-diffusion conversion of ``init_from``: LLaDA2
    layout, the block-size schedule, the aux-loss balance of the source model, CAP weight and the
    loss weighting (None: the objective's default)."""
    job["model"].update(init_from=init_from, convert_to="block_diffusion", overrides={})
    block = {"confidence_beta": confidence_beta, **({"weighting": weighting} if weighting else {})}
    job["train"].setdefault("objective", {}).update(
        block_schedule=block_schedule, balance="aux_loss", block=block
    )
    if lr is not None:
        job["optim"]["lr"] = lr
    return job


def schedule_upto(ladder, steps: int, final: int) -> list[tuple[int, int]]:
    """The ladder's phases cut at ``steps``, the rest at ``final``: a prefix of one long schedule."""
    out, done = [], 0
    for phase_steps, length in ladder:
        take = min(phase_steps, steps - done)
        if take > 0:
            out.append((take, length))
            done += take
    if steps > done:
        out.append((steps - done, final))
    return out


def train_side(
    cfg: CompareConfig, side: str, data_dir: Path, init_from: str | None = None, log=print
) -> dict:
    """Train one side with the platform's training job (a fresh run, never a resume of an older
    one) until it reaches ``task.target_accuracy`` on the check prompts or its budget, whichever
    comes first (``train.check_every``: the run's own check). Seconds and machine CPU-seconds count
    the training job (start-up and checks included); ``step_seconds`` the steps alone."""
    from diffmoe.train.trainer import run_training

    job = train_config(cfg, side, data_dir, init_from)
    shutil.rmtree(Path(job.run.storage_path) / job.run.name, ignore_errors=True)
    start, busy = time.perf_counter(), machine_busy_s()
    result = run_training(job)
    seconds, cpu_seconds = time.perf_counter() - start, machine_busy_s() - busy
    checks = [{"steps": s, "accuracy": a} for s, a in result.metrics.get("checks", [])]
    for c in checks:
        log(f"{side}: {c['steps']} steps, check accuracy {c['accuracy']:.3f}")
    reached = next((c["steps"] for c in checks if c["accuracy"] >= cfg.task.target_accuracy), None)
    return {
        "run_id": result.run_id,
        "model_dir": result.model_dir,
        "steps": result.final_step,
        "budget_steps": budget_of(cfg, side),
        "reached_target_at_step": reached,  # None: no check reached it (or checks are off)
        "checks": checks,
        "train_seconds": round(seconds, 1),
        "step_seconds": round(float(result.metrics.get("step_seconds", 0.0)), 1),  # optimizer steps alone
        "machine_cpu_seconds": round(cpu_seconds, 1),
        "tokens": t_tokens(cfg, result.final_step),
        **({"converted_from": init_from} if side == "block" else {}),
    }


def machine_busy_s() -> float:
    """CPU-seconds every core of this machine spent busy since boot (all processes)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def t_tokens(cfg: CompareConfig, steps: int) -> int:
    """Training tokens of ``steps`` optimizer steps: steps x batch x workers x seq_len (the block
    side's are its own conversion steps, on top of the AR twin's)."""
    t = cfg.train
    return steps * t.micro_batch_size * t.num_workers * cfg.task.seq_len


def load_model(model_dir: str):
    """The directory's model (either family) on the CPU in fp32, eval mode."""
    from diffmoe.model.source import load_model as load_family_model

    return load_family_model(Path(model_dir), device="cpu")


def validation_rows(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import pyarrow.parquet as pq

    from diffmoe.data import verify_dataset
    from diffmoe.data.manifest import shard_paths

    manifest = verify_dataset(data_dir)
    tables = [pq.read_table(p) for p in shard_paths(data_dir, manifest, "validation")]
    ids = torch.cat([torch.tensor(t.column("input_ids").to_pylist()) for t in tables]).long()
    if "response_mask" not in tables[0].column_names:  # pretraining rows: every token is scored
        return ids, torch.ones_like(ids, dtype=torch.bool)
    resp = torch.cat([torch.tensor(t.column("response_mask").to_pylist()) for t in tables]).bool()
    return ids, resp


@torch.inference_mode()
def validation_loss(model, ids, response, draws: int, batch: int = 64, seed: int = 0) -> dict:
    """Nats per scored token with the platform's one validation loss
    (``diffusion.validation_loss_sum``): the diffusion bound averaged over ``draws`` mask draws, or
    the AR twin's exact NLL."""
    from diffmoe.diffusion import validation_loss_sum

    causal = model_family(model.config) == "autoregressive"
    gen = device_generator(ids.device, seed)
    total, tokens = 0.0, 0
    for i in range(0, len(ids), batch):
        nats, n = validation_loss_sum(
            model,
            ids[i : i + batch],
            mask_id=model.config.mask_token_id,
            response_mask=response[i : i + batch],
            generator=gen,
            draws=draws,
        )
        total, tokens = total + float(nats), tokens + n
    kind = "exact NLL (next-token)" if causal else "diffusion upper bound on NLL (ELBO)"
    return {"val_loss_per_token": total / max(tokens, 1), "val_tokens": tokens, "val_loss_kind": kind}


def eval_prompts(cfg: CompareConfig, tokenizer, n: int | None = None, check: bool = False):
    """Held-out examples and their chat-templated prompt ids (the layout the SFT rows use).
    ``check``: the training-time check set (``train.check_prompts``, another seed), so that when
    to stop is never chosen on the prompts the report scores."""
    if check:
        n, seed = cfg.train.check_prompts, check_seed(cfg)
    else:
        n, seed = n or cfg.task.eval_examples, cfg.task.eval_seed
    examples = make_examples(make_task(cfg), n, seed=seed)
    return examples, task_check.chat_prompts(tokenizer, examples)


def check_seed(cfg: CompareConfig) -> int:
    return cfg.task.eval_seed + 1


def decoding_for(
    cfg: CompareConfig, prompt_len: int, stop_ids: list[int], block_length: int | None = None
) -> DecodingConfig:
    """Both sides: the answer canvas is the rest of a training row (the SFT layout), one block.
    The diffusion side uses threshold decoding; the AR side ignores the diffusion settings. A
    block-diffusion model decodes in blocks of ``block_length`` (canvas rounded up to whole blocks)."""
    d = cfg.decoding
    return task_check.answer_decoding(
        cfg.task.seq_len,
        prompt_len,
        stop_ids,
        threshold=d.threshold,
        cache=d.cache,
        temperature=d.temperature,
        block_length=block_length,
    )


def stop_ids(tokenizer) -> list[int]:
    from diffmoe.data.tokenizer import end_of_turn_ids

    return end_of_turn_ids(tokenizer)


def accuracy(
    cfg: CompareConfig, model, tokenizer, special, block_length: int | None = None, check: bool = False
) -> dict:
    """Exact match on held-out prompts, decoded offline by the same Engine the server runs
    (``block_length``: a block-diffusion model's decoding block; ``check``: the check prompts)."""
    examples, prompts = eval_prompts(cfg, tokenizer, check=check)
    stops = stop_ids(tokenizer)
    configs = [decoding_for(cfg, len(p), stops, block_length) for p in prompts]
    return task_check.engine_accuracy(
        model, tokenizer, special, examples, prompts, configs, cfg.load.max_batch_size
    )


def threshold_sweep(cfg: CompareConfig, model, tokenizer, special, block_length: int | None = None) -> list:
    """``accuracy`` at each of ``decoding.threshold_sweep`` (a diffusion model's speed/quality curve)."""
    return [
        {"threshold": t, **accuracy(_at_threshold(cfg, t), model, tokenizer, special, block_length)}
        for t in cfg.decoding.threshold_sweep
    ]


def sweep_point(x: dict) -> dict:
    keys = ("threshold", "accuracy", "forwards_per_token", "tokens_per_step", "offline_tokens_per_s")
    return {k: round(x[k], 4) for k in keys}


def _at_threshold(cfg: CompareConfig, threshold: float) -> CompareConfig:
    return cfg.model_copy(update={"decoding": cfg.decoding.model_copy(update={"threshold": threshold})})
