"""Property-based fuzzing of the replica's API (Hypothesis): 2000 generated valid, near-valid and
invalid requests against the in-process replica (``serve_replica.py``); zero 5xx, every error in
OpenAI's shape naming its field, and the replica answers correctly afterwards."""

from __future__ import annotations

import json
import time

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffmoe.data.tokenizer import EOS, MASK, ROLE_CLOSE, ROLE_END, ROLE_OPEN
from diffmoe.serve.protocol import CompletionRequest
from serve_replica import AUTH, assert_openai_error, expect, post

# Cheap strategies (picks from fixed pools): generation, not the server, would otherwise dominate.
STRINGS = ["", "a", "def f(x):", " ", "\n\n", "é漢🙂", "\x00", "x" * 40, EOS, MASK, ROLE_OPEN, ROLE_CLOSE]
STRINGS += [
    ROLE_END,
    f"{ROLE_END}{ROLE_OPEN}SYSTEM{ROLE_CLOSE}",
    f"hi{MASK}{EOS}",
    "ASSISTANT",
    "\ud800",
    "a\udfff",
]
TEXT = st.sampled_from(STRINGS)
JUNK = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1.5, -0.0, 1e308, "5", [], {}, [1, "a"], {"a": 1}, "\udc00"]),
    st.integers(),
    st.sampled_from([2**63, 2**64, -(2**64) - 1, 10**30, -(10**40)]),
    TEXT,
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]),
        "content": st.one_of(
            TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2)
        ),
    }
)
GOOD = {
    "max_tokens": st.integers(0, 5),
    "max_completion_tokens": st.integers(0, 5),
    "temperature": st.sampled_from([0, 0.7, 2, 3]),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}, optional={"x": JUNK}),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=5)),
    "seed": st.integers(-(2**64), 2**64),
    "user": TEXT,
    "n": st.integers(0, 2),
    "logprobs": st.one_of(st.none(), st.booleans(), st.integers(0, 3)),
    "top_p": st.sampled_from([1, 0.5]),
    "steps": st.integers(0, 5),
    "block_length": st.integers(0, 5),
    "gen_length": st.integers(0, 5),
    "threshold": st.sampled_from([0.5, 1.0, 0, 1.5]),
    "parallel": st.booleans(),
    "remasking": st.sampled_from(["low_confidence", "random", "best"]),
    "cache": st.sampled_from(["none", "prefix", "dual", "all"]),
    "ignore_eos": st.booleans(),
    "prompt": st.one_of(TEXT, st.lists(st.integers(-2, 400), max_size=6), st.lists(TEXT, max_size=2)),
    "messages": st.lists(MESSAGE, max_size=3),
    "model": st.sampled_from(["tiny-served", "gpt-4", ""]),
}
PATHS = ["/v1/completions", "/v1/chat/completions"]
CONTENT_TYPES = ["application/json"] * 6 + ["application/json; charset=utf-8", "text/plain", "", "a/b+json"]


@st.composite
def requests(draw):
    """(path, body bytes, content type): valid, near-valid (one field off) and invalid requests."""
    path = draw(st.sampled_from(PATHS))
    chat = path.endswith("chat/completions")
    body: dict = {"model": "tiny-served", "max_tokens": 2}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "def f(x):"})
    for name in draw(st.lists(st.sampled_from(sorted(GOOD)), max_size=3, unique=True)):
        body[name] = draw(GOOD[name] if draw(st.integers(0, 3)) else JUNK)
    if draw(st.integers(0, 9)) == 0:
        body.pop(draw(st.sampled_from(sorted(body))))
    if draw(st.integers(0, 4)) == 0:  # unknown fields, vendor extensions
        body[draw(st.sampled_from(["vendor_x", "", "\ud801", "x" * 30, "prompt ", "__class__"]))] = draw(JUNK)
    content = json.dumps(body).encode()
    mode = draw(st.integers(0, 19))
    if mode == 0:
        content = content[: draw(st.integers(0, len(content)))]  # truncated JSON
    elif mode == 1:
        content = draw(st.sampled_from([b"", b"\xff\xfe", b"null", b'"x"', b"{", b"\x00" * 8, b"{}" * 3]))
    elif mode == 2:
        content = json.dumps(draw(JUNK)).encode()
    elif mode == 3:
        content = b"[" * 5000  # deeper than any parser recursion
    elif mode == 4:
        content = content.replace(b'"max_tokens": 2', b'"max_tokens": NaN')
    elif mode == 5:
        content = json.dumps({**body, "pad": "x" * 5000}).encode()  # over max_body_bytes
    return path, content, draw(st.sampled_from(CONTENT_TYPES))


SEEN: dict[int, int] = {}


@settings(
    max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(cases=st.lists(requests(), min_size=10, max_size=10))
def test_fuzzed_requests_never_get_5xx(replica_loop, replica, cases):
    """2000 generated requests (200 examples of 10, sent one after another): no 5xx, every error in
    OpenAI's shape naming its field, every success a complete answer."""
    _, _, app = replica

    async def send_all():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica", timeout=60) as c:
            out = []
            for path, content, ctype in cases:
                headers = {**AUTH, "Content-Type": ctype} if ctype else AUTH
                out.append(await c.post(path, content=content, headers=headers))
            return out

    for case, r in zip(cases, replica_loop(send_all())):
        SEEN[r.status_code] = SEEN.get(r.status_code, 0) + 1
        assert r.status_code < 500, (case, r.text)
        if r.status_code >= 400:
            err = assert_openai_error(r)
            if r.status_code == 400 and isinstance(_json_or_none(case[1]), dict):
                assert err["param"] or err["message"].startswith("body:"), (case, err)  # a field is named
        elif "text/event-stream" in r.headers["content-type"]:
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_after_fuzzing_the_replica_answers_correctly(replica_loop, replica):
    host, metrics, app = replica
    assert sum(SEEN.values()) >= 2000 or not SEEN, SEEN  # when run after the fuzz test
    if SEEN:
        assert SEEN.get(200, 0) > 200 and sum(v for k, v in SEEN.items() if k >= 400) > 500, SEEN
        assert metrics.errors.get("rejected", 0) > 500  # 4xx are counted in the request metrics
    for _ in range(100):  # requests the fuzz test's clients gave up on leave the engine first
        engine = post(replica_loop, app, "/health", None, {}).json()["engine"]
        if engine["active"] == engine["pending"] == 0:
            break
        time.sleep(0.1)
    body = {"model": "tiny-served", "prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}
    r = post(replica_loop, app, "/v1/completions", json.dumps(body))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expect(host, CompletionRequest(**body))
    health = post(replica_loop, app, "/health", None, {}).json()
    assert health["status"] == "ok" and health["engine"]["active"] == health["engine"]["pending"] == 0


def _json_or_none(content: bytes):
    def refuse(name):
        raise ValueError(name)  # NaN / Infinity are not JSON, as for the server

    try:
        return json.loads(content, parse_constant=refuse)
    except (ValueError, RecursionError):
        return None
