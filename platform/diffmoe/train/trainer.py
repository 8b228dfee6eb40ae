"""Driver side of a training run: preflight checks, MLflow run, Ray Train TorchTrainer, export.

``run_training(cfg)`` is what ``jobs/pretrain.py`` and ``jobs/finetune.py`` call. Everything that
can be checked without a cluster (config shape, data manifest and checksums, tokenizer vs model)
is checked before the trainer claims any worker.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from diffmoe.cluster import connect
from diffmoe.config import AUTOREGRESSIVE, BLOCK_DIFFUSION, flatten, model_family
from diffmoe.data.manifest import Manifest, verify_dataset
from diffmoe.model import LLaDA2MoeConfig, LLaDAMoEConfig, llada2_named_config, named_config
from diffmoe.model.checkpoint import load_config
from diffmoe.model.convert import llada2_config_from

from .config import TrainJobConfig
from .ema import EMA_DIR

ModelConfig = LLaDAMoEConfig | LLaDA2MoeConfig


class TrainConfigError(ValueError):
    """The run cannot start: the message names the config key or file at fault."""


@dataclass
class TrainResult:
    run_id: str | None
    final_step: int
    checkpoint_path: str
    model_dir: str
    metrics: dict
    registered: str | None = None  # models:/<name>/<version> when run.register_as is set


def converted_config(config: ModelConfig, cfg: TrainJobConfig) -> ModelConfig:
    """``model.convert_to``: the causal checkpoint's config turned into the target family's."""
    if model_family(config) != AUTOREGRESSIVE:
        raise TrainConfigError(
            f"model.convert_to={cfg.model.convert_to!r} converts a causal (AR) checkpoint, but "
            f"model.init_from holds a {model_family(config)} model (a config with causal: true is AR)"
        )
    if cfg.model.convert_to == "masked_diffusion":
        config.causal = False
        return config
    try:
        converted = llada2_config_from(config)
    except ValueError as err:
        raise TrainConfigError(f"model.init_from: {err}") from None
    return converted


def resolve_model_config(cfg: TrainJobConfig, manifest: Manifest) -> ModelConfig:
    """The model's config: from ``init_from`` (fine-tuning, conversion) or a named size (LLaDA-MoE,
    or ``llada2-*`` for LLaDA2.x), with ids and vocabulary taken from the dataset's tokenizer so the
    two can never disagree silently."""
    tok = manifest.tokenizer
    if cfg.model.init_from:
        try:
            config = load_config(Path(cfg.model.init_from))
        except (FileNotFoundError, ValueError) as err:
            raise TrainConfigError(f"model.init_from: {err}") from None
        if cfg.model.convert_to:
            config = converted_config(config, cfg)
        if config.vocab_size < tok.vocab_size:
            raise TrainConfigError(
                f"model.init_from has vocab_size {config.vocab_size} but the dataset's tokenizer has "
                f"{tok.vocab_size} tokens: data.path was prepared with a different tokenizer"
            )
        for name, ours in (("mask_token_id", tok.mask_id), ("eos_token_id", tok.eos_id)):
            if getattr(config, name) != ours:
                raise TrainConfigError(
                    f"tokenizer mismatch: model.init_from has {name}={getattr(config, name)}, "
                    f"the dataset's tokenizer uses {ours}"
                )
        for key, value in cfg.model.overrides.items():
            setattr(config, key, value)
        return config
    overrides = {
        "vocab_size": tok.vocab_size,
        "mask_token_id": tok.mask_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        **cfg.model.overrides,
    }
    try:
        if cfg.model.name.startswith("llada2-"):
            config = llada2_named_config(cfg.model.name, **overrides)
        else:
            config = named_config(cfg.model.name, **overrides)
    except (KeyError, ValueError, TypeError) as err:
        raise TrainConfigError(f"model: {err}") from None
    # Keep the named context (fine-tuning may use longer rows than pretraining); grow it when the
    # data's rows are longer, unless the user pinned it.
    if "max_position_embeddings" not in cfg.model.overrides:
        config.max_position_embeddings = max(config.max_position_embeddings, manifest.seq_len)
    return config


def check_objective(cfg: TrainJobConfig, config: ModelConfig, seq_len: int) -> None:
    """What the model family's objective needs from the data and the model."""
    obj = cfg.train.objective
    if model_family(config) == BLOCK_DIFFUSION:
        lengths = {length for _, length in obj.block_schedule} or {obj.block.block_length}
        for length in sorted(lengths):
            if seq_len % length:
                raise TrainConfigError(
                    f"block length {length} (train.objective.block / block_schedule) does not divide "
                    f"the data's seq_len {seq_len}"
                )
    elif obj.block_schedule:
        raise TrainConfigError(
            f"train.objective.block_schedule is set but the model is {model_family(config)}, not block "
            "diffusion (set model.convert_to: block_diffusion or a llada2-* model.name)"
        )
    if obj.balance == "expert_bias" and not config.moe_router_enable_expert_bias:
        raise TrainConfigError(
            "train.objective.balance=expert_bias needs a router expert bias: set "
            "model.overrides.moe_router_enable_expert_bias: true"
        )


def preflight(cfg: TrainJobConfig) -> tuple[ModelConfig, Manifest]:
    try:
        manifest = verify_dataset(cfg.data.path)
    except ValueError as err:
        raise TrainConfigError(f"data.path: {err}") from None
    if manifest.kind != cfg.train.kind:
        raise TrainConfigError(
            f"train.kind={cfg.train.kind!r} but data.path holds a {manifest.kind!r} dataset"
        )
    if not manifest.splits.get(cfg.data.train_split) or not manifest.splits[cfg.data.train_split].shards:
        raise TrainConfigError(f"data.path has no rows in split {cfg.data.train_split!r}")
    model_config = resolve_model_config(cfg, manifest)
    ep = cfg.deepspeed.ep_size
    if model_config.num_experts % ep:
        raise TrainConfigError(
            f"deepspeed.ep_size={ep} does not divide num_experts={model_config.num_experts}"
        )
    check_objective(cfg, model_config, manifest.seq_len)
    if model_family(model_config) == BLOCK_DIFFUSION:  # validation and the exported config use the final one
        model_config.block_length = cfg.train.objective.block_length_at(cfg.train.max_steps - 1)
    if manifest.seq_len > model_config.max_position_embeddings:
        raise TrainConfigError(
            f"data seq_len {manifest.seq_len} exceeds the model's max_position_embeddings "
            f"{model_config.max_position_embeddings}"
        )
    if cfg.train.check.every:
        check_quality_check(cfg, model_config)
    return model_config, manifest


def check_quality_check(cfg: TrainJobConfig, model_config: ModelConfig) -> None:
    """``train.check`` built once on the driver (tokenizer, prompts, canvases), so what would fail
    on the workers at the first check fails here, before resources are claimed."""
    from .quality_check import QualityCheck

    c = cfg.train.check
    canvas = c.seq_len if not c.block_length else -(-c.seq_len // c.block_length) * c.block_length
    if canvas > model_config.max_position_embeddings:
        raise TrainConfigError(
            f"train.check.seq_len={c.seq_len} (canvas {canvas}) exceeds the model's "
            f"max_position_embeddings {model_config.max_position_embeddings}"
        )
    try:
        QualityCheck(c, Path(cfg.data.path) / "tokenizer", rank=0, world=1)
    except (ValueError, OSError) as err:
        raise TrainConfigError(f"train.check: {err}") from None


def train_split_fits_in_memory(cfg: TrainJobConfig, manifest: Manifest) -> bool:
    """Whether the whole decoded train split (every worker reads all of it: 4 bytes a value, every
    column) is within ``data.cache_in_memory_mb``."""
    rows = manifest.splits[cfg.data.train_split].sequences
    return rows * manifest.seq_len * 4 * len(manifest.columns) <= cfg.data.cache_in_memory_mb * 2**20


def start_mlflow_run(cfg: TrainJobConfig, manifest: Manifest, model_config: ModelConfig) -> tuple[str, str]:
    from diffmoe.tracking import create_run, git_commit

    tags = {
        "git_commit": git_commit(),
        "kind": cfg.train.kind,
        "ray_job_id": os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID", "local"),
        "workers": str(cfg.scaling.num_workers),
        "model": cfg.model.init_from or cfg.model.name,
    }
    params = {**flatten(cfg), **{f"model_config.{k}": v for k, v in model_config.to_diff_dict().items()}}
    client, run_id = create_run(cfg.mlflow, run_name=cfg.run.name, tags=tags, params=params)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        (Path(tmp) / "data_manifest.json").write_text(manifest.dump())
        client.log_artifacts(run_id, tmp, "config")
    return run_id, cfg.mlflow.resolved_uri()


def loss_curve_png(client, run_id: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("train/loss", "train (diffusion bound)"), ("val/loss", "validation")):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            ax.plot(
                [m.step for m in history],
                [m.value for m in history],
                label=label,
                marker="." if "val" in key else None,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss per token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def export_hf_model(checkpoint_dir: Path, dataset_dir: Path, output_dir: Path) -> Path:
    """Final checkpoint's consolidated weights (its weight average when the run kept one) + the
    dataset's tokenizer -> a Hugging Face directory."""
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    averaged = checkpoint_dir / EMA_DIR
    shutil.copytree(averaged if averaged.is_dir() else checkpoint_dir / "model", tmp)
    for f in (dataset_dir / "tokenizer").iterdir():
        shutil.copy2(f, tmp / f.name)
    if (checkpoint_dir / "probe_logits.safetensors").is_file():
        shutil.copy2(checkpoint_dir / "probe_logits.safetensors", tmp / "training_probe_logits.safetensors")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    return output_dir


def worker_view(cfg: TrainJobConfig) -> dict:
    """The config the workers get: a local ``model.init_from`` made absolute, as the data shards
    are (workers do not run in the driver's directory outside a Ray job's working_dir)."""
    job = cfg.model_dump(mode="json")
    from diffmoe.model.source import is_mlflow_uri

    source = job["model"]["init_from"]
    if source and not is_mlflow_uri(source):
        job["model"]["init_from"] = os.path.abspath(source)
    return job


def run_training(cfg: TrainJobConfig) -> TrainResult:
    from mlflow.tracking import MlflowClient
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .loop import train_loop_per_worker

    model_config, manifest = preflight(cfg)
    run_id, uri = start_mlflow_run(cfg, manifest, model_config)
    client = MlflowClient(uri)
    status = "FAILED"
    try:
        connect()  # $RAY_ADDRESS, else the cluster `ray start` left on this machine, else a local one
        from diffmoe.data.manifest import read_split, shard_paths

        datasets = {}  # the train split is read by the workers themselves (sample_order.py)
        has_val = bool(
            manifest.splits.get(cfg.data.validation_split)
            and manifest.splits[cfg.data.validation_split].shards
        )
        if has_val:
            datasets["validation"] = read_split(cfg.data.path, cfg.data.validation_split, verified=manifest)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "job": worker_view(cfg),
                "model_config": model_config.to_dict(),
                "mlflow_run_id": run_id,
                "tracking_uri": uri,
                "log_system_metrics": cfg.mlflow.log_system_metrics,
                "has_validation": has_val,
                "cache_train": train_split_fits_in_memory(cfg, manifest),
                "train_shards": [
                    os.path.abspath(p) for p in shard_paths(cfg.data.path, manifest, cfg.data.train_split)
                ],
                "train_shard_rows": [s.rows for s in manifest.splits[cfg.data.train_split].shards],
                "tokenizer_dir": os.path.abspath(Path(cfg.data.path) / "tokenizer"),  # for train.check
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.scaling.num_workers,
                use_gpu=cfg.scaling.use_gpu,
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=cfg.run.name,
                storage_path=os.path.abspath(cfg.run.storage_path)
                if "://" not in cfg.run.storage_path
                else cfg.run.storage_path,
                failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                worker_runtime_env={"env_vars": cfg.scaling.worker_env},
            ),
            datasets=datasets or None,
            dataset_config=DataConfig(datasets_to_split="all"),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        with result.checkpoint.as_directory() as ckpt:
            state = json.loads((Path(ckpt) / "trainer_state.json").read_text())
            model_dir = export_hf_model(Path(ckpt), Path(cfg.data.path), Path(cfg.run.output_dir))
        client.log_artifacts(run_id, str(model_dir), "model")
        version = None
        if cfg.run.register_as:
            from diffmoe.tracking import register_model

            version = register_model(client, run_id, "model", cfg.run.register_as, cfg.run.register_alias)
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "loss_curve.png"
            loss_curve_png(client, run_id, png)
            client.log_artifact(run_id, str(png))
        status = "FINISHED"
        return TrainResult(
            run_id,
            state["step"],
            result.checkpoint.path,
            str(model_dir),
            dict(result.metrics or {}),
            None if version is None else f"models:/{cfg.run.register_as}/{version}",
        )
    finally:
        client.set_terminated(run_id, status)
