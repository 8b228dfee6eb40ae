"""``make demo``: a fresh clone to a served model that answers, on a local Ray head, as a user runs it.

    python scripts/demo.py            # ray start -> 5 jobs via the job API -> serve deploy -> one chat request
    python scripts/demo.py --down     # serve shutdown + ray stop  (``make down``)

The model learns a task whose answers can be checked: reversing digits ("reverse 90417" -> "71409").
Stages: Ray Data prepares the standard-library corpus and the task's chat data; the tiny LLaDA-MoE is
pretrained on the corpus, fine-tuned on the task (registered in the MLflow Model Registry as
``diffmoe-demo``, alias ``champion``) and evaluated on held-out prompts; Ray Serve serves
``models:/diffmoe-demo@champion``; the OpenAI client asks a question the model never saw and the
answer is checked.

Every job is submitted to the head's job server with Ray's ``JobSubmissionClient`` (working
directory: this repository; absolute ``--set`` paths, as a job runs in a temporary copy) and its
result read from the ``DIFFMOE_RESULT`` line the job runner prints last. The console gets one line
per stage (and the training progress lines); each job's full log goes to ``<workdir>/logs/``. A rerun
reuses finished stages: the data jobs are no-ops on complete output, a training stage whose exported
model is present is skipped (its run id read back from MLflow), an evaluated run is not evaluated again.

It lives beside jobs/ rather than in the ``diffmoe`` package because it needs the repository's
jobs/, configs and deployments; it imports only the installed ``diffmoe`` (editable or not).
"""

from __future__ import annotations

import argparse
import json
import logging
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
QUESTION, EXPECTED = "reverse 90417", "71409"  # never in the training data (see write_task_data)
TASK = {"min_digits": 3, "max_digits": 6, "train_examples": 20000, "seed": 0}
MODEL_NAME, ALIAS = "diffmoe-demo", "champion"
DECODE = ["decoding.gen_length=8", "decoding.block_length=8"]  # answers: at most 6 digits + end of turn
QUICK = {  # the CI end-to-end test: every stage, smallest settings that still learn the task
    "corpus": [
        "max_documents=40",
        "seq_len=64",
        "tokenizer.train.vocab_size=384",
        "tokenizer.train.sample_docs=40",
    ],
    "pretrain": ["train.max_steps=4", "train.log_every=2", "train.val_every=4", "train.checkpoint_every=4"],
    "finetune": [
        "train.max_steps=700",
        "train.log_every=50",
        "train.val_every=700",
        "train.checkpoint_every=700",
        "train.progress_every_s=20",
    ],
    "evaluate": ["max_batches=2", "generate_samples=32"],
}


class DemoError(RuntimeError):
    """A stage failed; the message says which and how to look closer."""


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
        self.rows: list[dict] = []  # the stage summary
        self.reply: dict = {}

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
        with open(self.work / "logs" / "ray-start.log", "w") as log:
            if subprocess.run(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT).returncode:
                raise DemoError(f"ray start failed; see {log.name}")
        print(
            f"ray: started a head at 127.0.0.1:{self.args.ray_port} (dashboard {self.dashboard})", flush=True
        )

    def mlflow_experiment(self) -> None:
        """Create the experiment here first so its artifacts live under the work dir, not in a job's
        temporary working directory."""
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        if client.get_experiment_by_name("diffmoe") is None:
            client.create_experiment("diffmoe", artifact_location=(self.work / "mlruns").as_uri())

    def submit(self, job: str, config: str, overrides: list[str], log: str) -> dict:
        """Submit ``jobs/<job>.py`` to the head's job server; its log goes to ``logs/<log>.log`` (the
        console gets its progress lines); returns the result its runner printed last
        (``DIFFMOE_RESULT {...}``) with the job id."""
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
        for name in list(logging.root.manager.loggerDict):  # no per-upload notices on the console
            if name.startswith(("ray.dashboard", "ray._private.runtime_env")):
                logging.getLogger(name).setLevel(logging.ERROR)
        client = JobSubmissionClient(self.dashboard)
        log_path = self.work / "logs" / f"{log}.log"
        for attempt in range(60):  # a fresh head's job agent takes a while to register
            try:
                job_id = client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env)
                break
            except RuntimeError as err:
                if "No available agent" not in str(err) or attempt == 59:
                    raise DemoError(f"{job}: the job server refused the job: {err}") from None
                time.sleep(5)
        shown, last = 0, ""
        with open(log_path, "w") as out:
            out.write(f"$ {shlex.join(entrypoint)}\n# ray job {job_id}\n")
            while True:
                status = client.get_job_status(job_id)
                logs = client.get_job_logs(job_id)
                new, shown = logs[shown:], len(logs)
                out.write(new)
                out.flush()
                for line in new.splitlines():
                    if "progress: step" in line and line[line.index("progress: step") :] != last:
                        last = line[line.index("progress: step") :]  # a worker's line can come twice
                        print("    " + last, flush=True)
                if status.is_terminal():
                    break
                time.sleep(2)
            out.write(f"# job {job} {job_id} {status.value}\n")
        result = parse_result(logs)
        if status != JobStatus.SUCCEEDED or not result or not result.get("ok"):
            why = (result or {}).get("error") or client.get_job_info(job_id).message or "no result line"
            tail = "\n".join(logs.splitlines()[-15:])
            raise DemoError(f"{job} ({job_id}) ended {status.value}: {why}\n{tail}\nfull log: {log_path}")
        return {**result, "job_id": job_id}

    # ---- stages --------------------------------------------------------------------------------
    def stage(self, name: str, fn, *args) -> dict:
        """Run one stage; record (and print) its summary row: stage, status, seconds, id, metric."""
        t0 = time.monotonic()
        print(f"{name} ...", flush=True)
        row = fn(*args)
        row = {"stage": name, "status": "done", **row, "seconds": round(time.monotonic() - t0, 1)}
        self.rows.append(row)
        print(_row(row), flush=True)
        return row

    def prepare_corpus(self) -> dict:
        over = [f"output_dir={self.work / 'data/corpus_tiny'}"] + (QUICK["corpus"] if self.args.quick else [])
        result = self.submit("prepare_corpus", "corpus_tiny", over, log="prepare-corpus")
        return {"id": result["job_id"], "metric": f"{result['sequences']:,} sequences"}

    def prepare_task(self) -> dict:
        path = write_task_data(self.work / "data/reverse.jsonl")
        over = [
            f"inputs=[{path}]",
            f"output_dir={self.work / 'data/sft_reverse'}",
            f"tokenizer.path={self.work / 'data/corpus_tiny/tokenizer'}",
            "seq_len=40",
            "max_documents=null",
        ]
        result = self.submit("prepare_corpus", "sft_tiny", over, log="prepare-task")
        return {"id": result["job_id"], "metric": f"{result['sequences']:,} chats"}

    def train(self, kind: str, config: str, overrides: list[str]) -> dict:
        """Run a training job unless its exported model exists; its MLflow run id and val/loss."""
        name = "pretrain-tiny" if kind == "pretrain" else "finetune-reverse"
        out_dir = self.work / "artifacts" / name
        status = "done"
        if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
            run_id, status = self.latest_run(name), "reused"
        else:
            overrides = overrides + [
                f"run.output_dir={out_dir}",
                f"run.storage_path={self.work / 'runs'}",
                f"run.name={name}",
                f"mlflow.tracking_uri={self.tracking_uri}",
            ]
            run_id = self.submit(kind, config, overrides, log=name)["run_id"]
        val = self.client().get_run(run_id).data.metrics.get("val/loss")
        return {"status": status, "id": run_id, "metric": f"val/loss {val:.4g}" if val is not None else ""}

    def client(self):
        import mlflow

        return mlflow.MlflowClient(self.tracking_uri)

    def latest_run(self, name: str) -> str:
        client = self.client()
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
        client = self.client()
        done = client.search_runs(
            [client.get_experiment_by_name("diffmoe").experiment_id],
            f"tags.evaluated_run_id = '{run_id}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
        if done:
            result, status = {"run_id": done[0].info.run_id, **done[0].data.metrics}, "reused"
        else:
            overrides = [
                f"model=runs:/{run_id}/model",
                f"data.path={self.work / 'data/sft_reverse'}",
                f"mlflow.tracking_uri={self.tracking_uri}",
                *DECODE,
                "generate_samples=64",
            ]
            overrides += QUICK["evaluate"] if self.args.quick else []
            result, status = self.submit("evaluate", "evaluate_tiny", overrides, log="evaluate"), "done"
        exact = result.get("eval/exact_match", float("nan"))
        return {"status": status, "id": result["run_id"], "metric": f"exact match {exact:.3f} (held out)"}

    def deploy(self) -> dict:
        config = yaml.safe_load((REPO / "deployments/diffmoe.yaml").read_text())
        config["http_options"]["port"] = self.args.http_port
        args = config["applications"][0]["args"]
        source = f"models:/{MODEL_NAME}@{ALIAS}"
        args.update(model=source, model_name=MODEL_NAME, mlflow_tracking_uri=self.tracking_uri)
        # the canvas the model was trained for: a diffusion model trained on 40-token rows does not
        # answer on the server's default 32-token canvas after its 28-token prompt
        args["decoding"].update(gen_length=8, block_length=8)
        args.update(
            http_port=self.args.http_port,
            autoscaling_config={**args["autoscaling_config"], "max_replicas": 1},
        )
        path = self.work / "runs" / "demo_serve.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        with open(self.work / "logs" / "serve-deploy.log", "w") as log:
            cmd = [str(BIN / "serve"), "deploy", str(path), "--address", self.dashboard]
            if subprocess.run(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT).returncode:
                raise DemoError(f"serve deploy failed; see {log.name}")
        self.wait_ready(f"http://127.0.0.1:{self.args.http_port}")
        return {"id": source, "metric": f"http://127.0.0.1:{self.args.http_port}/v1"}

    def wait_ready(self, base: str, timeout: float = 300) -> None:
        """Poll /health; fail fast with Serve's own message when the application cannot deploy."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    return
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

    def chat(self) -> dict:
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.args.http_port}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=8,
            temperature=0,
        )
        choice = reply.choices[0]
        answer = (choice.message.content or "").strip()
        self.reply = {
            "question": QUESTION,
            "answer": answer,
            "expected": EXPECTED,
            "correct": answer == EXPECTED,
            "finish_reason": choice.finish_reason,
            "usage": reply.usage.model_dump(),
        }
        status = "correct" if answer == EXPECTED else "WRONG"
        return {"status": status, "id": MODEL_NAME, "metric": f"{QUESTION!r} -> {answer!r}"}

    def run(self) -> dict:
        t0 = time.monotonic()
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.start_ray()
        self.mlflow_experiment()
        quick = self.args.quick
        self.stage("prepare-corpus", self.prepare_corpus)
        self.stage("prepare-task", self.prepare_task)
        corpus = [f"data.path={self.work / 'data/corpus_tiny'}"]
        pre = self.stage(
            "pretrain", self.train, "pretrain", "pretrain_tiny", corpus + (QUICK["pretrain"] if quick else [])
        )
        sft = [
            f"data.path={self.work / 'data/sft_reverse'}",
            f"model.init_from={self.work / 'artifacts/pretrain-tiny'}",
        ]
        fin = self.stage(
            "finetune", self.train, "finetune", "finetune_reverse", sft + (QUICK["finetune"] if quick else [])
        )
        evaluation = self.stage("evaluate", self.evaluate, fin["id"])
        self.stage("serve", self.deploy)
        self.stage("chat", self.chat)
        summary = {
            "pretrain_run_id": pre["id"],
            "finetune_run_id": fin["id"],
            "eval_run_id": evaluation["id"],
            **self.reply,
            "stages": self.rows,
            "seconds": round(time.monotonic() - t0, 1),
        }
        self.report(summary)
        return summary

    def report(self, summary: dict) -> None:
        experiment = self.client().get_experiment_by_name("diffmoe").experiment_id
        runs = json.dumps([summary["pretrain_run_id"], summary["finetune_run_id"]], separators=(",", ":"))
        print("\n=== diffmoe demo ===")
        print(_row(HEADER))
        for row in self.rows:
            print(_row(row))
        verdict = "correct" if summary["correct"] else f"WRONG (expected {summary['expected']})"
        print(
            f"\nquestion: {summary['question']}\nanswer:   {summary['answer'] or '(empty)'}   [{verdict}]\n"
        )
        print(
            f"MLflow UI:  {BIN / 'mlflow'} ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1 --port 5000"
        )
        print(f'compare:    http://127.0.0.1:5000/#/compare-runs?runs={runs}&experiments=["{experiment}"]')
        print(
            f"API:        http://127.0.0.1:{self.args.http_port}/v1  (model {MODEL_NAME!r}; OpenAPI docs at /docs)"
        )
        print(f"logs:       {self.work / 'logs'}")
        print("stop:       make down")
        print(json.dumps(summary))


HEADER = {
    "stage": "stage",
    "status": "status",
    "seconds": "seconds",
    "id": "run / id",
    "metric": "key metric",
}


def _row(row: dict) -> str:
    seconds = row["seconds"] if isinstance(row["seconds"], str) else f"{row['seconds']:.1f}"
    return f"  {row['stage']:<15}{row['status']:<9}{seconds:>8}  {str(row.get('id', '')):<34}{row.get('metric', '')}"


def write_task_data(path: Path) -> Path:
    """The task's chat data as JSONL ({"prompt", "response"}): seeded, without the demo question."""
    from diffmoe.generation.tasks import Example, ReverseTask, make_examples, write_jsonl

    task = ReverseTask(min_digits=TASK["min_digits"], max_digits=TASK["max_digits"])
    examples = [
        Example(prompt=f"reverse {ex.answer[::-1]}", answer=ex.answer)
        for ex in make_examples(task, TASK["train_examples"], TASK["seed"])
    ]
    return write_jsonl([ex for ex in examples if ex.prompt != QUESTION], path)


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
