"""The data-constrained regime in miniature: a fixed, small set of unique examples repeated for more
and more epochs, the AR twin against the masked-diffusion model (same backbone, data, batch, job).

The published finding: AR models stop gaining from repeated data after a few epochs and then
overfit, while masked diffusion keeps improving for many more (the random masks act as data
augmentation). Each side is one training run of the platform's job, paused at the epoch counts in
``data_constrained.epochs`` (each segment resumes the same run; the learning rate is constant
after warm-up, so where it pauses changes nothing). At every pause: the validation loss per scored
token on the held-out rows (diffusion: the ELBO bound, an upper bound on its NLL; AR: the exact
NLL, so a diffusion bound below the AR NLL is a conservative win) and exact match on held-out
prompts decoded by the serving Engine.

``data_constrained.corpus: text`` runs the same study on language-model pretraining, closer to the
published setting: the first ``text_documents`` standard-library modules (BPE, packed rows), a
held-out share of the documents for the validation loss, and no task accuracy.
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
    SIDES,
    Prepared,
    accuracy,
    load_model,
    prepare_data,
    train_config,
    validation_loss,
    validation_rows,
)


class DataConstrainedSection(StrictModel):
    # pauses of each side's one run, in epochs over the unique training rows
    epochs: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    # task: the comparison's SFT rows (task.train_examples of them); text: pretraining on the first
    # text_documents standard-library modules (task.validation_fraction of them held out)
    corpus: Literal["task", "text"] = "task"
    text_documents: int = Field(16, ge=2)
    text_seq_len: int = Field(128, ge=16)
    text_vocab_size: int = Field(1024, ge=256)  # the BPE trained on those documents


class DataConstrainedConfig(CompareConfig):
    # a small unique budget (the point of the study); 10% of it held out for the validation loss
    task: TaskSection = TaskSection(name="reverse", train_examples=1500, validation_fraction=0.1)
    data_constrained: DataConstrainedSection = DataConstrainedSection()
    mlflow: MLflowSection = MLflowSection(experiment="data_constrained")
    output: OutputSection = OutputSection(work_dir="artifacts/data_constrained", name="data_constrained")

    @model_validator(mode="after")
    def _check_epochs(self) -> DataConstrainedConfig:
        epochs = self.data_constrained.epochs
        if not epochs or epochs != sorted(set(epochs)) or epochs[0] < 1:
            raise ValueError(f"data_constrained.epochs={epochs}: need increasing epoch counts >= 1")
        return self


def steps_for(epochs: int, train_rows: int, rows_per_step: int) -> int:
    """Optimizer steps that see ``epochs`` passes over ``train_rows`` (the last step may spill over)."""
    return max(1, math.ceil(epochs * train_rows / rows_per_step))


def prepare_text(cfg: DataConstrainedConfig, log) -> Prepared:
    """The first ``text_documents`` standard-library modules as packed pretraining rows (a BPE
    trained on them), ``task.validation_fraction`` of the documents held out."""
    from diffmoe.data import CorpusConfig, prepare_corpus

    d = cfg.data_constrained
    out = Path(cfg.output.work_dir) / "data" / "text"
    corpus = CorpusConfig(
        kind="pretrain",
        max_documents=d.text_documents,
        tokenizer={"train": {"vocab_size": d.text_vocab_size, "sample_docs": d.text_documents}},
        seq_len=d.text_seq_len,
        validation_fraction=cfg.task.validation_fraction,
        output_dir=str(out),
        overwrite=True,  # reused when unchanged, rebuilt when the settings changed
    )
    manifest = prepare_corpus(corpus, log=log)
    rows = {name: entry.sequences for name, entry in manifest.splits.items()}
    return Prepared(out, rows.get("train", 0), rows.get("validation", 0))


def segment_job(cfg: DataConstrainedConfig, side: str, data_dir: Path, steps: int):
    """``side``'s training job stopped at ``steps``: one segment of one run (same name and storage)."""
    from diffmoe.train.config import TrainJobConfig

    job = train_config(cfg, side, data_dir).model_dump()
    if cfg.data_constrained.corpus == "text":
        job["train"]["kind"] = "pretrain"
    job["optim"].update(schedule="constant")
    job["train"]["check"]["every"] = 0  # curves at fixed steps: no stopping at the target
    job["train"].update(max_steps=steps, checkpoint_every=steps, val_every=steps)
    job["mlflow"]["run_name"] = job["run"]["name"] = f"data-constrained-{side}"
    return TrainJobConfig.model_validate(job)


def run_side(cfg: DataConstrainedConfig, side: str, data_dir: Path, train_rows: int, log) -> list[dict]:
    """Train ``side`` through the epoch pauses; validation loss and accuracy at each."""
    from diffmoe.data import load_tokenizer
    from diffmoe.train.trainer import run_training

    rows_per_step = cfg.train.micro_batch_size * cfg.train.num_workers
    text = cfg.data_constrained.corpus == "text"
    seq_len = cfg.data_constrained.text_seq_len if text else cfg.task.seq_len
    ids, response = validation_rows(data_dir)
    storage = Path(cfg.output.work_dir).resolve() / "runs" / f"data-constrained-{side}"
    shutil.rmtree(storage, ignore_errors=True)  # a fresh run, never a resume of an older benchmark
    curve, seconds = [], 0.0
    for epochs in cfg.data_constrained.epochs:
        steps = steps_for(epochs, train_rows, rows_per_step)
        start = time.perf_counter()
        result = run_training(segment_job(cfg, side, data_dir, steps))
        seconds += time.perf_counter() - start
        model = load_model(result.model_dir)
        point = {
            "epochs": epochs,
            "steps": steps,
            "tokens": steps * rows_per_step * seq_len,
            "train_seconds": round(seconds, 1),
        }
        point.update(validation_loss(model, ids, response, cfg.decoding.val_draws, seed=cfg.train.seed))
        point["accuracy"] = None  # text: no task to score
        if not text:
            q = accuracy(cfg, model, *load_tokenizer(result.model_dir))
            point.update({k: q[k] for k in ("accuracy", "correct", "total")})
        log(
            f"{side} @ {epochs} epochs ({steps} steps): val {point['val_loss_per_token']:.4f}, "
            f"accuracy {point['accuracy']}"
        )
        curve.append(point)
    return curve


def crossing_epoch(dllm: list[dict], ar: list[dict], key: str = "val_loss_per_token") -> int | None:
    """The first epoch pause from which the diffusion side's validation loss stays below the AR
    side's to the end of the budget (None: it does not end below). A dip below while both are still
    untrained, followed by the AR side pulling ahead, is not a crossing."""
    below = [d[key] < a[key] for d, a in zip(dllm, ar, strict=True)]
    start = len(below)
    while start and below[start - 1]:  # the run of pauses below that reaches the end
        start -= 1
    return dllm[start]["epochs"] if start < len(below) else None


def summarise(curves: dict[str, list[dict]]) -> dict:
    """Where each side's validation loss bottoms out, where the curves cross, accuracies at the end."""

    def best(curve, key, pick):
        scored = [p for p in curve if p[key] is not None]
        if not scored:
            return None
        point = pick(scored, key=lambda p: p[key])
        return {"epochs": point["epochs"], key: point[key]}

    return {
        "loss_crossing_epoch": crossing_epoch(curves["dllm"], curves["ar"]),
        "best_val_loss": {s: best(c, "val_loss_per_token", min) for s, c in curves.items()},
        "best_accuracy": {s: best(c, "accuracy", max) for s, c in curves.items()},
        "final": {
            s: {k: c[-1][k] for k in ("epochs", "val_loss_per_token", "accuracy")} for s, c in curves.items()
        },
    }


def run_data_constrained(cfg: DataConstrainedConfig, log=print) -> dict:
    start = time.perf_counter()
    prepare = prepare_text if cfg.data_constrained.corpus == "text" else prepare_data
    prepared = prepare(cfg, log=lambda *a: None)
    log(f"data: {prepared.train_rows} unique train rows, {prepared.validation_rows} validation rows")
    curves = {side: run_side(cfg, side, prepared.data_dir, prepared.train_rows, log) for side in SIDES}
    return {
        "curves": curves,
        "summary": summarise(curves),
        "train_rows": prepared.train_rows,
        "validation_rows": prepared.validation_rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
