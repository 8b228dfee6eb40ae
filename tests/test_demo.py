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
    # five jobs through the job API, each read back from its own result line
    assert (
        len(re.findall(r"^demo: job \w+ \S+ SUCCEEDED$", stdout, re.M)) == 5
        and stdout.count('DIFFMOE_RESULT {"ok": true') == 5
    )

    # data: shards + manifest that verify
    for name, kind in (("corpus_tiny", "pretrain"), ("sft_tiny", "sft")):
        manifest = verify_dataset(work / "data" / name)
        assert manifest.kind == kind and manifest.counts.sequences > 0

    # MLflow: the training runs with metrics and a logged model, the evaluation run
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    for key in ("pretrain_run_id", "finetune_run_id"):
        run = client.get_run(summary[key])
        assert run.info.status == "FINISHED"
        assert {"train/loss", "val/loss"} <= set(run.data.metrics)
        assert any(a.path == "model" for a in client.list_artifacts(run.info.run_id))
    evaluation = client.get_run(summary["eval_run_id"])
    assert evaluation.data.tags["evaluated_run_id"] == summary["finetune_run_id"]
    assert evaluation.data.metrics["eval/loss_per_token"] > 0

    # exported Hugging Face directories and an HTTP answer from the served model
    for kind in ("pretrain", "finetune"):
        out = work / "artifacts" / f"{kind}-tiny"
        assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
        assert (out / "tokenizer.json").is_file()
    assert isinstance(summary["answer"], str)  # a 4-step model may well answer EOS at once
    assert summary["finish_reason"] in ("stop", "length")
    assert summary["usage"]["prompt_tokens"] > 0
    assert "MLflow UI:" in stdout and "make down" in stdout
    # training jobs show progress users can read in the job logs (rank 0, at least the last step)
    assert (
        len(
            re.findall(
                r"progress: step (\d+)/\1 \(100%\) loss [\d.]+ tokens/s [\d,]+ elapsed \S+ eta 0m00s", stdout
            )
        )
        >= 2
    )
