"""``make demo``: a fresh clone to a served model on a local Ray head, the way a user runs it.

    python scripts/demo.py            # ray start -> 5 jobs via the job API -> serve deploy -> one chat request
    python scripts/demo.py --down     # serve shutdown + ray stop  (``make down``)

Every stage runs as a job would on a cluster: submitted to the head's job server with Ray's
``JobSubmissionClient`` (working directory: this repository, so jobs/ and jobs/configs travel with
it; absolute ``--set`` paths, as a job runs in a temporary copy), followed by its status and logs,
and its result read from the ``DIFFMOE_RESULT`` line the job runner prints last. Then ``serve
deploy`` of deployments/diffmoe.yaml pointed at the fine-tuned model's MLflow URI
(``runs:/<run_id>/model``). Stages chain through paths and MLflow run ids only. A rerun reuses
finished stages: the data jobs are no-ops on complete output, and a training stage whose exported
model is present is skipped (its run id is read back from MLflow).

It lives beside jobs/ rather than in the ``diffmoe`` package because it needs the repository's
jobs/, configs and deployments; it imports only the installed ``diffmoe`` (editable or not).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICK = {  # the CI end-to-end test: every stage, smallest settings
    "corpus": [
        "max_documents=40",
        "seq_len=64",
        "tokenizer.train.vocab_size=384",
        "tokenizer.train.sample_docs=40",
    ],
    "sft": ["max_documents=48", "seq_len=128"],
    "pretrain": ["train.max_steps=4", "train.log_every=2", "train.val_every=4", "train.checkpoint_every=4"],
    "finetune": ["train.max_steps=4", "train.log_every=2", "train.val_every=4", "train.checkpoint_every=4"],
    "evaluate": ["max_batches=2", "generate_samples=2"],
}


class DemoError(RuntimeError):
    """A stage failed; the message says which and how to look closer."""


def sh(cmd: list[str], env=None) -> None:
    """Run a CLI from the repository root, its output shown live; fail on a non-zero exit."""
    print("$ " + " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    if code != 0:
        raise DemoError(f"command failed with exit code {code}: {' '.join(cmd)}")


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.workdir).resolve()
        self.dashboard = f"http://127.0.0.1:{args.dashboard_port}"
        self.tracking_uri = f"sqlite:///{self.work / 'mlflow.db'}"
        # CLIs from this environment, and `python` in job entrypoints = this interpreter
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        # `ray start` turns on token auth (token in ~/.ray/auth_token); the CLIs and the job client
        # send it only when told (read when Ray is first imported, so set here, before that).
        self.env.setdefault("RAY_AUTH_MODE", "token")
        os.environ.setdefault("RAY_AUTH_MODE", self.env["RAY_AUTH_MODE"])

    # ---- cluster -------------------------------------------------------------------------------
    def start_ray(self) -> None:
        with socket.socket() as sock:
            sock.settimeout(2)
            if sock.connect_ex(("127.0.0.1", self.args.ray_port)) == 0:
                print(f"ray: reusing the head at 127.0.0.1:{self.args.ray_port}", flush=True)
                return
        cpus = max(4, os.cpu_count() or 1)  # logical CPUs: room for a job driver, actors and a replica
        cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1"]
        cmd += [f"--port={self.args.ray_port}", f"--num-cpus={cpus}", "--include-dashboard=true"]
        cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.args.dashboard_port}"]
        # Ray's fixed default ports for the job agent and Ray Client may be held by another local
        # Ray instance; free ones keep this head working beside it.
        cmd += [f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"]
        cmd += ["--disable-usage-stats"] + (["--temp-dir", self.args.temp_dir] if self.args.temp_dir else [])
        sh(cmd, env=self.env)

    def mlflow_experiment(self) -> None:
        """Create the experiment here first so its artifacts live under the work dir, not in a job's
        temporary working directory."""
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        if client.get_experiment_by_name("diffmoe") is None:
            client.create_experiment("diffmoe", artifact_location=(self.work / "mlruns").as_uri())

    def submit(self, job: str, config: str, overrides: list[str]) -> dict:
        """Submit ``jobs/<job>.py`` to the head's job server, show its logs while it runs, and return
        the result its runner printed (``DIFFMOE_RESULT {...}``)."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        from diffmoe.jobs import parse_result
        from diffmoe.tracking import git_commit

        entrypoint = ["python", f"jobs/{job}.py", "--config", f"jobs/configs/{config}.yaml"]
        for item in overrides:
            entrypoint += ["--set", item]
        runtime_env = {
            "working_dir": str(REPO),
            "env_vars": {
                "MLFLOW_TRACKING_URI": self.tracking_uri,
                "DIFFMOE_GIT_COMMIT": git_commit(REPO),
                "TOKENIZERS_PARALLELISM": "false",
            },
        }
        client = JobSubmissionClient(self.dashboard)
        print(f"submit: {shlex.join(entrypoint)}", flush=True)
        for attempt in range(60):  # a fresh head's job agent takes a while to register
            try:
                job_id = client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env)
                break
            except RuntimeError as err:
                if "No available agent" not in str(err) or attempt == 59:
                    raise DemoError(f"{job}: the job server refused the job: {err}") from None
                print("ray: the job agent is not up yet; retrying in 5 s", flush=True)
                time.sleep(5)
        shown = 0
        while True:
            status = client.get_job_status(job_id)
            logs = client.get_job_logs(job_id)
            print(logs[shown:], end="", flush=True)
            shown = len(logs)
            if status.is_terminal():
                break
            time.sleep(2)
        result = parse_result(logs)
        if status != JobStatus.SUCCEEDED or not result or not result.get("ok"):
            why = (result or {}).get("error") or client.get_job_info(job_id).message or "no result line"
            raise DemoError(f"{job} ({job_id}) ended {status.value}: {why}; logs: ray job logs {job_id}")
        print(f"demo: job {job} {job_id} {status.value}", flush=True)
        return result

    # ---- stages --------------------------------------------------------------------------------
    def prepare(self) -> None:
        quick = self.args.quick
        corpus = [f"output_dir={self.work / 'data/corpus_tiny'}"] + (QUICK["corpus"] if quick else [])
        self.submit("prepare_corpus", "corpus_tiny", corpus)
        sft = [
            f"output_dir={self.work / 'data/sft_tiny'}",
            f"tokenizer.path={self.work / 'data/corpus_tiny/tokenizer'}",
        ]
        self.submit("prepare_corpus", "sft_tiny", sft + (QUICK["sft"] if quick else []))

    def train(self, kind: str, config: str, overrides: list[str]) -> str:
        """Run a training job unless its exported model exists; return its MLflow run id."""
        out_dir = self.work / f"artifacts/{kind}-tiny"
        name = f"{kind}-tiny"
        done = (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors"))
        if not done:
            overrides = overrides + [
                f"run.output_dir={out_dir}",
                f"run.storage_path={self.work / 'runs'}",
                f"run.name={name}",
                f"mlflow.tracking_uri={self.tracking_uri}",
            ]
            result = self.submit(kind if kind == "pretrain" else "finetune", config, overrides)
            return result["run_id"]
        print(f"{kind}: reusing {out_dir} (delete it to train again)")
        return self.latest_run(name)

    def latest_run(self, name: str) -> str:
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        runs = client.search_runs(
            [client.get_experiment_by_name("diffmoe").experiment_id],
            f"attributes.run_name = '{name}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            raise DemoError(f"no finished MLflow run named {name!r}; delete artifacts/ to start over")
        return runs[0].info.run_id

    def evaluate(self, run_id: str) -> dict:
        """jobs/evaluate.py on the fine-tuned model's MLflow URI, unless it was evaluated already."""
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        done = client.search_runs(
            [client.get_experiment_by_name("diffmoe").experiment_id],
            f"tags.evaluated_run_id = '{run_id}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
        if done:
            print(f"evaluate: reusing MLflow run {done[0].info.run_id}")
            return {"run_id": done[0].info.run_id, **done[0].data.metrics}
        overrides = [
            f"model=runs:/{run_id}/model",
            f"data.path={self.work / 'data/sft_tiny'}",
            f"mlflow.tracking_uri={self.tracking_uri}",
        ]
        return self.submit(
            "evaluate", "evaluate_tiny", overrides + (QUICK["evaluate"] if self.args.quick else [])
        )

    def deploy(self, run_id: str) -> str:
        config = yaml.safe_load((REPO / "deployments/diffmoe.yaml").read_text())
        config["http_options"]["port"] = self.args.http_port
        args = config["applications"][0]["args"]
        args.update(model=f"runs:/{run_id}/model", mlflow_tracking_uri=self.tracking_uri)
        args.update(
            http_port=self.args.http_port,
            autoscaling_config={**args["autoscaling_config"], "max_replicas": 1},
        )
        path = self.work / "runs" / "demo_serve.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        sh([str(BIN / "serve"), "deploy", str(path), "--address", self.dashboard], env=self.env)
        return self.wait_ready(f"http://127.0.0.1:{self.args.http_port}", args["model_name"])

    def wait_ready(self, base: str, model_name: str, timeout: float = 300) -> str:
        """Poll /health; fail fast with Serve's own message when the application cannot deploy."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    return model_name
            except httpx.HTTPError:
                pass
            status = subprocess.run(
                [str(BIN / "serve"), "status", "--address", self.dashboard],
                capture_output=True,
                text=True,
                env=self.env,
            ).stdout
            if "DEPLOY_FAILED" in status or "UNHEALTHY" in status:
                raise DemoError(f"the Serve application failed to deploy:\n{status[-3000:]}")
            time.sleep(3)
        raise DemoError(f"the server at {base} did not become healthy in {timeout:.0f}s; see `serve status`")

    def chat(self, model_name: str) -> dict:
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.args.http_port}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": "def add(a, b):\n    Return the sum of a and b."}],
            max_tokens=32,
            temperature=0,
        )
        choice = reply.choices[0]
        return {
            "answer": choice.message.content,
            "finish_reason": choice.finish_reason,
            "usage": reply.usage.model_dump(),
        }

    def run(self) -> dict:
        t0 = time.monotonic()
        self.work.mkdir(parents=True, exist_ok=True)
        self.start_ray()
        self.mlflow_experiment()
        self.prepare()
        quick = self.args.quick
        pre = self.train(
            "pretrain",
            "pretrain_tiny",
            [f"data.path={self.work / 'data/corpus_tiny'}"] + (QUICK["pretrain"] if quick else []),
        )
        sft = [
            f"data.path={self.work / 'data/sft_tiny'}",
            f"model.init_from={self.work / 'artifacts/pretrain-tiny'}",
        ]
        fin = self.train("finetune", "finetune_tiny", sft + (QUICK["finetune"] if quick else []))
        evaluation = self.evaluate(fin)
        model_name = self.deploy(fin)
        reply = self.chat(model_name)
        summary = {
            "pretrain_run_id": pre,
            "finetune_run_id": fin,
            "eval_run_id": evaluation.get("run_id"),
            "eval_loss_per_token": evaluation.get("eval/loss_per_token"),
            **reply,
            "seconds": round(time.monotonic() - t0, 1),
        }
        print("\n=== diffmoe demo ===")
        print(f"chat answer from {model_name} (runs:/{fin}/model), finish_reason={reply['finish_reason']}:")
        print((reply["answer"] or "(empty: the model ended its answer at once)") + "\n")
        print(
            f"MLflow UI:  {BIN / 'mlflow'} ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1 --port 5000"
        )
        print(f"API:        http://127.0.0.1:{self.args.http_port}/v1  (OpenAPI docs at /docs)")
        print("stop:       make down")
        print(json.dumps(summary))
        return summary


def down(temp_dir: str | None = None) -> None:
    """Stop the Serve apps and the local Ray head (what ``make down`` runs: ``ray stop``, which ends
    every Ray process of this machine). With ``temp_dir`` only the head started with that
    ``--temp-dir`` is stopped, so other Ray instances (a test session's) keep running."""
    if temp_dir is None:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], check=False)
        return
    import psutil

    marker = str(Path(temp_dir).resolve())
    procs = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid != os.getpid() and any(marker in part for part in proc.info["cmdline"] or []):
            procs.append(proc)
    for proc in procs:
        proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        proc.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--down", action="store_true", help="stop Serve and the local Ray head, then exit")
    parser.add_argument("--workdir", default=str(REPO), help="where data/, artifacts/, runs/, mlflow.db go")
    parser.add_argument("--quick", action="store_true", help="smallest settings (the CI end-to-end test)")
    parser.add_argument("--ray-port", type=int, default=6379)
    parser.add_argument("--dashboard-port", type=int, default=8265, help="also the job-submission address")
    parser.add_argument("--http-port", type=int, default=8000, help="Serve HTTP port on 127.0.0.1")
    parser.add_argument("--temp-dir", default=None, help="Ray's temp dir (keeps this head apart from others)")
    args = parser.parse_args(argv)
    if args.down:
        down(args.temp_dir)
        return 0
    try:
        Demo(args).run()
    except DemoError as err:
        print(f"demo failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
