"""Request and response bodies in OpenAI's shapes, the diffusion extras, and OpenAI-style errors.

Wrong JSON types (``"5"`` for an integer) and out-of-range values are client errors (400) with a
message naming the field. Unknown fields are kept aside (``unknown_fields``): the server ignores them
with a warning, as vLLM does, or rejects them (``reject_unknown_fields``). OpenAI parameters this
server does not implement are accepted by name only so that the 400 can say which one is unsupported.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI parameters accepted by name only; a value other than the neutral one is rejected.
UNSUPPORTED_NEUTRAL: dict[str, Any] = {
    "best_of": 1,
    "echo": False,
    "suffix": None,
    "logprobs": None,
    "top_logprobs": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "response_format": None,
    "parallel_tool_calls": None,
}
# Further values that ask for nothing, sent by clients that send every default (vLLM accepts them).
ALSO_NEUTRAL: dict[str, tuple] = {
    "top_logprobs": (0,),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),
}


class ApiError(Exception):
    """An error answered with OpenAI's body: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after  # seconds, sent as Retry-After (429 / 503)

    def headers(self) -> dict[str, str]:
        """Retry-After where set; ``x-should-retry: false`` on a 504, so that the openai client does
        not resend (twice, by default) a request that already ran its whole deadline."""
        out = {} if self.retry_after is None else {"retry-after": str(self.retry_after)}
        if self.status == 504:
            out["x-should-retry"] = "false"
        return out

    @property
    def type(self) -> str:
        return {401: "authentication_error", 429: "rate_limit_error", 504: "timeout"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error answer (OpenAPI documentation of the error responses)."""

    error: ErrorDetail


class _Strict(BaseModel):
    # Unknown fields are collected, not refused, here: the server decides (``unknown_fields``).
    model_config = ConfigDict(extra="allow", strict=True, protected_namespaces=())


class StreamOptions(_Strict):
    include_usage: bool | None = False  # null reads as false (the openai client's types allow it)


class DiffusionParams(_Strict):
    """Diffusion settings every request may set (documented extras; defaults from the server config)."""

    steps: int | None = Field(None, ge=1, description="denoising steps of the fixed schedule (no threshold)")
    block_length: int | None = Field(None, ge=1, description="tokens decoded per semi-autoregressive block")
    gen_length: int | None = Field(
        None, ge=1, description="answer canvas length; default: max_tokens rounded up to a whole block"
    )
    threshold: float | None = Field(
        None, gt=0, le=1, description="confidence threshold for parallel decoding; 0 < t <= 1"
    )
    parallel: bool | None = Field(None, description="false: fixed schedule (ignore the default threshold)")
    remasking: Literal["low_confidence", "random"] | None = None
    cache: Literal["none", "prefix", "dual"] | None = Field(None, description="KV cache mode")
    editing_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="block-diffusion (LLaDA2.1) token editing: rewrite a decoded token above this",
    )
    max_post_steps: int | None = Field(
        None, ge=0, le=64, description="block diffusion: editing steps after a block's last mask"
    )
    top_k: int | None = Field(
        None, ge=-1, description="sampling: keep the k most likely tokens; 0 or -1: no top-k (as vLLM)"
    )
    ignore_eos: bool = False


class _Common(DiffusionParams):
    model: str
    max_tokens: int | None = Field(None, description="maximum answer tokens (1..server limit)")
    temperature: float | None = Field(None, ge=0, le=2)
    stream: bool | None = False  # null reads as false
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="any 64-bit integer")
    user: str | None = None
    n: int | None = Field(None, ge=1, description="answers to sample for this prompt (each an engine row)")
    logprobs: Any = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_p: float | None = Field(None, gt=0, le=1)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


def unknown_fields(obj: Any, where: str = "") -> list[str]:
    """Dotted paths of every field no model declares, in a parsed request (nested ones included)."""
    out: list[str] = []
    if isinstance(obj, BaseModel):
        out += [f"{where}{k}" for k in obj.model_extra or {}]
        for name in type(obj).model_fields:
            out += unknown_fields(getattr(obj, name), f"{where}{name}.")
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            if isinstance(item, BaseModel):
                out += unknown_fields(item, f"{where}{i}.")
    return out


def unsupported_param(req: BaseModel) -> str | None:
    """Name of the first unsupported OpenAI parameter set to a non-neutral value, if any."""
    for name, neutral in UNSUPPORTED_NEUTRAL.items():
        if name not in type(req).model_fields:
            continue
        value = getattr(req, name)
        if value is None or value == neutral or value in ({}, []):
            continue
        if name == "logprobs" and value is False:
            continue
        if name == "response_format" and value == {"type": "text"}:
            continue
        if any(type(value) is type(v) and value == v for v in ALSO_NEUTRAL.get(name, ())):
            continue
        return name
    return None


# ---- responses --------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(rid: str, model: str, answers: list[tuple[str, str]], usage_: dict, created: int) -> dict:
    """``answers``: (text, finish_reason) per choice, in index order."""
    choices = [
        {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
        for i, (text, finish) in enumerate(answers)
    ]
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chat_body(rid: str, model: str, answers: list[tuple[str, str]], usage_: dict, created: int) -> dict:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
        for i, (text, finish) in enumerate(answers)
    ]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chunk(
    chat: bool,
    rid: str,
    model: str,
    created: int,
    text: str | None,
    finish: str | None,
    first=False,
    index: int = 0,
    usage_key: bool = False,
):
    """One streamed chunk of choice ``index`` in OpenAI's format (``text_completion`` or
    ``chat.completion.chunk``); ``usage_key``: carries ``"usage": null``, as every chunk but the
    last does when the request asked for usage."""
    if chat:
        delta: dict = {"role": "assistant", "content": text or ""} if first else {}
        if text and not first:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    return {**out, "usage": None} if usage_key else out


def usage_chunk(chat: bool, rid: str, model: str, created: int, usage_: dict) -> dict:
    obj = "chat.completion.chunk" if chat else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}


def models_body(name: str, created: int | None = None) -> dict:
    created = created or int(time.time())
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": "diffmoe"}],
    }
