"""The OpenAI-compatible FastAPI app of one replica: routes, auth, error bodies, streaming.

Built per replica (``build_api``) so routes close over that replica's engine and settings. Every
client error is a 4xx with OpenAI's error body; FastAPI's 422 becomes a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as p
from .host import ModelHost
from .metrics import EngineMetrics

logger = logging.getLogger("ray.serve")

DESCRIPTION = """OpenAI-compatible API for LLaDA-MoE masked-diffusion models.

Diffusion extras (any request): `steps` (fixed-schedule steps; implies no threshold), `block_length`,
`gen_length` (answer canvas, default max_tokens rounded up to a block), `threshold` (confidence for
parallel decoding), `parallel` (false = fixed schedule), `remasking` (`low_confidence` | `random`),
`cache` (`none` | `prefix` | `dual`), `ignore_eos`. Defaults come from the server's `decoding` config.
"""


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    e = err.errors()[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return f"invalid JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    if e.get("type") == "extra_forbidden":
        return f"{where}: unrecognized request argument", param
    if e.get("type") == "missing":
        return f"{where}: required field is missing", param
    got = e.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    return f"{where}: {e.get('msg')}{shown}", param


def _error(err: p.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def build_api(host: ModelHost, metrics: EngineMetrics, api_key: str | None) -> FastAPI:
    cfg, engine, name = host.cfg, host.engine, host.cfg.served_name
    app = FastAPI(title="diffmoe", description=DESCRIPTION, version="1")
    created = int(time.time())
    state: dict = {"sampler": None, "stats": {}, "streams": 0}

    @app.exception_handler(p.ApiError)
    async def _api_error(_req, err: p.ApiError):
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, err: RequestValidationError):
        message, param = _validation_message(err)
        return _error(p.ApiError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(req, err: StarletteHTTPException):
        message = {404: f"no route {req.url.path}", 405: f"method {req.method} not allowed on {req.url.path}"}
        return _error(p.ApiError(err.status_code, message.get(err.status_code, str(err.detail))))

    @app.exception_handler(Exception)
    async def _crash(_req, err: Exception):
        logger.exception("diffmoe: internal error")
        return _error(p.ApiError(500, f"internal error: {type(err).__name__}"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), api_key.encode()
            ):
                reason = "missing Authorization header" if not header else "invalid API key"
                return _error(
                    p.ApiError(401, f"{reason}: send 'Authorization: Bearer <key>'", None, "invalid_api_key")
                )
        return await call_next(request)

    async def _sampler():
        while True:
            state["stats"] = metrics.sample(engine)
            await asyncio.sleep(1.0)

    def _ensure_sampler():
        if state["sampler"] is None or state["sampler"].done():
            state["sampler"] = asyncio.get_running_loop().create_task(_sampler())

    @app.get("/health")
    async def health() -> dict:
        _ensure_sampler()
        return {"status": "ok", "model": name, "engine": metrics.sample(engine), **host.info}

    @app.get("/v1/models")
    async def models() -> dict:
        return p.models_body(name, created)

    async def _run(req, chat: bool):
        _ensure_sampler()
        if req.model != name:
            raise p.ApiError(
                404, f"model {req.model!r} not found; this server serves {name!r}", "model", "model_not_found"
            )
        ids, dec = host.request_settings(req)
        rid = p.new_id("chatcmpl" if chat else "cmpl")
        endpoint = "chat" if chat else "completions"
        t0 = time.perf_counter()

        def done(status, out_tokens, ttft=None, reason=None):
            latency = time.perf_counter() - t0
            metrics.finished(endpoint, status, len(ids), out_tokens, latency, ttft)
            if cfg.log_requests:
                logger.info(
                    json.dumps(
                        {
                            "event": "request",
                            "id": rid,
                            "endpoint": endpoint,
                            "status": status,
                            "prompt_tokens": len(ids),
                            "completion_tokens": out_tokens,
                            "finish_reason": reason,
                            "latency_s": round(latency, 4),
                            "ttft_s": None if ttft is None else round(ttft, 4),
                            "stream": req.stream,
                        }
                    )
                )

        if not req.stream:
            try:
                out = await engine.generate(ids, dec, request_id=rid)
            except asyncio.CancelledError:
                done("cancelled", 0)
                raise
            done("ok", len(out.token_ids), reason=out.finish_reason)
            use = p.usage(len(ids), len(out.token_ids))
            body = p.chat_body if chat else p.completion_body
            return body(rid, name, out.text, out.finish_reason, use, int(time.time()))

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = engine.stream(ids, dec, request_id=rid)

        async def sse():
            ttft, tokens, first, status, reason = None, 0, True, "cancelled", None
            stamp, buffer, last = int(time.time()), "", 0.0
            state["streams"] += 1
            try:
                async for ev in events:
                    tokens += len(ev.token_ids)
                    buffer += ev.text
                    now = time.perf_counter()
                    # First text at once (time to first token); later deltas coalesced per interval so a
                    # long answer is not one proxy round trip per token.
                    # The replica-wide budget (stream_chunks_per_s) stretches the interval as streams grow.
                    interval = max(cfg.stream_interval_s, state["streams"] / cfg.stream_chunks_per_s)
                    due = first or now - last >= interval or ev.finished
                    if buffer and due or first and chat and ev.finished:
                        if ttft is None and buffer:
                            ttft = now - t0
                        yield _sse(p.chunk(chat, rid, name, stamp, buffer, None, first))
                        buffer, first, last = "", False, now
                    if ev.finished:
                        status, reason = "ok", ev.finish_reason
                        yield _sse(p.chunk(chat, rid, name, stamp, None, ev.finish_reason))
                        if include_usage:
                            yield _sse(p.usage_chunk(chat, rid, name, stamp, p.usage(len(ids), tokens)))
                        yield "data: [DONE]\n\n"
            except Exception as err:  # after headers: report in-band, OpenAI style
                status = "error"
                logger.exception("diffmoe: stream failed")
                yield _sse(p.ApiError(500, f"internal error: {type(err).__name__}").body())
                yield "data: [DONE]\n\n"
            finally:
                state["streams"] -= 1
                await events.aclose()  # client gone -> the engine cancels the request
                done(status, tokens, ttft, reason)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest):
        return await _run(req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: p.ChatCompletionRequest):
        return await _run(req, chat=True)

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
