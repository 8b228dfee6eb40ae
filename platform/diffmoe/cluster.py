"""Connecting a driver to Ray so that its workers run the same diffmoe code as the driver.

The job scripts import ``diffmoe`` from the checkout's ``platform/`` directory, which they put on
the *driver's* ``sys.path`` only. Under ``ray job submit --working-dir .`` Ray starts every worker
in an unpacked copy of that checkout, but puts only the copy's root on its path, so a Train, Data
or Serve worker would import whatever ``diffmoe`` its node has installed (on the cluster launcher's
nodes: the editable install made at ``ray up``, possibly older than the submitted code).
``connect`` adds the package root to the job's ``PYTHONPATH`` relative to that working directory,
which is where every worker starts; Ray keeps the working directory itself first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

JOB_CONFIG_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # what Ray's job manager sets for a driver


def worker_code_env(environ=os.environ, cwd: Path | None = None) -> dict | None:
    """The runtime env that puts this driver's diffmoe on its workers' path, or None when nothing
    is needed (no submitted job with a working directory, the package outside it, or the job
    already sets ``PYTHONPATH``)."""
    raw = environ.get(JOB_CONFIG_VARIABLE)
    if not raw:
        return None
    env = json.loads(raw).get("runtime_env") or {}
    if not env.get("working_dir") or "PYTHONPATH" in (env.get("env_vars") or {}):
        return None
    root = Path(__file__).resolve().parent.parent  # the directory holding the diffmoe package
    try:
        relative = root.relative_to((cwd or Path.cwd()).resolve())
    except ValueError:
        return None
    return None if str(relative) == "." else {"env_vars": {"PYTHONPATH": str(relative)}}


def connect() -> None:
    """``ray.init()`` unless connected: ``$RAY_ADDRESS``, else a cluster ``ray start`` left on this
    machine, else a local one; under a submitted job, with ``worker_code_env``."""
    import ray

    if not ray.is_initialized():
        ray.init(runtime_env=worker_code_env())
