"""``ServeConfig``: every argument of the serving application, validated before Serve starts.

The same model is the ``args`` block of ``deployments/diffmoe.yaml`` and what ``build_app`` receives,
so a typo in a deployment file fails at ``serve run`` / ``serve deploy`` time with the key named.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffmoe.config import StrictModel
from diffmoe.generation import DecodingConfig


class AutoscalingSettings(StrictModel):
    """The subset of Ray Serve's ``autoscaling_config`` the platform exposes (same field names)."""

    min_replicas: int = Field(1, ge=0)
    initial_replicas: int | None = Field(None, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    metrics_interval_s: float = Field(10.0, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}")
        return self


def _default_decoding() -> DecodingConfig:
    # Fast-dLLM settings: threshold decoding with a prefix cache is the fast path on CPU and GPU.
    return DecodingConfig(gen_length=64, block_length=32, threshold=0.9, cache="prefix")


class ServeConfig(StrictModel):
    """Arguments of ``diffmoe.serve.app:build_app``."""

    # Model source: a local Hugging Face directory, ``runs:/<run_id>/model`` or ``models:/<name>/<version>``.
    model: str = "artifacts/finetune-tiny"
    model_name: str | None = None  # the id clients send as ``model``; default: the source's last part
    tokenizer: str | None = None  # tokenizer directory or URI; default: the model directory
    mlflow_tracking_uri: str | None = None  # for runs:/ and models:/ sources; default: MLFLOW_TRACKING_URI
    # "module:function" taking the model directory and returning the model; None = diffmoe's loader
    model_loader: str | None = None
    decoding: DecodingConfig = Field(default_factory=_default_decoding)  # per-request defaults
    max_tokens_limit: int = Field(512, ge=1)  # largest max_tokens / gen_length a request may ask for
    max_steps_limit: int = Field(1024, ge=1)  # largest steps a request may ask for
    ep_size: int = Field(1, ge=1)  # expert-parallel workers per replica
    # Where a replica's ep_size workers may go (Ray placement strategy). STRICT_PACK: one node, so the
    # all-to-all of every MoE layer stays on the node's interconnect; a replica that fits on no node
    # waits for one (the autoscaler can add it). PACK: may span nodes when none has room.
    ep_placement: Literal["STRICT_PACK", "PACK"] = "STRICT_PACK"
    max_batch_size: int = Field(32, ge=1)  # requests the engine decodes together
    # Block diffusion (LLaDA2.x): most prompt positions a request feeds per step; a longer prompt is
    # cached over several steps (chunked prefill), bounding one step's attention mask and activations.
    # null: whole prompts in one step.
    prefill_chunk: int | None = Field(2048, ge=1)
    # Serve's per-replica admission limit. Keep it above max_batch_size + max_pending_requests: at
    # or below it the replica's fast 429 is never reached, and overload queues in Serve, then 503s.
    max_ongoing_requests: int = Field(128, ge=1)
    max_queued_requests: int = Field(128, ge=-1)  # Serve's queue limit per handle (-1 = unbounded): 503
    # Requests a replica holds beyond the batch (tokenizing or waiting for a slot); more get a 429.
    max_pending_requests: int = Field(64, ge=0)
    retry_after_s: int = Field(1, ge=0)  # Retry-After header of 429 / 503 answers
    request_timeout_s: float = Field(
        300.0, gt=0
    )  # per-request deadline (non-streaming: 504; streams: in-band)
    step_timeout_s: float = Field(120.0, gt=0)  # one engine step running longer fails the health check
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0)  # in-flight requests may finish this long
    # Request-size limits: all are client errors (413 for the body, 400 for the rest).
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_messages: int = Field(256, ge=1)
    max_stop: int = Field(4, ge=0)  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = Field(256, ge=1)  # characters per stop string
    reject_unknown_fields: bool = False  # False: unknown request fields are ignored with a warning
    num_replicas: int | None = Field(None, ge=1)  # fixed replica count; None = use autoscaling_config
    autoscaling_config: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    replica_cpus: float = Field(1.0, gt=0)  # CPUs of the replica actor (ingress + engine loop)
    worker_cpus: float = Field(1.0, gt=0)  # CPUs of each expert-parallel worker
    # GPUs per replica (ep_size=1) or per worker (ep_size>1: rank 0 shares its GPU with the replica)
    replica_gpus: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, ge=1)  # intra-op threads for the model; None = CPUs reserved
    http_host: str = "127.0.0.1"  # loopback by default; used by ``run_app`` (YAML: top-level http_options)
    http_port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = "/"
    api_key: str | None = (
        None  # when set (or via api_key_env) every route but /health and docs needs Bearer auth
    )
    api_key_env: str | None = None  # variable holding the key (YAML holds no secret); unset/empty: no start
    # Streamed deltas are coalesced: at most one chunk per stream_interval_s, and at most
    # stream_chunks_per_s chunks per replica in total (the HTTP proxy, not the engine, is the limit).
    stream_interval_s: float = Field(0.05, ge=0)
    stream_chunks_per_s: float = Field(100.0, gt=0)
    log_requests: bool = True  # one structured JSON log line per finished request

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        d = self.decoding
        if d.gen_length > self.max_tokens_limit:
            raise ValueError(
                f"decoding.gen_length={d.gen_length} exceeds max_tokens_limit={self.max_tokens_limit}"
            )
        if d.cfg_scale > 0:
            raise ValueError("decoding.cfg_scale > 0 is not supported by the batching engine")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty: set a key, or leave it out to turn auth off")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix={self.route_prefix!r} must start with '/'")
        return self

    @property
    def head_gpus(self) -> float:
        """With expert parallelism on GPUs, the replica (LM head + sampler) shares rank 0's GPU:
        half of bundle 0's GPU each, so workers send hidden states, not logits, to a GPU."""
        return self.replica_gpus / 2 if self.ep_size > 1 else 0.0

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        return self.model.rstrip("/").split("/")[-1] or "diffmoe"
