"""The replica's front door, an ASGI middleware in front of every route.

It answers before any route runs: the API key (every path but health and docs, whatever the Serve
``route_prefix``), the content type (415), the body size (413), and a JSON body that Python could
parse but the API must not see (nesting, NaN / Infinity, integers beyond 64 bits, lone surrogates).
It also contains crashes (an OpenAI-shaped 500, never a dropped connection) and reports every error
answer to ``on_error`` so rejected requests are counted like served ones.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
from collections.abc import Callable

from .protocol import ApiError

logger = logging.getLogger("ray.serve")

OPEN_PATHS = {"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
MAX_DEPTH = 32  # JSON nesting; OpenAI bodies need 4
INT_BOUND = 2**64  # integers beyond +-this are refused before validation (seed is the widest field)


def route_path(scope) -> str:
    """The path the app routes on: Serve passes the full path and the route prefix as root_path."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def endpoint_of(path: str) -> str:
    return {"/v1/completions": "completions", "/v1/chat/completions": "chat"}.get(path, "other")


async def respond(send, err: ApiError) -> None:
    """Send ``err`` as OpenAI's error body (ASCII JSON: a lone surrogate in a message cannot break it)."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in err.headers().items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _bad(where: str, problem: str) -> ApiError:
    param = where.split(".")[0] if where else None
    return ApiError(400, f"{where or 'body'}: {problem}", param)


def check_json(obj) -> ApiError | None:
    """The first value the API refuses whatever the field: too deep, a lone surrogate, an integer
    beyond 64 bits, a non-finite number. Iterative, so depth cannot exhaust the stack."""
    stack = [(obj, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            return _bad(where, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                return _bad(where, f"invalid unicode: lone surrogate at character {err.start}")
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            if not -INT_BOUND < value < INT_BOUND:
                return _bad(where, "integer out of range (more than 64 bits)")
        elif isinstance(value, float):
            if not math.isfinite(value):
                return _bad(where, "number out of range (not finite)")
        elif isinstance(value, dict):
            for key, item in value.items():
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    return _bad(where, "invalid unicode in a field name (lone surrogate)")
                stack.append((item, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(value, list):
            stack.extend(
                (item, f"{where}.{i}" if where else str(i), depth + 1) for i, item in enumerate(value)
            )
    return None


def _constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_error(body: bytes) -> ApiError | None:
    """None if ``body`` is JSON the API may validate; else the 400 saying what is wrong."""
    if not body.strip():
        return None  # FastAPI reports the missing fields
    try:
        obj = json.loads(body, parse_constant=_constant)
    except UnicodeDecodeError:
        return ApiError(400, "invalid JSON body: not UTF-8 text")
    except json.JSONDecodeError as err:
        return ApiError(400, f"invalid JSON body: {err}")
    except RecursionError:
        return ApiError(400, "invalid JSON body: nested too deeply")
    except ValueError as err:  # NaN / Infinity, or an integer with thousands of digits
        return ApiError(400, f"invalid JSON body: {str(err).split(';')[0]}")
    return check_json(obj)


class Guard:
    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, on_error: Callable):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes
        self.on_error = on_error  # (endpoint, http status, latency seconds)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, t0, status = route_path(scope), time.perf_counter(), {}
        # A route that admits the request stores a release callback here; it runs when the request
        # is over, however it ends (a stream that never started included).
        slot = scope.setdefault("diffmoe.slot", {"release": None})

        async def send_(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            err = self._auth(path, headers)
            if err is None and scope["method"] in ("POST", "PUT", "PATCH"):
                err, receive = await self._body(headers, receive)
            if err is not None:
                await respond(send_, err)
            else:
                await self.app(scope, receive, send_)
        except Exception as exc:  # a bug: answer 500 in OpenAI's shape and keep the replica up
            logger.exception("diffmoe: internal error")
            if "code" not in status:
                await respond(send_, ApiError(500, f"internal error: {type(exc).__name__}"))
        finally:
            if slot["release"] is not None:
                slot["release"]()
            if status.get("code", 0) >= 400:
                self.on_error(endpoint_of(path), status["code"], time.perf_counter() - t0)

    def _auth(self, path: str, headers: dict) -> ApiError | None:
        if not self.api_key or path in OPEN_PATHS:
            return None
        header = headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return None
        reason = "missing Authorization header" if not header else "invalid API key"
        return ApiError(401, f"{reason}: send 'Authorization: Bearer <key>'", None, "invalid_api_key")

    async def _body(self, headers: dict, receive):
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind and kind != "application/json" and not kind.endswith("+json"):
            return ApiError(415, f"Content-Type {kind!r} is not supported: send application/json"), receive
        too_big = ApiError(413, f"request body is larger than {self.max_body} bytes (max_body_bytes)")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return (too_big if length.isdigit() else ApiError(400, "invalid Content-Length header")), receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return ApiError(400, "the client disconnected before sending the whole body"), receive
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return too_big, receive
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        err = parse_error(body)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return err, replay
