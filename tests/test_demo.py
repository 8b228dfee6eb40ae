"""End to end: the `make demo` path (scripts/demo.py, smallest settings) on a real local Ray head.

`ray start --head` -> jobs submitted with Ray's JobSubmissionClient: prepare (corpus, SFT) ->
pretrain -> finetune -> evaluate -> `serve deploy` -> an OpenAI chat request; then each stage's
output is checked. Runs last (see
conftest.py): it stops the session's in-process Ray first, because a second local Ray on the same
machine would otherwise be found by `ray.init()` calls.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from diffmoe.data import verify_dataset

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

pytestmark = [pytest.mark.slow, pytest.mark.run_last]


def test_demo_end_to_end(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    work, temp = tmp_path / "work", Path("/tmp") / f"diffmoe-demo-{os.getpid()}"
    ports = [demo.free_port() for _ in range(3)]
    cmd = [sys.executable, str(REPO / "scripts" / "demo.py"), "--quick", "--workdir", str(work)]
    cmd += ["--ray-port", str(ports[0]), "--dashboard-port", str(ports[1]), "--http-port", str(ports[2])]
    cmd += ["--temp-dir", str(temp)]
    log = tmp_path / "demo.log"
    try:
        with open(log, "w") as out:
            code = subprocess.run(
                cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=1800
            ).returncode
    finally:
        demo.down(str(temp))
    stdout = log.read_text()
    assert code == 0, stdout[-6000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    # the product working: a question it never saw, answered correctly over the OpenAI API
    assert summary["question"] == demo.QUESTION and summary["correct"], stdout[-4000:]
    assert summary["answer"] == demo.EXPECTED and summary["finish_reason"] == "stop"
    assert summary["usage"]["prompt_tokens"] > 0
    assert demo.QUESTION not in (work / "data" / "reverse.jsonl").read_text()

    # a short stage-by-stage console summary; each job's full log in logs/, read back from its result line
    stages = ["prepare-corpus", "prepare-task", "pretrain", "finetune", "evaluate", "serve", "chat"]
    assert [row["stage"] for row in summary["stages"]] == stages
    assert all(row["status"] == "done" for row in summary["stages"][:-1])
    table = stdout[stdout.index("=== diffmoe demo ===") :]
    assert all(re.search(rf"^  {name} +(done|correct) +[\d.]+ ", table, re.M) for name in stages)
    for name in ("prepare-corpus", "prepare-task", "pretrain-tiny", "finetune-reverse", "evaluate"):
        job_log = (work / "logs" / f"{name}.log").read_text()
        assert 'DIFFMOE_RESULT {"ok": true' in job_log and "SUCCEEDED" in job_log, name
    assert "DIFFMOE_RESULT" not in stdout  # job logs stay in the files

    # data: shards + manifest that verify
    for name, kind in (("corpus_tiny", "pretrain"), ("sft_reverse", "sft")):
        manifest = verify_dataset(work / "data" / name)
        assert manifest.kind == kind and manifest.counts.sequences > 0

    # MLflow: both training runs with the metrics the comparison view shows side by side (the
    # evaluation scores land on the evaluated run too), and the registered, aliased fine-tuned model
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    for key in ("pretrain_run_id", "finetune_run_id"):
        run = client.get_run(summary[key])
        assert run.info.status == "FINISHED"
        assert {"train/loss", "val/loss", "train/tokens_per_s"} <= set(run.data.metrics)
        assert any(a.path == "model" for a in client.list_artifacts(run.info.run_id))
    evaluation = client.get_run(summary["eval_run_id"])
    assert evaluation.data.tags["evaluated_run_id"] == summary["finetune_run_id"]
    exact = evaluation.data.metrics["eval/exact_match"]
    assert client.get_run(summary["finetune_run_id"]).data.metrics["eval/exact_match"] == exact
    assert exact > 0.5  # held-out prompts: the model learned the task, not the one answer
    version = client.get_model_version_by_alias(demo.MODEL_NAME, demo.ALIAS)
    assert version.run_id == summary["finetune_run_id"]
    assert "compare-runs?runs=" in stdout and "MLflow UI:" in stdout and "make down" in stdout

    # exported Hugging Face directories
    for name in ("pretrain-tiny", "finetune-reverse"):
        out = work / "artifacts" / name
        assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
        assert (out / "tokenizer.json").is_file()
    # training jobs show progress users can read (forwarded from the job logs; rank 0, the last step)
    assert (
        len(
            re.findall(
                r"progress: step (\d+)/\1 \(100%\) loss [\d.]+ tokens/s [\d,]+ elapsed \S+ eta 0m00s", stdout
            )
        )
        >= 2
    )
