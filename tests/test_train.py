"""Ray Train + DeepSpeed training on a real local Ray cluster: EP=2, MLflow, faults, resume, SFT."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from diffmoe.config import ConfigError, build
from diffmoe.model import LLaDAMoEModelLM
from diffmoe.train.config import TrainJobConfig
from diffmoe.train.trainer import TrainConfigError, run_training


def _config(tmp: Path, data_path: Path, name: str, **sections) -> TrainJobConfig:
    base = {
        "data": {"path": str(data_path)},
        "optim": {"lr": 3e-3, "warmup_steps": 3},
        "train": {
            "max_steps": 30,
            "micro_batch_size": 8,
            "log_every": 5,
            "val_every": 10,
            "checkpoint_every": 10,
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "tests"},
        "run": {"name": name, "storage_path": str(tmp / "runs"), "output_dir": str(tmp / name / "hf")},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return build(TrainJobConfig, base)


def _trained_samples(log_dir: Path) -> list[int]:
    """Global sample indices whose updates the final weights hold, in stream order: each attempt's
    ``train.sample_log`` lines up to the step the next attempt resumed from (later ones rolled back)."""
    lines = [json.loads(x) for f in sorted(log_dir.glob("rank*.jsonl")) for x in f.read_text().splitlines()]
    starts = sorted({x["resumed_from"] for x in lines})
    kept = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else float("inf")
        kept += [x for x in lines if x["resumed_from"] == start and x["step"] <= end]
    by_step: dict[int, list[list[int]]] = {}
    for x in sorted(kept, key=lambda x: x["rank"]):
        by_step.setdefault(x["step"], []).append(x["indices"])
    return [i for step in sorted(by_step) for chunk in by_step[step] for i in chunk]


def _assert_exactly_once(trained: list[int], data_path: Path, seed: int) -> None:
    """The trained samples are the (seed, epoch) stream's first ones: no repeat, no gap."""
    from diffmoe.data.manifest import verify_dataset
    from diffmoe.train.sample_order import SampleOrder

    order = SampleOrder([s.rows for s in verify_dataset(data_path).splits["train"].shards], seed)
    assert trained == [order.global_index(*order.locate(p)[1:]) for p in range(len(trained))]
    for start in range(0, len(trained), order.total):  # each epoch: every row at most once
        epoch = trained[start : start + order.total]
        assert len(set(epoch)) == len(epoch)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def ep2_run(ray_cluster, tiny_corpus, workdir):
    cfg = _config(
        workdir,
        tiny_corpus,
        "ep2",
        scaling={"num_workers": 2},
        deepspeed={"ep_size": 2},
        train={"sample_log": str(workdir / "samples-ep2"), "ema_decay": 0.9},
    )
    return cfg, run_training(cfg)


def test_two_workers_expert_parallel_learn_and_track_in_mlflow(ep2_run, workdir):
    cfg, result = ep2_run
    assert result.final_step == 30
    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["deepspeed.ep_size"] == "2" and run.data.params["optim.lr"] == "0.003"
    assert run.data.params["model_config.num_experts"] == "8"
    assert {"git_commit", "ray_job_id", "workers"} <= set(run.data.tags)
    for key in (
        "train/loss",
        "train/masked_ce",
        "train/aux_loss",
        "train/z_loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/data_wait_frac",
        "moe/layer0/max_mean_load",
        "moe/layer1/router_entropy",
        "val/loss",
    ):
        assert key in run.data.metrics, key
    assert any(k.startswith("system/") for k in run.data.metrics)
    assert "train_split_in_memory.last" in run.data.tags  # a split this small is read once
    assert "'zero_stage': 2" in run.data.tags["deepspeed.last"]
    assert "'gradient_allreduce': True" in run.data.tags["deepspeed.last"]  # 2 workers average gradients
    assert "'MALLOC_TRIM_THRESHOLD_': '1073741824'" in run.data.tags["worker_env.last"]  # reached workers
    val = sorted(client.get_metric_history(result.run_id, "val/loss"), key=lambda m: m.step)
    assert val[0].step == 0 and val[-1].step == 30
    assert val[-1].value < val[0].value - 0.5, [(m.step, m.value) for m in val]
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config", "model", "loss_curve.png"} <= artifacts
    assert {a.path for a in client.list_artifacts(result.run_id, "config")} == {
        "config/config.yaml",
        "config/data_manifest.json",
    }
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(result.run_id, "model")}
    # DeepSpeed-MoE wrote one file per expert (8 experts x 2 layers) in the checkpoint.
    expert_files = list(Path(result.checkpoint_path).glob("deepspeed/ckpt/layer_*_expert_*_model_states.pt"))
    assert len(expert_files) == 16
    # train.ema_decay: the checkpoint keeps the weight average beside the weights, and the run
    # exports the average (every expert of both ranks), not the last step's weights
    exported = load_file(os.path.join(result.model_dir, "model.safetensors"))
    average = load_file(os.path.join(result.checkpoint_path, "ema", "model.safetensors"))
    trained = load_file(os.path.join(result.checkpoint_path, "model", "model.safetensors"))
    assert exported.keys() == average.keys() == trained.keys()
    assert all(torch.equal(exported[k], average[k]) for k in exported)
    expert = "model.layers.1.mlp.experts.7.down_proj.weight"  # held by rank 1
    assert not torch.equal(average[expert], trained[expert])
    assert "'decay': 0.9" in run.data.tags["ema.last"]


def test_training_time_forward_equals_exported_model(ep2_run):
    """The probe is the expert-parallel training forward with the weight average swapped in."""
    _, result = ep2_run
    model = LLaDAMoEModelLM.from_pretrained(result.model_dir)
    probe = load_file(os.path.join(result.model_dir, "training_probe_logits.safetensors"))
    with torch.no_grad():
        logits = model(probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-5)
    assert (Path(result.model_dir) / "tokenizer.json").is_file()


def test_resume_with_a_different_worker_count(ep2_run, tiny_corpus, workdir):
    """Same run name, 2 workers/EP 2 -> 1 worker/EP 1: continues at step 30 from the same weights
    (the loop checks the restored weights' fingerprint against the checkpoint's). The resumed
    steps attend within packed documents only (``train.document_mask``)."""
    cfg, first = ep2_run
    resumed = run_training(
        _config(
            workdir,
            tiny_corpus,
            "ep2",
            train={
                "max_steps": 34,
                "document_mask": True,
                "sample_log": str(workdir / "samples-ep2"),
                "ema_decay": 0.9,
            },
        )
    )
    assert resumed.metrics["resumed_from_step"] == 30
    assert resumed.final_step == 34
    run = MlflowClient(cfg.mlflow.tracking_uri).get_run(resumed.run_id)
    assert "'how': 'weights'" in run.data.tags["restored.last"]
    assert "'zero_stage': 0" in run.data.tags["deepspeed.last"]  # one worker: nothing to partition
    assert "'gradient_allreduce': False" in run.data.tags["deepspeed.last"]  # nor to average
    assert "'restored': True" in run.data.tags["ema.last"]  # the average continues, on 1 worker
    assert run.data.tags["resumed_from_run_id"] == first.run_id  # the resubmission links its MLflow run
    saved = json.loads((Path(first.checkpoint_path) / "trainer_state.json").read_text())
    assert str(saved["weights_fingerprint"]) in run.data.tags["weights_fingerprint.last"]
    trained = _trained_samples(workdir / "samples-ep2")  # 30 steps x 2 x 8, then 4 x 1 x 8
    assert len(trained) == 30 * 16 + 4 * 8
    _assert_exactly_once(trained, tiny_corpus, cfg.train.seed)


def _registered_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered (its persisted snapshot)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [c["metrics"]["step"] for c in snapshot.get("checkpoint_results", [])]


def test_killed_worker_process_restarts_from_checkpoint(ray_cluster, tiny_corpus, workdir):
    import psutil

    cfg = _config(
        workdir,
        tiny_corpus,
        "faulty",
        # streaming, 2 workers on half a core each train ~12 steps/s here: 200 steps after the second
        # checkpoint leave ~15 s for the kill to land mid-run, and few checkpoints (each a collective save)
        train={
            "max_steps": 300,
            "checkpoint_every": 50,
            "val_every": 1000,
            "sample_log": str(workdir / "samples-faulty"),
        },
        data={"cache_in_memory_mb": 0},  # the streaming path, resuming mid-epoch
        scaling={"num_workers": 2, "max_failures": 2},
    )
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_training(cfg)), daemon=True)
    thread.start()
    run_dir = workdir / "runs" / "faulty"
    deadline = time.time() + 240
    # A checkpoint the controller has registered (a folder alone may still be reported: a worker
    # killed then restarts from scratch, as one run here did).
    while not _registered_checkpoints(run_dir) and time.time() < deadline:
        time.sleep(0.2)
    assert _registered_checkpoints(run_dir), "no checkpoint was registered"
    workers = [
        p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])
    ]
    assert len(workers) == 2, [w.info for w in workers]
    os.kill(workers[-1].pid, signal.SIGKILL)  # a real signal to the real worker process
    thread.join(timeout=300)
    result = outcome["result"]
    assert result.final_step == 300
    assert result.metrics["resumed_from_step"] >= 50
    # a worker restart inside the job logs into the job's one run: nothing to link
    assert "resumed_from_run_id" not in MlflowClient(cfg.mlflow.tracking_uri).get_run(result.run_id).data.tags
    trained = _trained_samples(workdir / "samples-faulty")  # across the kill: each sample once
    assert len(trained) == 300 * 16
    _assert_exactly_once(trained, tiny_corpus, cfg.train.seed)


def test_finetune_from_pretrained_directory_scores_only_responses_and_stops_at_quality(
    ep2_run, tiny_sft, workdir
):
    import pyarrow.parquet as pq

    from diffmoe.train.loop import ObjectiveModule

    _, pre = ep2_run
    cfg = _config(
        workdir,
        Path(os.path.relpath(tiny_sft)),  # relative to the driver's directory, not the workers'
        "sft",
        model={"init_from": pre.model_dir},
        train={
            "kind": "sft",
            "max_steps": 6,
            "checkpoint_every": 6,
            "val_every": 6,
            # the run checks itself on a task every 2 steps; target 0 ends it at the first check
            "check": {"every": 2, "task": "reverse", "prompts": 3, "seq_len": 64, "target": 0.0},
        },
        run={"register_as": "tiny-chat", "register_alias": "candidate"},
    )
    result = run_training(cfg)
    assert result.final_step == 2 and result.metrics["stopped_at_quality"] is True
    ((step, accuracy),) = result.metrics["checks"]
    assert step == 2 and 0 <= accuracy <= 1
    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["kind"] == "sft" and "val/loss" in run.data.metrics
    assert [m.step for m in client.get_metric_history(result.run_id, "check/accuracy")] == [2]
    # registered in the Model Registry, linked to the run; the alias resolves to the exported model
    version = client.get_model_version_by_alias("tiny-chat", "candidate")
    assert version.run_id == result.run_id and result.registered == f"models:/tiny-chat/{version.version}"
    from diffmoe.model.source import resolve

    served = resolve("models:/tiny-chat@candidate", cfg.mlflow.tracking_uri)
    assert (served / "config.json").read_text() == (Path(result.model_dir) / "config.json").read_text()

    rows = pq.read_table(next((tiny_sft / "train").glob("*.parquet"))).slice(0, 4).to_pydict()
    batch = {k: torch.tensor(rows[k]) for k in ("input_ids", "response_mask")}
    objective = ObjectiveModule(LLaDAMoEModelLM.from_pretrained(result.model_dir), cfg)
    for seed in range(5):
        terms = objective(batch, torch.Generator().manual_seed(seed))
        assert 0 < terms.num_masked <= int(batch["response_mask"].sum())


def test_bad_configs_fail_before_claiming_resources(tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match="ep_size=2 does not divide scaling.num_workers=3"):
        _config(tmp_path, tiny_corpus, "x", scaling={"num_workers": 3}, deepspeed={"ep_size": 2})
    with pytest.raises(ConfigError, match="zero_stage"):
        _config(tmp_path, tiny_corpus, "x", deepspeed={"zero_stage": 3})
    with pytest.raises(TrainConfigError, match="ep_size=3 does not divide num_experts=8"):
        run_training(
            _config(tmp_path, tiny_corpus, "x", scaling={"num_workers": 3}, deepspeed={"ep_size": 3})
        )
    with pytest.raises(TrainConfigError, match="data.path"):
        run_training(_config(tmp_path, tmp_path / "missing", "x"))
    with pytest.raises(TrainConfigError, match="train.kind='sft'"):
        run_training(_config(tmp_path, tiny_corpus, "x", train={"kind": "sft"}))
    short = {"every": 5, "task": "reverse", "seq_len": 8}  # the chat prompt alone is longer
    with pytest.raises(TrainConfigError, match="train.check.seq_len=8 leaves no answer canvas"):
        run_training(_config(tmp_path, tiny_corpus, "x", train={"check": short}))
    other = LLaDAMoEModelLM.from_pretrained  # a model whose tokenizer ids differ from the data's
    from diffmoe.model import named_config

    LLaDAMoEModelLM(named_config("tiny", vocab_size=512, mask_token_id=7)).save_pretrained(tmp_path / "other")
    with pytest.raises(TrainConfigError, match="tokenizer mismatch"):
        run_training(_config(tmp_path, tiny_corpus, "x", model={"init_from": str(tmp_path / "other")}))
    assert other is not None
    runs = (
        MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
        if (tmp_path / "mlflow.db").exists()
        else []
    )
    assert all(e.name != "tests" for e in runs), "no MLflow run may be created for a config that cannot start"


def test_nonfinite_loss_fails_the_run_naming_the_step(ray_cluster, tiny_corpus, tmp_path):
    """A poisoned weight makes every loss NaN: ``skip`` drops and counts micro-batches (in MLflow),
    then fails the run past ``max_nonfinite_skips`` instead of training on silently."""
    from diffmoe.data.manifest import verify_dataset
    from diffmoe.model import named_config

    tok = verify_dataset(tiny_corpus).tokenizer
    ids = {"mask_token_id": tok.mask_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    model = LLaDAMoEModelLM(named_config("tiny", vocab_size=tok.vocab_size, **ids))
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    model.save_pretrained(tmp_path / "poisoned")
    cfg = _config(
        tmp_path,
        tiny_corpus,
        "nan",
        model={"init_from": str(tmp_path / "poisoned")},
        train={"max_steps": 3, "on_nonfinite": "skip", "max_nonfinite_skips": 1},
    )
    with pytest.raises(Exception, match=r"at step 1: 2 micro-batches skipped") as failure:
        run_training(cfg)
    assert "NonFiniteLossError" in str(failure.value) or "NonFiniteLossError" in repr(failure.value)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.metrics["train/nonfinite_skipped"] == 1
