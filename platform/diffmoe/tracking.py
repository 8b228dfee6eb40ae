"""MLflow in one place: the config section, the tracking-URI default, run creation with tags and
batched parameter / metric logging.

Training, evaluation and the benchmark log through these helpers so every run resolves its
tracking URI the same way and parameters go in ``log_batch`` calls of at most 100 (MLflow's limit)
instead of one request per parameter, which is slow against a remote tracking server.
"""

from __future__ import annotations

import os
from typing import Any

from diffmoe.config import StrictModel, flatten

PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params
METRICS_PER_BATCH = 1000  # and for metrics
MAX_PARAM_CHARS = 6000  # longer values are cut (MLflow rejects them)


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a SQLite file ``mlflow.db`` in the current directory (absolute,
    so Ray workers with another working directory log to the same store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The checkout's commit for the ``git_commit`` tag; a job's working directory under ``ray job
    submit`` is a copy without ``.git``, so the submitter passes it as ``$DIFFMOE_GIT_COMMIT``."""
    import subprocess

    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=cwd, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DIFFMOE_GIT_COMMIT", "unknown")


class MLflowSection(StrictModel):
    """The ``mlflow:`` section every job config shares."""

    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    experiment: str = "diffmoe"
    run_name: str | None = None  # default: chosen by the job (run.name, eval-<model>, benchmark-<side>)

    def resolved_uri(self) -> str:
        return self.tracking_uri or default_tracking_uri()


def create_run(
    section: MLflowSection,
    *,
    run_name: str,
    tags: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
):
    """Create a run in ``section.experiment`` with tags and params; returns ``(client, run_id)``.
    The run stays open: the caller logs to it and ends it with ``client.set_terminated``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = section.resolved_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(section.experiment)
    client = MlflowClient(uri)
    run = client.create_run(
        experiment.experiment_id,
        run_name=section.run_name or run_name,
        tags={k: str(v) for k, v in (tags or {}).items()},
    )
    if params:
        log_params(client, run.info.run_id, params)
    return client, run.info.run_id


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    """Nested dicts / config models are flattened to dotted keys; one request per 100 params."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(params).items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """All of ``metrics`` at one step, in requests of at most 1000."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i : i + METRICS_PER_BATCH])


def register_model(client, run_id: str, artifact_path: str, name: str, alias: str | None = None) -> str:
    """Register the run's ``artifact_path`` directory as a new version of ``name`` in the MLflow Model
    Registry (created if missing), linked to the run; point ``alias`` at it. Returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id).version
    if alias:
        client.set_registered_model_alias(name, alias, version)
    client.set_tag(run_id, "registered_model", f"models:/{name}/{version}")
    return str(version)


def _registered_version(client, source: str) -> tuple[str, str] | None:
    """(name, version) of a ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` source (an
    alias resolved to the version it points at now); None for other sources."""
    import re

    m = re.match(r"^models:/([^/@]+)(?:@([^/]+)|/(\d+))/?$", source)
    if m is None:
        return None
    name, alias, version = m.groups()
    if alias:
        version = client.get_model_version_by_alias(name, alias).version
    return name, str(version)


def source_run_id(client, source: str) -> str | None:
    """The training run a ``runs:/<id>/...`` or registered ``models:/...`` source came from (None for
    a plain directory, or a version registered without a run)."""
    if source.startswith("runs:/"):
        return source.split("/")[1]
    found = _registered_version(client, source)
    return (client.get_model_version(*found).run_id or None) if found else None


def tag_model_version(client, source: str, tags: dict[str, Any]) -> str | None:
    """Evaluation results beside the model: for a ``models:/<name>/<version>`` or
    ``models:/<name>@<alias>`` source set ``tags`` on that registered version (an alias is pinned to
    the version it points at now). Returns ``models:/<name>/<version>``, or None for other sources."""
    found = _registered_version(client, source)
    if found is None:
        return None
    name, version = found
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    return f"models:/{name}/{version}"
