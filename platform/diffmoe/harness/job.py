"""``jobs/lm_eval.py``: lm-evaluation-harness tasks on a model source, in a Ray task, into MLflow.

The Ray task (``num_cpus`` / ``num_gpus``: it lands on a GPU node when asked) loads the model once,
runs ``lm_eval.simple_evaluate`` with the ``diffmoe`` model and returns the results and the logged
samples. The driver logs every numeric task metric as ``lm_eval/<task>/<metric>``, the results JSON
and one samples JSONL per task as artifacts, tagged with the evaluated model (and its run for a
``runs:/`` source), so the scores sit beside the training runs in the MLflow UI. A registered model
(``models:/<name>/<version>`` or ``@<alias>``) also gets the metrics as tags on its version.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from pydantic import Field

from diffmoe.cluster import connect
from diffmoe.config import StrictModel
from diffmoe.generation.config import DecodingConfig
from diffmoe.tracking import MLflowSection


class BuiltinTasks(StrictModel):
    """The platform's checkable tasks written as local lm-eval tasks (``harness.tasks``)."""

    task: str = "reverse"  # diffmoe.generation.tasks: reverse | sort | addition | lookup
    examples: int = Field(64, ge=1)
    seed: int = 12345  # held-out draw: not the training data's seed
    min_digits: int = Field(4, ge=1)  # reverse, sort and lookup (2 digits per key)
    max_digits: int = Field(12, ge=1)


class LmEvalConfig(StrictModel):
    model: str = "artifacts/finetune-tiny"  # HF directory or MLflow URI (runs:/..., models:/...)
    tasks: list[str] = Field(default_factory=lambda: ["diffmoe_reverse", "diffmoe_reverse_mc"])
    include_path: str | None = None  # a directory of your own task YAMLs (local data files)
    # Also index lm-eval's own task library (~15k YAMLs: seconds to scan; its tasks download their
    # datasets, so they need network access or a prepared HF cache).
    lm_eval_library: bool = False
    builtin: BuiltinTasks = BuiltinTasks()
    limit: int | None = Field(None, ge=1)  # at most this many documents per task
    num_fewshot: int | None = Field(None, ge=0)
    apply_chat_template: bool = True  # render prompts in the model's chat template (as SFT rows were)
    mc_num: int = Field(8, ge=1)  # mask draws per loglikelihood request (diffusion models)
    batch_size: int = Field(16, ge=1)  # Engine batch for generate_until
    decoding: DecodingConfig = DecodingConfig(gen_length=32, block_length=32, threshold=0.9)
    seed: int = 0
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    mlflow: MLflowSection = MLflowSection()  # run_name default: lm-eval-<model directory name>


class LmEvalError(ValueError):
    """The model, the tasks or lm-eval itself are not usable; the message says which."""


def run_lm_eval(cfg: LmEvalConfig, model_dir: str, work: Path) -> dict:
    """lm-eval in this process: ``{"results": {task: {metric: value}}, "samples": {task: [...]}}``."""
    try:
        from lm_eval.tasks import TaskManager

        import lm_eval
    except ImportError:
        raise LmEvalError("lm-eval is not installed: pip install 'diffmoe[lm-eval]'") from None
    from .lm import DiffmoeLM
    from .tasks import write_builtin_tasks

    b = cfg.builtin
    extra = {"min_digits": b.min_digits, "max_digits": b.max_digits} if b.task != "addition" else {}
    paths = [str(write_builtin_tasks(work / "tasks", b.task, b.examples, b.seed, **extra))]
    if cfg.include_path:
        paths.append(cfg.include_path)
    manager = TaskManager(include_path=paths, include_defaults=cfg.lm_eval_library)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        raise LmEvalError(f"tasks: unknown {unknown}; built in: diffmoe_{b.task}, diffmoe_{b.task}_mc")
    lm = DiffmoeLM(
        model_dir, mc_num=cfg.mc_num, batch_size=cfg.batch_size, decoding=cfg.decoding, seed=cfg.seed
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=cfg.tasks,
        task_manager=manager,
        limit=cfg.limit,
        num_fewshot=cfg.num_fewshot,
        apply_chat_template=cfg.apply_chat_template,
        log_samples=True,
        random_seed=cfg.seed,
        bootstrap_iters=0,
    )
    results = {task: {k: v for k, v in m.items() if _number(v)} for task, m in out["results"].items()}
    return {"results": results, "samples": _plain(out.get("samples", {}))}


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _plain(value):
    """JSON-safe copy of lm-eval's samples (they may hold numpy scalars and tuples)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def metric_name(task: str, metric: str) -> str:
    """``acc,none`` -> ``lm_eval/<task>/acc`` (MLflow keys: no commas)."""
    name, _, filt = metric.partition(",")
    return f"lm_eval/{task}/{name}" + ("" if filt in ("", "none") else f"_{filt}")


def evaluate_with_lm_eval(cfg: LmEvalConfig) -> dict:
    """Resolve, evaluate in a Ray task, log one MLflow run; returns the metrics and the run id."""
    import ray

    from diffmoe.model.source import is_mlflow_uri, resolve
    from diffmoe.tracking import create_run, log_metrics, tag_model_version

    uri = cfg.mlflow.resolved_uri()
    if not is_mlflow_uri(cfg.model) and not Path(cfg.model).is_dir():
        raise LmEvalError(f"model: directory not found: {cfg.model}")
    connect()

    @ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    def task(cfg_json: dict) -> dict:
        c = LmEvalConfig.model_validate(cfg_json)
        with tempfile.TemporaryDirectory() as tmp:
            return run_lm_eval(c, str(resolve(c.model, uri)), Path(tmp))

    try:
        out = ray.get(task.remote(cfg.model_dump(mode="json")))
    except ray.exceptions.RayTaskError as err:
        cause = err.as_instanceof_cause()
        raise (LmEvalError(str(cause)) if isinstance(cause, ValueError) else cause) from None
    metrics = {metric_name(t, k): float(v) for t, m in out["results"].items() for k, v in m.items()}
    tags = {"kind": "lm_eval", "evaluated_model": cfg.model}
    if cfg.model.startswith("runs:/"):
        tags["evaluated_run_id"] = cfg.model.split("/")[1]
    name = cfg.mlflow.run_name or f"lm-eval-{Path(cfg.model.rstrip('/')).name}"
    client, run_id = create_run(cfg.mlflow, run_name=name, tags=tags, params=cfg.model_dump(mode="json"))
    log_metrics(client, run_id, metrics)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "results.json").write_text(json.dumps(out["results"], indent=2))
        for t, samples in out["samples"].items():
            (Path(tmp) / f"samples_{t}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        client.log_artifacts(run_id, tmp, "lm_eval")
    version = tag_model_version(client, cfg.model, {**metrics, "lm_eval_run_id": run_id})
    if version:
        client.set_tag(run_id, "evaluated_model_version", version)
    client.set_terminated(run_id)
    return {"run_id": run_id, **metrics}
