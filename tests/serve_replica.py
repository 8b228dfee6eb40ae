"""An in-process replica for the serving tests: the real FastAPI app (``build_api``) of a real tiny
model, driven over httpx's ASGI transport on one long-lived event loop, as a replica's is. The
conftest fixtures ``replica_loop`` and ``replica`` share one per test session."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import torch

from diffmoe.serve.api import build_api
from diffmoe.serve.config import ServeConfig
from diffmoe.serve.host import ModelHost
from diffmoe.serve.metrics import EngineMetrics

KEY = "robust-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}


class Poisonable(torch.nn.Module):
    """The tiny model, but a forward whose input holds ``poison`` raises (a bad row); ``broken``
    makes every forward raise (an engine-wide fault such as a dead worker)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config
        self.poison: int | None = None
        self.broken = False
        self.delay = 0.0  # seconds per forward: a slow step

    def forward(self, input_ids, *args, **kwargs):
        time.sleep(self.delay)
        if self.broken or (self.poison is not None and bool((input_ids == self.poison).any())):
            raise RuntimeError("poisoned row")
        return self.inner(input_ids, *args, **kwargs)


def event_loop_thread():
    """One event loop in a thread, like a replica's: ``(run(coro) -> result, stop())``."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def stop():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return (lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=120)), stop


def make_replica(tiny_model_dir):
    """``(ModelHost, EngineMetrics, app)`` of one replica with small limits and a Poisonable model."""
    from diffmoe.model.source import load_model

    args = {
        "model": str(tiny_model_dir),
        "max_tokens_limit": 4,  # small limits keep each valid request to a few tiny forwards
        "max_steps_limit": 4,
        "max_body_bytes": 4096,
        "max_batch_size": 2,
        "max_pending_requests": 2,
        "log_requests": False,
        "stream_interval_s": 0.0,
        "decoding": {"gen_length": 4, "block_length": 4, "threshold": 0.9, "cache": "prefix"},
    }
    host = ModelHost(ServeConfig.model_validate(args), lambda path: Poisonable(load_model(path)))
    metrics = EngineMetrics(host.cfg.served_name)
    return host, metrics, build_api(host, metrics, KEY)


def post(loop, app, path, content, headers=JSON, root_path=""):
    async def go():
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica", timeout=60) as c:
            if content is None:
                return await c.get(path, headers=headers)
            return await c.post(path, content=content, headers=headers)

    return loop(go())


def expect(host, req) -> str:
    """The request's answer offline, from an engine of its own on the replica's model: the replica's
    engine is stepped by its serving loop (on the loop's thread), which would race a run() here."""
    from diffmoe.generation import Engine

    ids, dec = host.request_settings(req)
    live = host.engine
    offline = Engine(live.model, live.tokenizer, mask_id=live.mask_id, eos_id=live.end_ids, max_batch_size=1)
    return offline.run([ids], dec)[0].text


def assert_openai_error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err
    assert err["type"] in ("invalid_request_error", "authentication_error", "rate_limit_error"), err
    assert err["param"] is None or err["param"] in err["message"], err  # the field is named
    return err
