"""Offline evaluation of a trained model, as a Ray task (so it lands on a GPU node when asked).

Two numbers a training run's own metrics do not give: the objective per token on any dataset
split with fixed mask draws (for LLaDA-MoE the diffusion *upper bound* on NLL; for the causal twin
the exact NLL; ``diffusion.validation_loss_sum``, as in training-time validation and the benchmarks), and, on SFT data, the answers the serving ``Engine`` generates for the held-out
prompts scored against the references (exact match and per-position token accuracy).
Results go to a new MLflow run tagged with the evaluated model, so evaluations sit beside training
runs in the UI.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from diffmoe.cluster import connect
from diffmoe.config import StrictModel, model_family
from diffmoe.generation.config import DecodingConfig
from diffmoe.tracking import MLflowSection


class EvalDataSection(StrictModel):
    path: str = "data/sft_tiny"  # a dataset written by jobs/prepare_corpus.py (pretrain or sft)
    split: str = "validation"


class EvalConfig(StrictModel):
    model: str = "artifacts/finetune-tiny"  # HF directory or MLflow URI: runs:/<id>/model, models:/<name>/<v>
    data: EvalDataSection = EvalDataSection()
    batch_size: int = Field(8, ge=1)
    max_batches: int = Field(16, ge=1)  # loss over at most batch_size * max_batches rows
    seed: int = 0  # mask draws: the same seed gives the same masks, so models compare fairly
    generate_samples: int = Field(8, ge=0)  # SFT data: prompts answered by the Engine (0 = skip)
    decoding: DecodingConfig = DecodingConfig(gen_length=64, block_length=32, threshold=0.9, cache="dual")
    num_cpus: float = Field(1, gt=0)  # resources of the Ray task that evaluates
    num_gpus: float = Field(0, ge=0)
    mlflow: MLflowSection = MLflowSection()  # run_name default: eval-<model directory name>


class EvalError(ValueError):
    """The model, data or their combination cannot be evaluated; the message says which."""


def _rows(cfg: EvalConfig):
    import pyarrow.parquet as pq

    from diffmoe.data.manifest import shard_paths, verify_dataset

    try:
        manifest = verify_dataset(cfg.data.path)
        files = shard_paths(cfg.data.path, manifest, cfg.data.split)
    except ValueError as err:
        raise EvalError(f"data.path: {err}") from None
    if not files:
        raise EvalError(f"data.path: split {cfg.data.split!r} of {cfg.data.path} has no rows")
    want = cfg.batch_size * cfg.max_batches
    tables = []
    for f in files:
        tables.append(pq.read_table(f))
        if sum(t.num_rows for t in tables) >= want:
            break
    rows = {}
    for name in tables[0].column_names:
        rows[name] = [v for t in tables for v in t.column(name).to_pylist()][:want]
    return manifest, rows


def run_evaluation(cfg: EvalConfig, model_dir: str) -> dict:
    """Evaluate on this process's device; returns the metrics (runs inside the Ray task)."""
    import torch

    from diffmoe.data.tokenizer import load_tokenizer
    from diffmoe.model.source import load_model
    from diffmoe.rng import device_generator

    device = "cuda" if cfg.num_gpus and torch.cuda.is_available() else "cpu"
    model = load_model(Path(model_dir), device)
    tokenizer, special = load_tokenizer(model_dir)
    manifest, rows = _rows(cfg)
    for name, ours in (
        ("mask_token_id", manifest.tokenizer.mask_id),
        ("eos_token_id", manifest.tokenizer.eos_id),
    ):
        if getattr(model.config, name) != ours:
            raise EvalError(
                f"tokenizer mismatch: the model has {name}={getattr(model.config, name)}, data uses {ours}"
            )
    ids = torch.tensor(rows["input_ids"], dtype=torch.long)
    response = torch.tensor(rows["response_mask"], dtype=torch.bool) if "response_mask" in rows else None
    gen = device_generator(device, cfg.seed)
    total, weight = loss_per_token(model, ids, response, cfg.batch_size, gen, device)
    if not weight:
        raise EvalError(f"data.path: split {cfg.data.split!r} has no scored tokens")
    causal = model_family(model.config) == "autoregressive"
    metrics = {
        "eval/loss_per_token": total / weight,
        "eval/rows": float(len(ids)),
        "eval/tokens": float(weight),
    }
    metrics["eval/loss_is_exact_nll" if causal else "eval/loss_is_upper_bound"] = 1.0
    if response is not None and cfg.generate_samples:
        metrics.update(_generate(cfg, model, tokenizer, special.eos_id, ids, response))
    return metrics


def loss_per_token(model, ids, response, batch_size: int, gen, device) -> tuple[float, int]:
    """(nats summed over scored tokens, scored tokens) of the rows, batch by batch, with the one
    validation loss (``diffusion.validation_loss_sum``); ``gen`` fixes the mask draws."""
    import torch

    from diffmoe.diffusion import validation_loss_sum

    total, weight = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):  # the last batch may be partial
            batch = ids[start : start + batch_size].to(device)
            resp = None if response is None else response[start : start + batch_size].to(device)
            nats, tokens = validation_loss_sum(
                model, batch, mask_id=model.config.mask_token_id, response_mask=resp, generator=gen
            )
            total += float(nats)
            weight += tokens
    return total, weight


def _generate(cfg: EvalConfig, model, tokenizer, eos_id: int, ids, response) -> dict:
    """Answer held-out prompts with the Engine; exact match and per-position token accuracy."""
    from diffmoe.generation import Engine

    n = min(cfg.generate_samples, len(ids))
    prompts, refs = [], []
    for row, mask in zip(ids[:n].tolist(), response[:n].tolist()):
        start = mask.index(True) if True in mask else len(row)
        answer = [t for t, m in zip(row, mask) if m]
        refs.append(answer[: answer.index(eos_id)] if eos_id in answer else answer)
        prompts.append(row[:start])
    engine = Engine(model, tokenizer, max_batch_size=max(n, 1), eos_id=eos_id, default_config=cfg.decoding)
    t0 = time.perf_counter()
    outs = engine.run(prompts, cfg.decoding)
    seconds = time.perf_counter() - t0
    exact = sum(o.token_ids == r for o, r in zip(outs, refs)) / n
    hits = sum(sum(a == b for a, b in zip(o.token_ids, r)) for o, r in zip(outs, refs))
    tokens = sum(len(o.token_ids) for o in outs)
    return {
        "eval/exact_match": exact,
        "eval/token_accuracy": hits / max(1, sum(len(r) for r in refs)),
        "eval/output_tokens_per_s": tokens / max(seconds, 1e-9),
        "eval/forwards_per_token": engine.forwards / max(tokens, 1),
    }


def evaluate(cfg: EvalConfig) -> dict:
    """Resolve the model, evaluate it in a Ray task, log an MLflow run; returns metrics + run id."""
    import ray

    from diffmoe.data.manifest import verify_dataset
    from diffmoe.model.source import is_mlflow_uri, resolve
    from diffmoe.tracking import create_run, log_metrics, source_run_id, tag_model_version

    uri = cfg.mlflow.resolved_uri()
    if not is_mlflow_uri(cfg.model) and not Path(cfg.model).is_dir():
        raise EvalError(f"model: directory not found: {cfg.model}")
    try:  # before Ray: a wrong path fails in seconds, not after a task is scheduled
        verify_dataset(cfg.data.path)
    except ValueError as err:
        raise EvalError(f"data.path: {err}") from None
    connect()

    @ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    def task(cfg_json: dict) -> dict:
        c = EvalConfig.model_validate(cfg_json)
        return run_evaluation(c, str(resolve(c.model, uri)))

    try:
        metrics = ray.get(task.remote(cfg.model_dump(mode="json")))
    except ray.exceptions.RayTaskError as err:
        cause = err.as_instanceof_cause()
        raise (EvalError(str(cause)) if isinstance(cause, ValueError) else cause) from None
    tags = {"kind": "eval", "evaluated_model": cfg.model}
    name = f"eval-{Path(cfg.model.rstrip('/')).name}"
    client, run_id = create_run(cfg.mlflow, run_name=name, tags=tags, params=cfg.model_dump(mode="json"))
    log_metrics(client, run_id, metrics)
    # the scores also on the training run, so MLflow's run comparison shows them beside its losses
    trained = source_run_id(client, cfg.model) if is_mlflow_uri(cfg.model) else None
    if trained:
        client.set_tag(run_id, "evaluated_run_id", trained)
        log_metrics(client, trained, {k: v for k, v in metrics.items() if k.startswith("eval/")})
    version = tag_model_version(client, cfg.model, {**metrics, "eval_run_id": run_id})
    if version:
        client.set_tag(run_id, "evaluated_model_version", version)
    client.set_terminated(run_id)
    return {"run_id": run_id, **metrics}
