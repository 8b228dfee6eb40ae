"""The Ray Serve application: one FastAPI-ingress deployment, its builder and a local runner.

``deployments/diffmoe.yaml`` points ``import_path`` at ``diffmoe.serve.app:build_app``; Serve calls it
with the YAML's ``args`` (validated as ``ServeConfig``). Replica resources follow ``ep_size``: one
bundle holding the replica and rank 0, plus one bundle per further expert-parallel worker.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os

from ray import serve
from ray.serve import Application

from diffmoe.config import build
from diffmoe.model.source import pin_version

from .api import build_api
from .config import ServeConfig
from .host import ModelHost, ModelLoader
from .metrics import EngineMetrics

logger = logging.getLogger("ray.serve")


def _import(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@serve.ingress()
class DiffMoEServer:
    """One replica: loads the model (or starts its expert-parallel workers) and serves the API."""

    def __init__(self, args: dict, model_loader: ModelLoader | str | None = None):
        self.cfg = ServeConfig.model_validate(args)
        self.api_key = replica_api_key(self.cfg)  # before loading anything: fail closed, fast
        if isinstance(model_loader, str):
            model_loader = _import(model_loader)
        self.host = ModelHost(self.cfg, model_loader)
        self.metrics = EngineMetrics(self.cfg.served_name)
        logger.info(
            '{"event": "replica_ready", "model": "%s", "ep_size": %d, "source": "%s"}',
            self.cfg.served_name,
            self.cfg.ep_size,
            self.cfg.model,
        )

    def __serve_build_asgi_app__(self):
        return build_api(self.host, self.metrics, self.api_key)

    async def check_health(self) -> None:
        """Serve's health check: raising makes the controller replace this replica."""
        problem = await self.host.problem()
        if problem:
            raise RuntimeError(f"diffmoe replica unhealthy: {problem}")

    def __del__(self):
        try:
            loop = asyncio.get_event_loop()
            if loop.is_running():
                loop.create_task(self.host.engine.shutdown())
        except Exception:  # noqa: BLE001 - teardown is best effort
            pass
        self.host.shutdown()


def replica_api_key(cfg: ServeConfig) -> str | None:
    """The key this replica enforces. ``api_key_env`` naming an unset or empty variable is an error:
    a replica that silently served without auth would be an open door."""
    if cfg.api_key is not None:
        logger.warning(
            "diffmoe: api_key is set in the deployment args, so the Serve config shows it; prefer api_key_env"
        )
        return cfg.api_key
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise RuntimeError(
                f"api_key_env={cfg.api_key_env!r}: that environment variable is unset or empty on this "
                "replica; refusing to start without the API key (set it, e.g. runtime_env.env_vars)"
            )
        return key
    return None


def deployment_options(cfg: ServeConfig) -> dict:
    """Serve deployment options derived from the config (resources, scaling, admission)."""
    gpu = cfg.replica_gpus
    opts: dict = {
        "name": "diffmoe",
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "health_check_period_s": 5,
        "health_check_timeout_s": max(30.0, cfg.step_timeout_s + 10),
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
    }
    if cfg.ep_size == 1:
        opts["ray_actor_options"] = {"num_cpus": cfg.replica_cpus, "num_gpus": gpu}
    else:
        # Bundle 0: the replica + rank 0 (sharing one GPU: cfg.head_gpus); bundle i: rank i.
        first = {"CPU": cfg.replica_cpus + cfg.worker_cpus}
        rest = {"CPU": cfg.worker_cpus}
        if gpu:
            first["GPU"] = rest["GPU"] = gpu
        opts["ray_actor_options"] = {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.head_gpus}
        opts["placement_group_bundles"] = [first] + [dict(rest) for _ in range(cfg.ep_size - 1)]
        opts["placement_group_strategy"] = cfg.ep_placement
    if cfg.num_replicas is not None:
        opts["num_replicas"] = cfg.num_replicas
    else:
        opts["autoscaling_config"] = cfg.autoscaling_config.model_dump(exclude_none=True)
    return opts


def build_app(args: dict) -> Application:
    """Serve application builder (``import_path: diffmoe.serve.app:build_app``): Serve passes the
    YAML's ``args`` as its one parameter; ``args.model_loader`` names a custom loader."""
    return make_app(args)


def make_app(args: dict, model_loader: ModelLoader | str | None = None) -> Application:
    """The application for ``args``, with an optional loader (a callable or "module:function") that
    overrides ``args.model_loader``: how tests and embedding code inject a model. A registry alias
    (``models:/name@alias``) is pinned to its current version here, at build time."""
    cfg = build(ServeConfig, dict(args or {}), source="serve args")
    pinned = {
        key: pin_version(getattr(cfg, key), cfg.mlflow_tracking_uri)
        for key in ("model", "tokenizer")
        if getattr(cfg, key)
    }
    cfg = cfg.model_copy(update=pinned)
    dep = serve.deployment(DiffMoEServer).options(**deployment_options(cfg))
    return dep.bind(cfg.model_dump(mode="json"), model_loader or cfg.model_loader)


def run_app(
    args: dict | ServeConfig, name: str = "diffmoe", model_loader=None, blocking: bool = False
) -> str:
    """Start Serve on ``http_host:http_port`` (loopback by default), deploy, return the base URL."""
    cfg = args if isinstance(args, ServeConfig) else build(ServeConfig, dict(args), source="serve args")
    serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
    serve.run(
        make_app(cfg.model_dump(mode="json"), model_loader),
        name=name,
        route_prefix=cfg.route_prefix,
        blocking=blocking,
    )
    return f"http://{cfg.http_host}:{cfg.http_port}{cfg.route_prefix.rstrip('/')}"
