"""Ray Serve app on a real local Ray cluster: OpenAI client happy paths, concurrency with exact
answers, the bad-request table, auth, streaming disconnects, and the deployment YAML."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import pytest
import yaml

from diffmoe.serve.config import ServeConfig
from diffmoe.serve.host import ModelHost
from diffmoe.serve.protocol import ChatCompletionRequest, CompletionRequest

KEY = "test-key-123"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model_dir):
    from ray import serve

    from diffmoe.serve.app import run_app

    args = {
        "model": str(tiny_model_dir),
        "http_port": free_port(),
        "api_key": KEY,
        "replica_cpus": 1,
        "max_tokens_limit": 128,
        "log_requests": True,
        "stream_interval_s": 0.0,  # one chunk per engine step: streaming is observable on a tiny model
    }
    url = run_app(args, name="diffmoe-test")
    yield url, ServeConfig.model_validate(args)
    serve.shutdown()


@pytest.fixture(scope="module")
def offline(server, tiny_model_dir):
    """The same model and settings in this process: the answers the server must give."""
    _, cfg = server
    return ModelHost(cfg)


def expect(host: ModelHost, req) -> str:
    ids, dec = host.request_settings(req)
    return host.engine.run([ids], dec)[0].text


def client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_completes_chats_and_streams(server, offline):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny-served"]

    out = c.completions.create(model="tiny-served", prompt="def add(a, b):", max_tokens=12, temperature=0)
    want = expect(
        offline, CompletionRequest(model="tiny-served", prompt="def add(a, b):", max_tokens=12, temperature=0)
    )
    assert out.choices[0].text == want and want
    assert (
        out.usage.prompt_tokens > 0
        and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    )
    assert 0 < out.usage.completion_tokens <= 12

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a list?"}]
    chat = c.chat.completions.create(model="tiny-served", messages=msgs, max_tokens=20, temperature=0)
    want = expect(
        offline, ChatCompletionRequest(model="tiny-served", messages=msgs, max_tokens=20, temperature=0)
    )
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")

    # Streaming: the deltas add up to the non-streamed answer; usage arrives in the last chunk.
    chunks = list(
        c.chat.completions.create(
            model="tiny-served",
            messages=msgs,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == chat.choices[0].finish_reason

    parts = list(
        c.completions.create(
            model="tiny-served",
            prompt="import os\n",
            max_tokens=40,
            stream=True,
            extra_body={"steps": 40, "block_length": 8},
        )
    )
    want = expect(
        offline,
        CompletionRequest(model="tiny-served", prompt="import os\n", max_tokens=40, steps=40, block_length=8),
    )
    assert "".join(p.choices[0].text for p in parts) == want
    assert sum(1 for p in parts if p.choices[0].text) > 1  # really streamed, block by block


def test_sixteen_concurrent_requests_get_their_own_answers(server, offline):
    url, _ = server
    import openai

    prompts = [f"def f{i}(x):\n    return x * {i}" for i in range(16)]
    extras = [{"steps": 16, "block_length": 8} if i % 2 else {"cache": "none"} for i in range(16)]

    async def main():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        return await asyncio.gather(
            *[
                c.completions.create(
                    model="tiny-served", prompt=p, max_tokens=16, temperature=0, extra_body=e
                )
                for p, e in zip(prompts, extras)
            ]
        )

    outs = asyncio.run(main())
    for p, e, out in zip(prompts, extras, outs):
        want = expect(
            offline, CompletionRequest(model="tiny-served", prompt=p, max_tokens=16, temperature=0, **e)
        )
        assert out.choices[0].text == want
    assert len({o.choices[0].text for o in outs}) > 8  # distinct prompts, distinct answers


def test_n_answers_are_sampled_rows_seeded_one_after_another(server, offline):
    """``n``: n engine rows for one prompt; with a seed, choice i is the answer seed + i gets alone."""
    url, _ = server
    kw = {"model": "tiny-served", "max_tokens": 12, "temperature": 1.0, "seed": 7}
    chat = client(url).chat.completions.create(messages=[{"role": "user", "content": "def f(x):"}], n=3, **kw)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    texts = [c.message.content for c in chat.choices]
    for i, text in enumerate(texts):
        want = expect(
            offline,
            ChatCompletionRequest(
                messages=[{"role": "user", "content": "def f(x):"}], **kw | {"seed": 7 + i}
            ),
        )
        assert text == want, i
    assert len(set(texts)) > 1  # sampled rows differ
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens < chat.usage.total_tokens
    done = client(url).completions.create(prompt="import os", n=2, **kw)
    assert len(done.choices) == 2 and done.choices[1].text == expect(
        offline, CompletionRequest(prompt="import os", **kw | {"seed": 8})
    )
    # streamed: the n answers interleave in one event stream, told apart by choice index
    parts, finishes, usage = {}, {}, None
    stream = client(url).chat.completions.create(
        messages=[{"role": "user", "content": "def f(x):"}],
        n=3,
        stream=True,
        stream_options={"include_usage": True},
        **kw,
    )
    for piece in stream:
        usage = piece.usage or usage
        for c in piece.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert [parts[i] for i in range(3)] == texts and sorted(finishes) == [0, 1, 2]
    assert usage.completion_tokens == chat.usage.completion_tokens


GOOD = {"model": "tiny-served", "prompt": "hello", "max_tokens": 4}
CHAT = {"model": "tiny-served", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

BAD = [
    # (name, path, body (dict or raw str), status, param, message fragment)
    ("malformed json", "/v1/completions", '{"model": "tiny-served", "prompt": ', 400, None, "invalid JSON"),
    ("not an object", "/v1/completions", "[1, 2]", 400, None, "valid dictionary"),
    ("missing prompt", "/v1/completions", {"model": "tiny-served"}, 400, "prompt", "prompt: required"),
    ("missing model", "/v1/completions", {"prompt": "x"}, 400, "model", "model: required"),
    ("max_tokens string", "/v1/completions", {**GOOD, "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ("max_tokens zero", "/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens", "out of range"),
    ("max_tokens huge", "/v1/completions", {**GOOD, "max_tokens": 100000}, 400, "max_tokens", "out of range"),
    (
        "temperature type",
        "/v1/completions",
        {**GOOD, "temperature": "hot"},
        400,
        "temperature",
        "valid number",
    ),
    (
        "temperature negative",
        "/v1/completions",
        {**GOOD, "temperature": -1},
        400,
        "temperature",
        "greater than",
    ),
    ("empty prompt", "/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt", "prompt is empty"),
    (
        "over-long prompt",
        "/v1/completions",
        {**GOOD, "prompt": "word " * 400},
        400,
        "prompt",
        "exceeds the model's context",
    ),
    (
        "token out of vocab",
        "/v1/completions",
        {**GOOD, "prompt": [1, 99999]},
        400,
        "prompt",
        "outside the vocabulary",
    ),
    ("two prompts", "/v1/completions", {**GOOD, "prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ("unknown model", "/v1/completions", {**GOOD, "model": "gpt-4"}, 404, "model", "not found"),
    ("n = 0", "/v1/completions", {**GOOD, "n": 0}, 400, "n", "greater than or equal to 1"),
    ("n > batch", "/v1/completions", {**GOOD, "n": 33}, 400, "n", "exceeds this server's max_batch_size"),
    (
        "n > batch streamed",
        "/v1/completions",
        {**GOOD, "n": 33, "stream": True},
        400,
        "n",
        "exceeds this server's max_batch_size",
    ),
    ("logprobs", "/v1/completions", {**GOOD, "logprobs": 3}, 400, "logprobs", "unsupported parameter"),
    ("tools", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools", "unsupported"),
    ("empty messages", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "at least 1"),
    (
        "bad role",
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages",
        "role",
    ),
    (
        "empty content",
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": ""}]},
        400,
        "messages",
        "empty",
    ),
    ("bad remasking", "/v1/completions", {**GOOD, "remasking": "best"}, 400, "remasking", "low_confidence"),
    ("bad cache", "/v1/completions", {**GOOD, "cache": "all"}, 400, "cache", "prefix"),
    ("threshold > 1", "/v1/completions", {**GOOD, "threshold": 1.5}, 400, "threshold", "less than or equal"),
    ("steps not a multiple", "/v1/completions", {**GOOD, "max_tokens": 64, "steps": 3}, 400, None, "steps=3"),
    ("gen_length < max_tokens", "/v1/completions", {**GOOD, "gen_length": 2}, 400, "gen_length", "shorter"),
    (
        "lone surrogate",
        "/v1/completions",
        '{"model": "tiny-served", "prompt": "\\ud800"}',
        400,
        "prompt",
        "surrogate",
    ),
    (
        "huge seed",
        "/v1/completions",
        '{"model": "tiny-served", "prompt": "a", "seed": 1' + "0" * 30 + "}",
        400,
        "seed",
        "64 bits",
    ),
    (
        "NaN",
        "/v1/completions",
        '{"model": "tiny-served", "prompt": "a", "temperature": NaN}',
        400,
        None,
        "NaN",
    ),
    ("body over limit", "/v1/completions", {**GOOD, "prompt": "x" * (1 << 20)}, 413, None, "max_body_bytes"),
    ("stop strings", "/v1/completions", {**GOOD, "stop": list("abcde")}, 400, "stop", "at most 4"),
    ("unknown route", "/v1/embeddings", GOOD, 404, None, "no route"),
    ("wrong method", "/v1/completions", None, 405, None, "not allowed"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_get_openai_errors(server, case):
    url, _ = server
    name, path, body, status, param, fragment = case
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as h:
        if body is None:
            r = h.get(path)
        else:
            r = h.post(path, content=body if isinstance(body, str) else json.dumps(body))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment.lower() in err["message"].lower(), err
    assert err["type"] == "invalid_request_error"
    assert err["param"] is None or err["param"] in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if status == 404 and param == "model":
        assert err["code"] == "model_not_found"


def test_server_keeps_serving_after_bad_requests(server):
    url, _ = server
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        for _ in range(3):
            assert h.post("/v1/completions", content='{"model": ').status_code == 400
            r = h.post("/v1/completions", content="model=x", headers={"Content-Type": "text/plain"})
            assert r.status_code == 415
            r = h.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
        # Unknown fields (vendor extensions of load tools) are ignored, not refused.
        extra = {
            **CHAT,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "top_k": 5,
        }
        assert h.post("/v1/chat/completions", json=extra).status_code == 200
        engine = h.get("/health").json()["engine"]
        assert engine["errors"]["rejected"] >= 6  # 4xx answers are counted in the request metrics


def test_api_key_enforced(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as h:
        r = h.post("/v1/completions", json=GOOD)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "missing" in r.json()["error"]["message"]
        r = h.post("/v1/completions", json=GOOD, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "invalid API key" in r.json()["error"]["message"]
        assert h.get("/v1/models").status_code == 401
        r = h.post("/v1/completions", json=GOOD, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        assert h.get("/health").status_code == 200  # liveness stays open for load balancers
        assert h.get("/v1/nothing").status_code == 401  # every other path is behind the key


def test_openapi_schema_and_health(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as h:
        spec = h.get("/openapi.json").json()
        assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(spec["paths"])
        props = spec["components"]["schemas"]["CompletionRequest"]["properties"]
        assert {"steps", "block_length", "threshold", "remasking", "cache"} <= set(props)
        health = h.get("/health").json()
        assert health["status"] == "ok" and {"active", "pending", "tokens_per_s"} <= set(health["engine"])


def test_client_disconnect_cancels_the_request(server):
    url, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    slow = {**GOOD, "max_tokens": 128, "steps": 128, "block_length": 4, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as h:
        before = h.get("/health").json()["engine"]["cancelled"]
        with h.stream("POST", "/v1/completions", json=slow) as r:
            assert r.status_code == 200
            first = next(r.iter_lines())
            assert first.startswith("data: ")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            engine = h.get("/health").json()["engine"]
            if engine["cancelled"] > before and engine["active"] == 0 and engine["pending"] == 0:
                break
            time.sleep(0.2)
        assert engine["cancelled"] > before, engine
        assert engine["active"] == 0 and engine["pending"] == 0  # the slot is free again
        # Non-streaming too: the client gives up, Serve cancels the request, the engine drops it.
        before = engine["cancelled"]
        heavy = {**slow, "prompt": "x = 1\n" * 24, "stream": False, "block_length": 1, "cache": "none"}
        answered = []  # a fast refusal (429 while the stream above still counts) is retried
        for _ in range(20):
            try:  # 128 full passes over ~250 positions: far more than 0.1 s
                answered.append(h.post("/v1/completions", json=heavy, timeout=0.1).status_code)
            except httpx.TimeoutException:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the client never gave up waiting: answered {answered}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            engine = h.get("/health").json()["engine"]
            if engine["cancelled"] > before and engine["active"] == 0 and engine["pending"] == 0:
                break
            time.sleep(0.2)
        assert engine["cancelled"] > before and engine["active"] == 0, engine


def test_deployment_yaml_args_validate():
    data = yaml.safe_load((ROOT / "deployments" / "diffmoe.yaml").read_text())
    app = data["applications"][0]
    assert app["import_path"] == "diffmoe.serve.app:build_app"
    cfg = ServeConfig.model_validate(app["args"])
    assert cfg.http_host == "127.0.0.1" == data["http_options"]["host"]
    assert cfg.http_port == data["http_options"]["port"]
    # Serve hands a replica more than it holds, so overload meets the replica's fast 429 rather
    # than waiting in Serve's queue for a 503: in the shipped YAML and at the defaults
    defaults = {k: f.default for k, f in ServeConfig.model_fields.items()}
    for c in (cfg.model_dump(), defaults):
        assert c["max_ongoing_requests"] > c["max_batch_size"] + c["max_pending_requests"], c
    from diffmoe.serve.app import deployment_options

    opts = deployment_options(cfg.model_copy(update={"ep_size": 2}))
    assert len(opts["placement_group_bundles"]) == 2
    assert opts["placement_group_strategy"] == "STRICT_PACK"  # a replica's all-to-all stays on one node
    # On GPUs the replica (LM head + sampler) takes half of rank 0's GPU in bundle 0.
    gpu = cfg.model_copy(update={"ep_size": 2, "replica_gpus": 1.0})
    opts = deployment_options(gpu)
    assert [b["GPU"] for b in opts["placement_group_bundles"]] == [1.0, 1.0]
    assert opts["ray_actor_options"]["num_gpus"] == gpu.head_gpus == 0.5


def test_serve_config_rejects_bad_args():
    from diffmoe.config import ConfigError, build
    from diffmoe.serve.app import build_app

    with pytest.raises(ConfigError, match="ep_sise"):
        build_app({"ep_sise": 2})
    with pytest.raises(ConfigError, match="min_replicas=3 exceeds max_replicas=2"):
        build(ServeConfig, {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ConfigError, match="decoding.block_length"):
        build(ServeConfig, {"decoding": {"block_length": "x"}})
    assert ServeConfig().http_host == "127.0.0.1"


def test_promoting_an_alias_and_redeploying_changes_what_is_served(server, tiny_model_dir, tmp_path):
    """Model Registry -> Serve: an app deployed from ``models:/name@champion`` serves the version the
    alias points at; after the alias moves, redeploying (same args) rolls over to the new version."""
    from mlflow import MlflowClient
    from ray import serve

    from diffmoe.bench.tiny_model import make_tiny_model_dir
    from diffmoe.serve.app import run_app
    from diffmoe.tracking import register_model

    url, cfg = server
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("registry", artifact_location=(tmp_path / "mlruns").as_uri())
    dirs = [tiny_model_dir, make_tiny_model_dir(tmp_path / "retrained", seed=1)]
    for model_dir in dirs:  # two training runs, each registered as a version; the alias follows
        run_id = client.create_run(experiment).info.run_id
        client.log_artifacts(run_id, str(model_dir), "model")
        register_model(client, run_id, "model", "tiny-registry", alias="champion")
    client.set_registered_model_alias("tiny-registry", "champion", "1")
    args = {
        "model": "models:/tiny-registry@champion",
        "model_name": "tiny-served",
        "mlflow_tracking_uri": uri,
        "http_port": cfg.http_port,  # the running proxy; this app gets its own route
        "route_prefix": "/registry",
        "replica_cpus": 1,
    }
    req = {**CHAT, "messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 8}
    wanted = [expect(ModelHost(ServeConfig(model=str(d))), ChatCompletionRequest(**req)) for d in dirs]
    assert wanted[0] != wanted[1]  # otherwise the test could not tell the versions apart
    try:
        for version, answer in (("1", wanted[0]), ("2", wanted[1])):
            client.set_registered_model_alias("tiny-registry", "champion", version)
            base = run_app(args, name="registry-test")
            reply = httpx.post(f"{base}/v1/chat/completions", json=req, timeout=60)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == answer, version
    finally:
        serve.delete("registry-test")


def test_killed_replica_is_replaced_and_serves_again(server):
    """Last in the module: kill the replica's process (``ray.kill``); Serve's controller starts a new
    one. Requests meanwhile wait for it or fail with a retryable status, none hangs past the bound."""
    import ray

    url, _ = server
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "diffmoe-test" in a["name"]]
    replicas = [a for a in names if "REPLICA" in a["name"].upper()]
    assert len(replicas) == 1, names
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    t0, seen = time.monotonic(), []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as h:
        while time.monotonic() - t0 < 180:
            try:
                r = h.post("/v1/chat/completions", json=CHAT)
                seen.append(r.status_code)
                if r.status_code == 200:
                    break
            except httpx.TransportError as err:
                seen.append(type(err).__name__)
            time.sleep(0.5)
    assert seen[-1] == 200, seen
    assert all(s in (200, 500, 502, 503, 504) or isinstance(s, str) for s in seen), seen
    print(f"first success {time.monotonic() - t0:.1f}s after the kill; answers: {seen}")


def test_lm_eval_local_completions_scores_the_served_endpoint(server, offline, tmp_path):
    """lm-eval's own OpenAI-completions client (``local-completions``) evaluates the endpoint: each
    logged response is the answer the replica must give for that prompt."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from diffmoe.generation.tasks import ReverseTask
    from diffmoe.harness.tasks import write_builtin_tasks

    url, _ = server
    tasks = write_builtin_tasks(tmp_path, "reverse", 4, 7)
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": url + "/v1/completions",
            "model": "tiny-served",
            "tokenizer_backend": "none",
            "tokenized_requests": False,
            "header": {"Authorization": f"Bearer {KEY}"},
            "max_retries": 1,
        },
        tasks=["diffmoe_reverse"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = out["samples"]["diffmoe_reverse"]
    assert len(samples) == 4 and "exact_match,none" in out["results"]["diffmoe_reverse"]
    budget = ReverseTask().max_answer_chars + 2  # the task's max_gen_toks
    for sample in samples:
        req = CompletionRequest(
            model="tiny-served", prompt=sample["doc"]["prompt"], max_tokens=budget, temperature=0
        )
        assert sample["resps"][0][0] == expect(offline, req)


def test_fuzzed_requests_over_real_serve_never_get_5xx(server, offline):
    """The fuzz test's generated requests (valid, near-valid, invalid), 2000 of them through Ray
    Serve's HTTP proxy, sent 25 at a time so they fit the suite's budget (concurrency may add 429s,
    which must have OpenAI's error shape like every other 4xx)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from serve_replica import assert_openai_error
    from test_serve_fuzz import requests as fuzzed

    url, _ = server
    statuses: dict[int, int] = {}

    async def send(cases):
        async with httpx.AsyncClient(timeout=120) as c:

            async def one(path, content, ctype):
                headers = {"Authorization": f"Bearer {KEY}", **({"Content-Type": ctype} if ctype else {})}
                return (path, content), await c.post(url + path, content=content, headers=headers)

            return await asyncio.gather(*[one(*case) for case in cases])

    @settings(
        max_examples=80,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases=st.lists(fuzzed(), min_size=25, max_size=25))
    def check(cases):
        for (path, content), r in asyncio.run(send(cases)):
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (path, content[:200], r.text)
            if r.status_code >= 400:
                assert_openai_error(r)

    check()
    assert sum(statuses.values()) == 2000 and statuses.get(200, 0) > 100 and len(statuses) > 2, statuses
    body = {**GOOD, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200  # still serving, and correctly: the answer the replica must give
    assert r.json()["choices"][0]["text"] == expect(offline, CompletionRequest(**body))
