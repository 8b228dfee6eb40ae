"""The job runner (diffmoe.jobs): exit codes, the one result line, ``--set``, validation first.

Pure logic in-process; the real job scripts in one subprocess, to show a bad config or a missing
dataset fails with exit code 2 before Ray or MLflow is touched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffmoe.config import ConfigError, StrictModel
from diffmoe.jobs import RESULT_PREFIX, JobInputError, parse_result, run_job

ROOT = Path(__file__).resolve().parent.parent


class Inner(StrictModel):
    n: int = 1


class Cfg(StrictModel):
    name: str = "x"
    inner: Inner = Inner()


def _run(capsys, fn, argv, **kw) -> tuple[int, list[str], str]:
    code = run_job(Cfg, fn, argv=argv, **kw)
    out = capsys.readouterr()
    return code, out.out.strip().splitlines(), out.err


def test_ok_prints_one_result_line_last_with_overrides_applied(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: from-file\ninner: {n: 2}\n")

    def fn(cfg, _args):
        print("working")
        return {"name": cfg.name, "n": cfg.inner.n}

    code, lines, _ = _run(capsys, fn, ["--config", str(config), "--set", "inner.n=5"])
    assert code == 0
    assert [ln for ln in lines if ln.startswith(RESULT_PREFIX)] == [lines[-1]]
    assert parse_result("\n".join(lines)) == {"ok": True, "name": "from-file", "n": 5}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "inner.m=1"], "inner.m"),  # unknown key
        (["--set", "inner.n=abc"], "inner.n"),  # wrong type
        (["--set", "novalue"], "key.path=value"),  # malformed override
        (["--config", "/nonexistent.yaml"], "not found"),
        (["--bogus"], "bad arguments"),  # argparse usage error
    ],
)
def test_bad_config_exits_2_before_the_job_runs(capsys, argv, message):
    calls = []
    code, lines, err = _run(capsys, lambda cfg, _a: calls.append(cfg), argv)
    assert code == 2 and not calls
    result = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    assert result["ok"] is False and result["exit_code"] == 2 and message in result["error"]


def test_job_check_and_input_errors_exit_2_runtime_errors_exit_1(capsys):
    def check(cfg):
        if cfg.name == "bad":
            raise ConfigError("name: 'bad' is not allowed")

    code, lines, _ = _run(capsys, lambda c, a: {}, ["--set", "name=bad"], check=check)
    assert code == 2 and "not allowed" in parse_result("\n".join(lines))["error"]

    class DataProblem(ValueError):
        pass

    def missing(cfg, _args):
        raise DataProblem("data.path: no such dataset")

    code, lines, _ = _run(capsys, missing, [], input_errors=(DataProblem,))
    assert code == 2 and parse_result("\n".join(lines))["error"] == "data.path: no such dataset"

    def own_input_error(cfg, _args):
        raise JobInputError("model: tokenizer mismatch")

    assert _run(capsys, own_input_error, [])[0] == 2

    def crash(cfg, _args):
        raise RuntimeError("worker died")

    code, lines, err = _run(capsys, crash, [])
    assert code == 1 and "Traceback" in err
    assert parse_result("\n".join(lines)) == {
        "ok": False,
        "exit_code": 1,
        "error": "RuntimeError: worker died",
    }
    # a ValueError not declared as an input error is a runtime failure, not exit 2
    assert _run(capsys, lambda c, a: int("x"), [])[0] == 1


def test_help_exits_0_without_a_result_line(capsys):
    code, lines, _ = _run(capsys, lambda c, a: {}, ["--help"], description="the job")
    assert code == 0 and "--set" in "\n".join(lines)
    assert parse_result("\n".join(lines)) is None


SCRIPT = """
import importlib.util, io, json, sys, contextlib
from pathlib import Path
root, out = Path(sys.argv[1]), {}
cases = {
    "prepare_corpus": ["--set", "seq_len=oops"],
    "pretrain": ["--config", "jobs/configs/pretrain_tiny.yaml", "--set", "deepspeed.ep_size=3"],
    "finetune": ["--config", "jobs/configs/pretrain_tiny.yaml"],  # wrong train.kind
    "evaluate": ["--set", "model=" + sys.argv[2] + "/no-model"],
    "evaluate_missing_data": ["--set", "model=" + sys.argv[1] + "/jobs", "--set", "data.path=" + sys.argv[2] + "/no-data"],
    "benchmark": ["--set", "load.concurrency=[0]"],
    "pretrain_missing_data": ["--config", "jobs/configs/pretrain_tiny.yaml",
        "--set", "data.path=" + sys.argv[2] + "/no-data",
        "--set", "mlflow.tracking_uri=sqlite:///" + sys.argv[2] + "/mlflow.db"],
}
for name, argv in cases.items():
    script = root / "jobs" / (name.split("_missing")[0] + ".py")  # evaluate_missing_data: the model dir exists
    spec = importlib.util.spec_from_file_location("job_" + name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        code = module.main(argv)
    ray = sys.modules.get("ray")
    out[name] = [code, buf.getvalue().strip().splitlines()[-1], bool(ray and ray.is_initialized())]
print(json.dumps(out))
"""


def test_job_scripts_fail_with_exit_2_before_ray_or_mlflow(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (code, line, ray_started) in results.items():
        result = parse_result(line)
        assert code == 2 and result["ok"] is False and result["exit_code"] == 2, (name, line)
        assert not ray_started, name
    assert "seq_len" in results["prepare_corpus"][1]
    assert "ep_size" in results["pretrain"][1] and "train.kind" in results["finetune"][1]
    assert "no-model" in results["evaluate"][1] and "load.concurrency" in results["benchmark"][1]
    assert "no-data" in results["pretrain_missing_data"][1]
    assert (
        "data.path" in results["evaluate_missing_data"][1]
        and "no-data" in results["evaluate_missing_data"][1]
    )
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run for a job that cannot start


def test_tracking_helper_logs_params_in_batches_with_tags(tmp_path, monkeypatch):
    """Real MLflow on SQLite: 250 nested params arrive in 3 log_batch requests, tags as given."""
    from mlflow.tracking import MlflowClient

    from diffmoe.tracking import MLflowSection, create_run, default_tracking_uri, log_metrics

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert MLflowSection().resolved_uri() == "sqlite:///elsewhere.db"

    section = MLflowSection(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="t")
    calls = []
    real = MlflowClient.log_batch
    monkeypatch.setattr(
        MlflowClient, "log_batch", lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    )
    params = {"a": {f"p{i}": i for i in range(200)}, **{f"q{i}": "v" * 7000 for i in range(50)}}
    client, run_id = create_run(section, run_name="r", tags={"kind": "test", "n": 3}, params=params)
    assert len(calls) == 3
    log_metrics(client, run_id, {"x": 1.5, "y": 2}, step=4)
    client.set_terminated(run_id)
    run = MlflowClient(section.tracking_uri).get_run(run_id)
    assert run.info.run_name == "r" and run.data.tags["kind"] == "test" and run.data.tags["n"] == "3"
    assert len(run.data.params) == 250 and run.data.params["a.p199"] == "199"
    assert len(run.data.params["q0"]) == 6000
    assert run.data.metrics == {"x": 1.5, "y": 2.0}


def test_submitted_jobs_put_the_drivers_diffmoe_on_the_workers_path(tmp_path):
    """Under ray job submit --working-dir, workers start in the uploaded copy but only its root is on
    their path: the package root is added relative to it (pure logic; Ray itself is not started)."""
    import json as _json

    from diffmoe.cluster import JOB_CONFIG_VARIABLE, worker_code_env

    repo = Path(__file__).resolve().parent.parent
    job = {JOB_CONFIG_VARIABLE: _json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}})}
    assert worker_code_env(job, cwd=repo) == {"env_vars": {"PYTHONPATH": "platform"}}
    assert worker_code_env({}, cwd=repo) is None  # not a submitted job: ray.init() as before
    no_dir = {JOB_CONFIG_VARIABLE: _json.dumps({"runtime_env": {"pip": ["x"]}})}
    assert worker_code_env(no_dir, cwd=repo) is None  # no uploaded copy to point into
    own = {
        JOB_CONFIG_VARIABLE: _json.dumps(
            {"runtime_env": {"working_dir": ".", "env_vars": {"PYTHONPATH": "x"}}}
        )
    }
    assert worker_code_env(own, cwd=repo) is None  # the user's PYTHONPATH wins
    assert worker_code_env(job, cwd=tmp_path) is None  # the package is not inside the working dir
