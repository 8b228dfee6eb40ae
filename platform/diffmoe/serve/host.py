"""What one replica holds: tokenizer, model (local or expert-parallel) and the batching ``Engine``;
and the translation of an OpenAI request into prompt ids plus a ``DecodingConfig``.

Kept free of Serve and HTTP so tests and the benchmark can compute the exact offline answer a
request should get (``ModelHost.request_settings`` + ``Engine.run``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import ValidationError

from diffmoe.generation import DecodingConfig, Engine
from diffmoe.model.source import load_model, resolve

from .config import ServeConfig
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, unsupported_param

ModelLoader = Callable[[Path], torch.nn.Module]


def load_tokenizer_dir(path: Path):
    from diffmoe.data.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(path)
    except TokenizerError as err:
        raise ValueError(str(err)) from err


def chat_encoder(path: Path):
    """The SFT pipeline's encoder: prompts are encoded exactly like the fine-tuning data, and marker
    text in user content stays plain text."""
    from diffmoe.data.tokenizer import ChatEncoder, read_tokenizer_json

    return ChatEncoder(read_tokenizer_json(path))


def own_template_renderer(tokenizer, path: Path):
    """messages -> prompt text with the model's own chat template (LLaDA2's, from
    tokenizer_config.json), or None when it ships none or ours (the SFT turn format)."""
    from diffmoe.data.tokenizer import model_chat_template

    template = model_chat_template(path)
    if template is None:
        return None

    def render(messages):
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )

    return render


def _first_field(message: str) -> str | None:
    fields = ("block_length", "steps", "gen_length", "threshold", "cache")
    found = [(message.find(f"{f}="), f) for f in fields if f"{f}=" in message]
    return min(found)[1] if found else None


class ModelHost:
    def __init__(self, cfg: ServeConfig, model_loader: ModelLoader | None = None):
        self.cfg = cfg
        self.path = resolve(cfg.model, cfg.mlflow_tracking_uri)
        tok_path = resolve(cfg.tokenizer, cfg.mlflow_tracking_uri) if cfg.tokenizer else self.path
        self.tokenizer, self.special = load_tokenizer_dir(tok_path)
        self.encoder = chat_encoder(tok_path)
        self.render_chat = own_template_renderer(self.tokenizer, tok_path)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        if cfg.ep_size > 1:
            from diffmoe.model.checkpoint import load_config

            from .expert_parallel import ExpertParallelModel

            config = load_config(self.path)
            self.model = ExpertParallelModel.start(
                config,
                cfg.ep_size,
                cfg.model,
                cfg.mlflow_tracking_uri,
                cfg.worker_cpus,
                cfg.replica_gpus,
                directory=self.path,
                rank0_gpus=cfg.replica_gpus - cfg.head_gpus,
            )
        else:
            self.model = (model_loader or load_model)(self.path)
        self.model_config = self.model.config
        experts = getattr(self.model_config, "num_experts", 0)
        self.info = {
            "ep_size": cfg.ep_size,
            "experts_per_worker": getattr(self.model, "experts_per_worker", [experts]),
        }
        self.context = int(getattr(self.model_config, "max_position_embeddings", 1 << 30))
        self.vocab = int(getattr(self.model_config, "vocab_size", len(self.tokenizer)))
        self.engine = Engine(
            self.model,
            self.tokenizer,
            max_batch_size=cfg.max_batch_size,
            prefill_chunk=cfg.prefill_chunk,
            mask_id=self.special.mask_id,
            eos_id=self.special.eos_id,
            default_config=cfg.decoding,
        )

    # ---- request translation ----------------------------------------------------------------
    def decoding_for(self, req) -> DecodingConfig:
        """Merge a request's settings over the server defaults; 400 with the field on anything bad."""
        d, cfg = self.cfg.decoding, self.cfg
        max_tokens = req.max_tokens
        name = "max_tokens"
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            max_tokens, name = req.max_completion_tokens, "max_completion_tokens"
        if max_tokens is not None and not 1 <= max_tokens <= cfg.max_tokens_limit:
            raise ApiError(
                400, f"{name}={max_tokens} is out of range: must be 1..{cfg.max_tokens_limit}", name
            )
        block = req.block_length or d.block_length
        if block > cfg.max_tokens_limit:
            raise ApiError(
                400, f"block_length={block} exceeds the server limit {cfg.max_tokens_limit}", "block_length"
            )
        if req.gen_length is not None:
            gen = req.gen_length
            if max_tokens is not None and gen < max_tokens:
                raise ApiError(400, f"gen_length={gen} is shorter than {name}={max_tokens}", "gen_length")
        elif max_tokens is not None:
            gen = math.ceil(max_tokens / block) * block
        else:
            gen = math.ceil(d.gen_length / block) * block
        if gen > math.ceil(cfg.max_tokens_limit / block) * block:
            raise ApiError(
                400, f"gen_length={gen} exceeds the server limit {cfg.max_tokens_limit}", "gen_length"
            )
        if req.steps is not None and req.steps > cfg.max_steps_limit:
            raise ApiError(400, f"steps={req.steps} exceeds the server limit {cfg.max_steps_limit}", "steps")
        threshold, factor = d.threshold, d.factor
        if req.threshold is not None:
            threshold, factor = req.threshold, None
        if req.parallel is False or (req.steps is not None and req.threshold is None):
            threshold = factor = None  # explicit steps mean the fixed LLaDA schedule
        cache = req.cache or d.cache
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > cfg.max_stop:
            raise ApiError(400, f"stop: at most {cfg.max_stop} stop strings (got {len(stop)})", "stop")
        if not all(stop):
            raise ApiError(400, "stop: stop strings must be non-empty", "stop")
        if any(len(s) > cfg.max_stop_chars for s in stop):
            raise ApiError(400, f"stop: a stop string is longer than {cfg.max_stop_chars} characters", "stop")
        settings = dict(
            gen_length=gen,
            block_length=block,
            steps=req.steps,
            temperature=d.temperature if req.temperature is None else req.temperature,
            remasking=req.remasking or d.remasking,
            threshold=threshold,
            factor=factor,
            cache=cache,
            refresh_every=d.refresh_every if cache != "none" else None,
            vicinity=d.vicinity if cache == "dual" else 0,
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=list(d.stop_token_ids),
            ignore_eos=req.ignore_eos,
            seed=req.seed if req.seed is not None else d.seed,
            top_k=d.top_k if req.top_k is None else (req.top_k if req.top_k > 0 else None),
            top_p=req.top_p if req.top_p is not None else d.top_p,
            editing_threshold=req.editing_threshold
            if req.editing_threshold is not None
            else d.editing_threshold,
            max_post_steps=req.max_post_steps if req.max_post_steps is not None else d.max_post_steps,
        )
        blocks = self.engine.family == "block_diffusion"
        if not blocks and req.editing_threshold is not None:
            raise ApiError(
                400,
                "editing_threshold: only block-diffusion (LLaDA2.x) models edit tokens",
                "editing_threshold",
            )
        if blocks and settings["remasking"] != "low_confidence":
            raise ApiError(
                400, "remasking: block-diffusion (LLaDA2.x) models remask by confidence only", "remasking"
            )
        if blocks and settings["factor"] is not None:
            settings["factor"] = None  # a server-wide factor default is LLaDA-MoE's; LLaDA2 uses threshold
        if not blocks:
            settings["editing_threshold"] = None
        try:
            return DecodingConfig(**settings)
        except ValidationError as err:
            e = err.errors()[0]
            msg = e["msg"].removeprefix("Value error, ")
            # Combination errors have no location: name the request field they start with.
            param = ".".join(str(p) for p in e["loc"]) or _first_field(msg)
            raise ApiError(400, f"{param}: {msg}" if param else msg, param) from None

    def prompt_ids(self, req) -> tuple[list[int], str]:
        """Token ids of the prompt (completions) or of the chat, in the model's own chat template when
        it ships one (LLaDA2) or else the LLaDA turn format, encoded by the SFT pipeline's
        ``ChatEncoder``: role / end / mask markers typed by a user are plain text either way."""
        if isinstance(req, CompletionRequest):
            prompt, param = req.prompt, "prompt"
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
                if len(prompt) != 1:
                    raise ApiError(400, f"prompt: only one prompt per request (got {len(prompt)})", param)
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = self.encoder.plain.encode(prompt, add_special_tokens=False).ids if prompt else []
            else:
                ids = list(prompt)
                bad = [t for t in ids if not 0 <= t < self.vocab]
                if bad:
                    raise ApiError(
                        400,
                        f"prompt: token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})",
                        param,
                    )
        else:
            param = "messages"
            if len(req.messages) > self.cfg.max_messages:
                raise ApiError(
                    400,
                    f"messages: at most {self.cfg.max_messages} messages (got {len(req.messages)})",
                    param,
                )
            msgs = []
            for m in req.messages:
                text = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content)
                msgs.append({"role": "system" if m.role == "developer" else m.role, "content": text})
            if not any(m["content"] for m in msgs):
                raise ApiError(400, "messages: every message is empty", param)
            if self.render_chat is not None:  # the model's own template, contents still plain text
                try:
                    ids = self.encoder.encode_templated(self.render_chat, msgs)
                except Exception as err:  # noqa: BLE001 - a template error is about these messages
                    raise ApiError(400, f"messages: the model's chat template failed: {err}", param) from None
            else:
                [(ids, prompt_length)] = self.encoder.encode_batch([(msgs, "")])
                ids = ids[:prompt_length]  # the turns plus the assistant header, without the empty answer
        if not ids:
            raise ApiError(400, f"{param}: the prompt is empty", param)
        if self.special.mask_id in ids:
            raise ApiError(400, f"{param}: the prompt contains the mask token", param)
        return ids, param

    def request_settings(self, req) -> tuple[list[int], DecodingConfig]:
        """Everything the engine needs for one request, validated (ApiError on a client error)."""
        bad = unsupported_param(req)
        if bad is not None:
            raise ApiError(
                400,
                f"{bad}: unsupported parameter (value {getattr(req, bad)!r})",
                bad,
                "unsupported_parameter",
            )
        dec = self.decoding_for(req)
        ids, param = self.prompt_ids(req)
        if len(ids) + dec.gen_length > self.context:
            raise ApiError(
                400,
                f"{param}: prompt ({len(ids)} tokens) + answer canvas ({dec.gen_length}) exceeds the model's "
                f"context of {self.context} tokens",
                param,
                "context_length_exceeded",
            )
        return ids, dec

    async def problem(self) -> str | None:
        """Why this replica cannot serve (engine-wide failure, a hung step, a dead expert-parallel
        worker), or None: Serve's health check and ``/health`` both report it."""
        engine, cfg = self.engine, self.cfg
        if engine.failure is not None:
            return f"engine failed: {type(engine.failure).__name__}: {engine.failure}"
        started = engine.step_started
        if started is not None and time.monotonic() - started > cfg.step_timeout_s:
            return f"an engine step has run {time.monotonic() - started:.0f}s (step_timeout_s={cfg.step_timeout_s})"
        if hasattr(self.model, "ping"):
            try:
                await asyncio.wait_for(self.model.ping(), cfg.step_timeout_s)
            except Exception as err:  # noqa: BLE001 - any failure of a worker is the answer
                return f"expert-parallel worker unreachable: {type(err).__name__}: {err}"
        return None

    def shutdown(self) -> None:
        if hasattr(self.model, "shutdown"):
            self.model.shutdown()
