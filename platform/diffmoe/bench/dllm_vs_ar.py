"""The whole comparison: data -> train the sides (the masked-diffusion model, the AR twin, and the
block-diffusion model converted from that twin) -> quality -> load -> MLflow -> report.

``run_comparison(cfg)`` is what ``jobs/benchmark.py`` (``ray job submit``), the test and
``benchmarks/bench_dllm_vs_ar.py`` call. It joins a running Ray cluster (``RAY_ADDRESS`` or a local
``ray start``) or starts a local one.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from diffmoe.cluster import connect

from .config import CompareConfig
from .quality import (
    OBJECTIVES,
    accuracy,
    block_length_of,
    load_model,
    prepare_data,
    sides,
    sweep_point,
    threshold_sweep,
    train_side,
    validation_loss,
    validation_rows,
)

LEVEL_METRICS = {
    "requests_per_s": ("requests_per_s", None),
    "output_tokens_per_s": ("output_tokens_per_s", None),
    "latency_p50_s": ("latency_s", "p50"),
    "latency_p99_s": ("latency_s", "p99"),
    "ttft_p50_s": ("ttft_s", "p50"),
    "ttft_p99_s": ("ttft_s", "p99"),
    "replica_cpu_s_per_1k_tokens": ("replica_cpu_s_per_1k_tokens", None),
    "machine_cpu_s_per_1k_tokens": ("machine_cpu_s_per_1k_tokens", None),
    "gpu_s_per_1k_tokens": ("gpu_s_per_1k_tokens", None),
    "error_rate": ("error_rate", None),
}


def level_value(stats: dict, name: str):
    key, sub = LEVEL_METRICS[name]
    value = stats.get(key)
    return value.get(sub) if sub and isinstance(value, dict) else value


def _ensure_ray() -> None:
    connect()  # $RAY_ADDRESS, else the cluster `ray start` left on this machine, else a local one


def quality(cfg: CompareConfig, trained: dict[str, dict], data_dir: Path, log=print) -> dict[str, dict]:
    from diffmoe.data import load_tokenizer

    ids, response = validation_rows(data_dir)
    out = {}
    for side in trained:
        model = load_model(trained[side]["model_dir"])
        tok, special = load_tokenizer(trained[side]["model_dir"])
        block = block_length_of(cfg, side)
        q = validation_loss(model, ids, response, cfg.decoding.val_draws, seed=cfg.train.seed)
        if side != "ar" and cfg.decoding.threshold_sweep:
            sweep = threshold_sweep(cfg, model, tok, special, block)
            chosen = choose_threshold(sweep)
            q.update(chosen, threshold_sweep=[sweep_point(x) for x in sweep])
            log(f"{side}: threshold sweep {[sweep_point(x) for x in sweep]} -> {chosen['threshold']}")
        else:
            q.update(accuracy(cfg, model, tok, special, block))
            q["threshold"] = None if side == "ar" else cfg.decoding.threshold
        q["block_length"] = block
        q["parameters"] = sum(p.numel() for p in model.parameters())
        q["causal"] = bool(getattr(model.config, "causal", False))
        out[side] = q
        log(
            f"{side}: val loss {q['val_loss_per_token']:.4f} nats/token ({q['val_loss_kind']}), "
            f"accuracy {q['accuracy']:.3f}, offline {q['offline_tokens_per_s']:.0f} tokens/s"
        )
    return out


def choose_threshold(sweep: list[dict]) -> dict:
    """The fastest setting within 1 point of the best accuracy: fewest forwards per answer token
    (deterministic, unlike offline tokens/s on a shared machine); ties go to the higher threshold."""
    best = max(x["accuracy"] for x in sweep)
    near = [x for x in sweep if x["accuracy"] >= best - 0.01]
    return min(near, key=lambda x: (x["forwards_per_token"], -x["threshold"]))


def log_mlflow(cfg: CompareConfig, result: dict, files: list[Path]) -> dict[str, str]:
    """One run per side in ``mlflow.experiment`` (the training runs are there too); level metrics
    use the concurrency as the step, so the two runs overlay in MLflow's compare view."""
    from diffmoe.tracking import create_run, log_metrics

    run_ids = {}
    for side in result["sides"]:
        s = result["sides"][side]
        params = {"side": side, "objective": s["objective"], "val_loss_kind": s["quality"]["val_loss_kind"]}
        params["cfg"] = cfg.model_dump(mode="json")
        tags = {"side": side, "train_run_id": str(s["train"]["run_id"]), "benchmark": cfg.output.name}
        name = f"{cfg.mlflow.run_name or 'benchmark'}-{side}"
        section = cfg.mlflow.model_copy(update={"run_name": None})
        client, rid = create_run(section, run_name=name, tags=tags, params=params)
        run_ids[side] = rid
        q = s["quality"]
        metrics = {
            f"quality/{k}": float(q[k])
            for k in ("val_loss_per_token", "accuracy", "offline_tokens_per_s", "forwards_per_token")
        }
        metrics["train/seconds"] = float(s["train"]["train_seconds"])
        metrics["train/steps"] = float(s["train"]["steps"])
        metrics["train/tokens"] = float(s["train"]["tokens"])
        log_metrics(client, rid, metrics)
        for stats in s["load"]:
            level = {}
            for name in LEVEL_METRICS:
                value = level_value(stats, name)
                if isinstance(value, (int, float)) and value == value:
                    level[f"load/{name}"] = float(value)
            log_metrics(client, rid, level, step=int(stats["concurrency"]))
        for f in files:
            client.log_artifact(rid, str(f), "report")
        client.set_terminated(rid, "FINISHED")
    return run_ids


def run_comparison(cfg: CompareConfig, command: str | None = None, log=print) -> dict:
    from . import report
    from .load import run_load

    start = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    _ensure_ray()
    prepared = prepare_data(cfg, log=lambda *a: None)
    log(
        f"data: {prepared.train_rows} train / {prepared.validation_rows} validation rows in {prepared.data_dir}"
    )
    trained = {}
    for side in sides(cfg):
        init_from = trained["ar"]["model_dir"] if side == "block" else None
        trained[side] = train_side(cfg, side, prepared.data_dir, init_from, log)
        log(f"{side}: trained {trained[side]['steps']} steps in {trained[side]['train_seconds']}s")
    qual = quality(cfg, trained, prepared.data_dir, log)
    thresholds = {s: qual[s]["threshold"] for s in trained}  # the swept choice (None: the AR twin)
    load = run_load(cfg, {side: trained[side]["model_dir"] for side in trained}, thresholds, log)
    result = {
        "config": cfg.model_dump(mode="json"),
        "data": {"train_rows": prepared.train_rows, "validation_rows": prepared.validation_rows},
        "sides": {
            side: {"objective": OBJECTIVES[side], "train": trained[side], "quality": qual[side], **load[side]}
            for side in trained
        },
    }
    result["load_average_at_start"] = load_start
    result["headline"] = report.headline(result)
    result["seconds"] = round(time.perf_counter() - start, 1)
    out_dir = Path(cfg.output.report_dir) if cfg.output.report_dir else Path(tempfile.mkdtemp())
    files = report.write(result, out_dir, cfg.output.name, command or "python jobs/benchmark.py")
    result["mlflow_run_ids"] = log_mlflow(cfg, result, files)
    result["files"] = [str(f) for f in files]
    return result
