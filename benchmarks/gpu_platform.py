"""The platform's own path on a GPU, at tiny scale, for ``gpu_check.py``: the same jobs a user runs.

1. ``jobs/prepare_corpus.py`` (a small standard-library corpus) and ``jobs/pretrain.py`` with
   ``scaling.use_gpu=true``: Ray Train + DeepSpeed in bf16 on the GPU, a few dozen steps; the loss
   must fall (first vs last logged) and a checkpoint and the exported model must be written.
2. That model served by Ray Serve on loopback (``replica_gpus=1``) and asked one sampled chat
   question (temperature 0.7, seeded) with the ``openai`` client.
3. The LLaDA2 block-diffusion Engine at the ``llada2-mini`` shape (16B, random bf16 weights) at
   batch 1 and 32, sampled.
4. Training overhead at the 7B-A1B layer shape: the platform's training job against a bare PyTorch
   loop on the same GPU, data and settings (``bench_train``'s comparison; target >= 0.95).
``python benchmarks/gpu_platform.py --cpu`` runs 1, 2 and 4 on the CPU (3 and 4 at the tiny shape):
the smoke test that the check itself works before a GPU is at hand.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _job(work: Path, name: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    with open(work / f"{name}.log", "w") as log:
        code = subprocess.run(
            [sys.executable, f"jobs/{name}.py", *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        ).returncode
    if code:
        tail = (work / f"{name}.log").read_text()[-3000:]
        raise RuntimeError(f"jobs/{name}.py failed (exit {code}):\n{tail}")


def train_and_serve(work: Path, use_gpu: bool = True) -> dict:
    """Steps 1 and 2; returns losses, checkpoint and the served answer."""
    import mlflow

    corpus, uri = work / "corpus", f"sqlite:///{work}/mlflow.db"
    started = time.perf_counter()
    _job(work, "prepare_corpus", "--config", "jobs/configs/corpus_tiny.yaml",
         "--set", f"output_dir={corpus}", "--set", "max_documents=60")  # fmt: skip
    sets = {
        "data.path": corpus,
        "train.max_steps": 40,
        "train.log_every": 5,
        "train.val_every": 20,
        "train.checkpoint_every": 20,
        "scaling.use_gpu": str(use_gpu).lower(),
        "mlflow.tracking_uri": uri,
        "mlflow.experiment": "gpu-check",
        "run.storage_path": work / "runs",
        "run.output_dir": work / "model",
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    _job(work, "pretrain", "--config", "jobs/configs/pretrain_tiny.yaml", *args)
    trained_s = time.perf_counter() - started
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("gpu-check").experiment_id])[0]
    losses = [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    ]
    checkpoints = sorted(
        str(p.relative_to(work)) for p in (work / "runs").rglob("checkpoint_*") if p.is_dir()
    )
    out = {
        "train_seconds_with_data": round(trained_s, 1),
        "loss_first_last": [losses[0], losses[-1]],
        "loss_fell": losses[-1] < losses[0],
        "checkpoints": checkpoints,
        "exported_model": (work / "model" / "config.json").is_file(),
        "deepspeed_params": {k: v for k, v in run.data.params.items() if "precision" in k or "zero" in k},
    }
    if not (out["loss_fell"] and checkpoints and out["exported_model"]):
        raise RuntimeError(f"training on the {'GPU' if use_gpu else 'CPU'} did not do its job: {out}")
    out["served"] = _serve_one(work / "model", use_gpu)
    return out


def _serve_one(model_dir: Path, use_gpu: bool) -> dict:
    import openai
    import ray
    from ray import serve

    from diffmoe.serve.app import run_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        url = run_app(
            {
                "model": str(model_dir),
                "http_port": port,
                "replica_cpus": 1,
                "replica_gpus": 1 if use_gpu else 0,
            },
            name="gpu-check",
        )
        chat = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        started = time.perf_counter()
        answer = chat.chat.completions.create(
            model=model_dir.name,
            messages=[{"role": "user", "content": "def add(a, b):"}],
            max_tokens=16,
            temperature=0.7,
            seed=0,
        )
        return {
            "latency_s": round(time.perf_counter() - started, 3),
            "finish_reason": answer.choices[0].finish_reason,
            "completion_tokens": answer.usage.completion_tokens,
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def llada2_engine(device: str = "cuda", name: str = "llada2-mini") -> dict:
    """Step 3: block-diffusion Engine, random bf16 weights, batch 1 and 32, sampled (seeded)."""
    import torch

    from diffmoe.generation import DecodingConfig, Engine
    from diffmoe.model import LLaDA2MoeModelLM
    from diffmoe.model.llada2_configuration import llada2_named_config

    cfg = llada2_named_config(name)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: 16B params, no fp32 copy
    try:
        with torch.device(device):
            model = LLaDA2MoeModelLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    prompts = [
        torch.randint(3, 1000, (100,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(32)
    ]
    dec = DecodingConfig(gen_length=64, block_length=32, ignore_eos=True, temperature=0.7, seed=0)
    out = {"config": name}
    for batch in (1, 32):
        engine = Engine(model, max_batch_size=32)
        engine.run(prompts[:1], dec)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        done = engine.run(prompts[:batch], dec)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tokens = sum(len(o.token_ids) for o in done)
        out[f"batch{batch}"] = {
            "seconds": round(seconds, 3),
            "output_tokens_per_s": round(tokens / seconds, 1),
        }
    out["batch32_over_batch1"] = round(
        out["batch32"]["output_tokens_per_s"] / out["batch1"]["output_tokens_per_s"], 2
    )
    return out


# Step 4's shape: the 7B-A1B layer (hidden 2048, 64 experts of 1024, top-8, 16 heads) with two of its
# 16 layers (the overhead is per step, not per layer: two keep it minutes), 1024-token rows.
OVERHEAD_GPU = dict(model="llada-moe-7b-a1b", layers=2, seq_len=1024, micro_batch=8, steps=60, log_every=5)
OVERHEAD_CPU = dict(model="tiny", layers=2, seq_len=256, micro_batch=8, steps=40, log_every=5)


def train_overhead(work: Path, use_gpu: bool = True) -> dict:
    """Step 4: bare loop, platform job, bare loop again (each platform run against the bare runs on
    either side of it, as in ``bench_train``); steady-state tokens/s, the first window excluded."""
    import ray

    from bench_train import bare_process, job_config, platform_run, steady

    shape = OVERHEAD_GPU if use_gpu else OVERHEAD_CPU
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    _job(work, "prepare_corpus", "--config", "jobs/configs/corpus_tiny.yaml", "--set", f"output_dir={corpus}",
         "--set", "max_documents=200", "--set", f"seq_len={shape['seq_len']}")  # fmt: skip
    job = job_config(
        corpus,
        work,
        "overhead",
        model={"name": shape["model"], "overrides": {"num_hidden_layers": shape["layers"]}},
        train={
            "max_steps": shape["steps"],
            "micro_batch_size": shape["micro_batch"],
            "log_every": shape["log_every"],
        },
        scaling={"use_gpu": use_gpu},
    )
    env = job.scaling.worker_env
    threads = int(job.scaling.cpus_per_worker)
    bare = [bare_process(job, threads, env)]
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        ours = platform_run(job)
    finally:
        ray.shutdown()
    bare.append(bare_process(job, threads, env))
    bare_tps = sum(steady(w) for w in bare) / len(bare)
    ratio = steady(ours) / bare_tps
    return {
        "shape": shape,
        "platform_tokens_per_s": round(steady(ours), 1),
        "bare_tokens_per_s": [round(steady(w), 1) for w in bare],
        "ratio": round(ratio, 3),
        "target_ratio": 0.95,
        "met": ratio >= 0.95,
        "baseline": "bare PyTorch loop, one process: fp32 weights under bf16 autocast on a GPU, AdamW",
    }


if __name__ == "__main__":
    cpu = "--cpu" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        result = {"train_and_serve": train_and_serve(Path(tmp), use_gpu=not cpu)}
        result["train_overhead"] = train_overhead(Path(tmp) / "overhead", use_gpu=not cpu)
    result["llada2_engine"] = llada2_engine("cpu", "llada2-tiny") if cpu else llada2_engine()
    print(json.dumps(result, indent=2))
