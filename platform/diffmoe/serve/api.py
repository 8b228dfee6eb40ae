"""The OpenAI-compatible FastAPI app of one replica: routes, auth, error bodies, streaming.

Built per replica (``build_api``) so routes close over that replica's engine and settings. Every
client error is a 4xx with OpenAI's error body; FastAPI's 422 becomes a 400 naming the field. The
``Guard`` middleware answers auth, content type, body size and unparseable JSON before any route.
Admission is bounded (429 beyond ``max_batch_size + max_pending_requests``), tokenization runs in a
thread, and every request has a deadline and is cancelled when its client goes away.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as p
from .guard import Guard, route_path
from .host import ModelHost
from .metrics import EngineMetrics

logger = logging.getLogger("ray.serve")

DESCRIPTION = """OpenAI-compatible API for LLaDA-MoE masked-diffusion models.

Diffusion extras (any request): `steps` (fixed-schedule steps; implies no threshold), `block_length`,
`gen_length` (answer canvas, default max_tokens rounded up to a block), `threshold` (confidence for
parallel decoding), `parallel` (false = fixed schedule), `remasking` (`low_confidence` | `random`),
`cache` (`none` | `prefix` | `dual`), `ignore_eos`. Defaults come from the server's `decoding` config.
"""


_TAGS = {"str", "int", "float", "bool", "list", "dict"}  # union members' tags; others contain "["


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    e = err.errors()[0]
    # Union members appear in the location as type tags ("str", "list[int]"): drop them.
    loc = [str(x) for x in e.get("loc", ()) if x != "body" and str(x) not in _TAGS and "[" not in str(x)]
    if e.get("type") == "json_invalid":
        return f"invalid JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    if e.get("type") == "missing":
        return f"{where}: required field is missing", param
    got = e.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {_short(got)})"
    return f"{where}: {e.get('msg')}{shown}", param


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _error(err: p.ApiError) -> Response:
    """ASCII JSON (a lone surrogate in a message would break Starlette's UTF-8 JSONResponse)."""
    body = json.dumps(err.body())
    return Response(body, status_code=err.status, headers=err.headers(), media_type="application/json")


# Documented in the OpenAPI spec for the two generation routes: what the server really answers.
ERRORS = {
    400: "invalid request (the field is named in `param`)",
    401: "missing or wrong API key",
    404: "`model` is not the served model",
    413: "body larger than `max_body_bytes`",
    415: "Content-Type is not application/json",
    429: "replica at capacity (`max_pending_requests`); retry after `Retry-After` seconds",
    500: "a request failed inside the engine (other requests are unaffected)",
    503: "replica unhealthy, or Serve's queue (`max_queued_requests`) full; retry elsewhere",
    504: "non-streaming request ran past `request_timeout_s`",
}
RESPONSES = {code: {"model": p.ErrorBody, "description": text} for code, text in ERRORS.items()}


def build_api(host: ModelHost, metrics: EngineMetrics, api_key: str | None) -> FastAPI:
    cfg, engine, name = host.cfg, host.engine, host.cfg.served_name
    app = FastAPI(title="diffmoe", description=DESCRIPTION, version="1")
    created = int(time.time())
    state: dict = {"sampler": None, "stats": {}, "streams": 0, "inflight": 0, "warned": set()}

    def on_error(endpoint: str, status: int, latency: float) -> None:
        kind = metrics.rejected(endpoint, status)
        if cfg.log_requests and endpoint != "other":
            logger.info(
                json.dumps(
                    {
                        "event": "request",
                        "endpoint": endpoint,
                        "status": kind,
                        "http_status": status,
                        "latency_s": round(latency, 4),
                    }
                )
            )

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=cfg.max_body_bytes, on_error=on_error)

    @app.exception_handler(p.ApiError)
    async def _api_error(_req, err: p.ApiError):
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, err: RequestValidationError):
        message, param = _validation_message(err)
        return _error(p.ApiError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(req, err: StarletteHTTPException):
        path = route_path(req.scope)
        message = {404: f"no route {path}", 405: f"method {req.method} not allowed on {path}"}
        return _error(p.ApiError(err.status_code, message.get(err.status_code, str(err.detail))))

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            for schema in ("CompletionRequest", "ChatCompletionRequest"):  # only the served name is valid
                spec["components"]["schemas"][schema]["properties"]["model"]["enum"] = [name]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi

    async def _sampler():
        while True:
            state["stats"] = metrics.sample(engine)
            await asyncio.sleep(1.0)

    def _ensure_sampler():
        if state["sampler"] is None or state["sampler"].done():
            state["sampler"] = asyncio.get_running_loop().create_task(_sampler())

    @app.get("/health", responses={503: {"description": "the replica cannot serve; `reason` says why"}})
    async def health():
        _ensure_sampler()
        problem = await host.problem()
        body = {"status": "unhealthy" if problem else "ok", "model": name, "engine": metrics.sample(engine)}
        if problem:
            body["reason"] = problem
        return JSONResponse({**body, **host.info}, status_code=503 if problem else 200)

    @app.get("/v1/models", responses={401: RESPONSES[401]})
    async def models() -> dict:
        return p.models_body(name, created)

    @app.get("/v1/models/{model_id:path}", responses={401: RESPONSES[401], 404: RESPONSES[404]})
    async def model(model_id: str) -> dict:
        """The served model (the openai client's ``models.retrieve``); 404 for any other name."""
        if model_id != name:
            raise p.ApiError(
                404, f"model {model_id!r} not found; this server serves {name!r}", "model", "model_not_found"
            )
        return p.models_body(name, created)["data"][0]

    def _admit(req, request: Request) -> None:
        """Cheap checks first, so overload and bad models are answered before any tokenization."""
        if req.model != name:
            raise p.ApiError(
                404, f"model {req.model!r} not found; this server serves {name!r}", "model", "model_not_found"
            )
        unknown = p.unknown_fields(req)
        if unknown and cfg.reject_unknown_fields:
            raise p.ApiError(400, f"{unknown[0]}: unrecognized request argument", unknown[0].split(".")[0])
        new = [u for u in unknown if u not in state["warned"]]
        if new and len(state["warned"]) < 1000:
            state["warned"].update(new)
            logger.warning("diffmoe: ignoring unknown request fields %s", ", ".join(ascii(u) for u in new))
        if engine.failure is not None:
            raise p.ApiError(503, "replica unhealthy; retry", None, "unhealthy", cfg.retry_after_s)
        rows = req.n or 1  # each of the n answers is an engine row
        if rows > cfg.max_batch_size:
            raise p.ApiError(400, f"n={rows} exceeds this server's max_batch_size={cfg.max_batch_size}", "n")
        load = state["inflight"]
        if load + rows > cfg.max_batch_size + cfg.max_pending_requests:
            raise p.ApiError(
                429, f"replica at capacity ({load} requests); retry", None, "overloaded", cfg.retry_after_s
            )
        state["inflight"] += rows  # until the Guard sees the request end, however it ends
        request.scope["diffmoe.slot"]["release"] = lambda: state.__setitem__(
            "inflight", state["inflight"] - rows
        )

    async def _settings(req):
        # Tokenization off the event loop: a huge prompt never stalls other streams.
        return await asyncio.to_thread(host.request_settings, req)

    def _failed(err: Exception) -> p.ApiError:
        if engine.failure is not None:
            return p.ApiError(503, "replica unhealthy; retry", None, "unhealthy", cfg.retry_after_s)
        return p.ApiError(
            500, f"the engine failed on this request: {type(err).__name__}", None, "engine_error"
        )

    async def _run(req, chat: bool, request: Request):
        _ensure_sampler()
        _admit(req, request)
        ids, dec = await _settings(req)
        deadline = time.monotonic() + cfg.request_timeout_s
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
            # n answers: n rows, choice i seeded seed + i when a seed is given (reproducible, distinct)
            runs = [
                asyncio.ensure_future(
                    engine.generate(ids, _nth_seed(dec, i), request_id=rid if i == 0 else f"{rid}-{i}")
                )
                for i in range(req.n or 1)
            ]
            task = asyncio.ensure_future(asyncio.gather(*runs))
            try:
                while not task.done():  # wake every second to notice a client that has gone
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise p.ApiError(
                            504,
                            f"request ran past request_timeout_s={cfg.request_timeout_s}",
                            None,
                            "timeout",
                        )
                    await asyncio.wait({task}, timeout=min(left, 1.0))
                    if not task.done() and await request.is_disconnected():
                        raise asyncio.CancelledError
                outs = task.result()
            except asyncio.CancelledError:
                done("cancelled", 0)
                raise
            except p.ApiError:
                raise
            except Exception as err:  # this request failed in the engine; the batch goes on
                logger.exception("diffmoe: request %s failed in the engine", rid)
                raise _failed(err) from None
            finally:
                for run in runs:  # no-op when finished; otherwise the engine drops the row
                    run.cancel()
            out_tokens = sum(len(o.token_ids) for o in outs)
            done("ok", out_tokens, reason=outs[0].finish_reason)
            use = p.usage(len(ids), out_tokens)
            body = p.chat_body if chat else p.completion_body
            return body(rid, name, [(o.text, o.finish_reason) for o in outs], use, int(time.time()))

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        n = req.n or 1
        streams = [
            engine.stream(ids, _nth_seed(dec, i), request_id=rid if i == 0 else f"{rid}-{i}")
            for i in range(n)
        ]

        async def sse():
            ttft, tokens, status, reason = None, 0, "cancelled", None
            stamp = int(time.time())
            chunk = functools.partial(p.chunk, chat, rid, name, stamp, usage_key=include_usage)
            first, buffer, last = [True] * n, [""] * n, [0.0] * n
            unfinished = n
            state["streams"] += 1
            events = merge_streams(streams)
            try:
                while unfinished:
                    left = deadline - time.monotonic()
                    try:
                        i, ev = await asyncio.wait_for(anext(events), max(left, 0.001))
                    except StopAsyncIteration:
                        break
                    except asyncio.TimeoutError:
                        status = "timeout"
                        err = p.ApiError(
                            504,
                            f"request ran past request_timeout_s={cfg.request_timeout_s}",
                            None,
                            "timeout",
                        )
                        yield _sse(err.body())
                        yield "data: [DONE]\n\n"
                        return
                    tokens += len(ev.token_ids)
                    buffer[i] += ev.text
                    now = time.perf_counter()
                    # First text at once (time to first token); later deltas coalesced per interval so a
                    # long answer is not one proxy round trip per token.
                    # The replica-wide budget (stream_chunks_per_s) stretches the interval as streams grow.
                    interval = max(cfg.stream_interval_s, state["streams"] / cfg.stream_chunks_per_s)
                    due = first[i] or now - last[i] >= interval or ev.finished
                    if buffer[i] and due or first[i] and chat and ev.finished:
                        if ttft is None and buffer[i]:
                            ttft = now - t0
                        yield _sse(chunk(buffer[i], None, first[i], i))
                        buffer[i], first[i], last[i] = "", False, now
                    if ev.finished:
                        unfinished -= 1
                        reason = reason or ev.finish_reason
                        yield _sse(chunk(None, ev.finish_reason, index=i))
                if not unfinished:
                    status = "ok"
                    if include_usage:
                        yield _sse(p.usage_chunk(chat, rid, name, stamp, p.usage(len(ids), tokens)))
                    yield "data: [DONE]\n\n"
            except Exception as err:  # after headers: report in-band, OpenAI style
                status = "error"
                logger.exception("diffmoe: stream %s failed", rid)
                yield _sse(_failed(err).body())
                yield "data: [DONE]\n\n"
            finally:
                state["streams"] -= 1
                await events.aclose()  # client gone -> the engine cancels the requests
                done(status, tokens, ttft, reason)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", responses=RESPONSES)
    async def completions(req: p.CompletionRequest, request: Request):
        return await _run(req, False, request)

    @app.post("/v1/chat/completions", responses=RESPONSES)
    async def chat_completions(req: p.ChatCompletionRequest, request: Request):
        return await _run(req, True, request)

    return app


async def merge_streams(streams: list) -> AsyncIterator[tuple[int, object]]:
    """(i, event) from n engine streams as they come. One stream: no tasks, just its events.
    Closing the merged stream closes (so cancels) every engine stream."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for event in stream:
                queue.put_nowait((i, event))
        except Exception as err:  # noqa: BLE001 - re-raised in the consumer
            queue.put_nowait((i, err))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    live = len(streams)
    try:
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


def _nth_seed(dec, i: int):
    """Decoding settings of the i-th of n answers: seed + i when seeded (unseeded rows differ anyway)."""
    if i == 0 or dec.seed is None:
        return dec
    return dec.model_copy(update={"seed": (dec.seed + i) % 2**64})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
