"""Continuous batching for diffusion decoding.

The ``Engine`` holds many in-flight requests, each with its own prompt, canvas and decoding settings,
and advances all of them by one denoising step per ``step()``. Requests that need a full pass (no
cache, a block start, a refresh) share one padded forward; requests on a cached step share another
that feeds only their windows, so one request's refresh never pads the others to full length.
Between steps queued requests are admitted and finished ones retired, freeing their slot and cache.
Each request's positions start at 0 at its first prompt token and every row masks the others'
padding, so at temperature 0 a request decodes the same tokens alone or in any batch.

A causal model (``config.causal``: the autoregressive twin) is decoded autoregressively with a
per-request KV cache by the same engine (``autoregressive.py``): same requests, batching, streaming
and end handling, so the same server serves both.

Drive it synchronously (``add_request`` + ``step()``, or ``run()``), or from asyncio
(``async for event in engine.stream(prompt, config)``; ``await engine.generate(...)``): a background
task runs ``step()`` in a worker thread so the event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator

import torch
from torch.nn.utils.rnn import pad_sequence

from .autoregressive import ARStepper
from .block_engine import BlockSequence, BlockStepper
from .config import DecodingConfig, check_prompt, decoding_family
from .remote_cache import RemoteWindows
from .sampler import block_logits, predict, select_transfer
from .sequence import PastStack, RequestOutput, Sequence, StreamEvent, stack_past
from .streaming import encode_prompt

__all__ = ["Engine", "RequestOutput", "StreamEvent"]


class Engine:
    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_batch_size: int = 32,
        mask_id: int | None = None,
        eos_id: int | None = None,
        default_config: DecodingConfig | None = None,
        prefill_apart: bool = True,  # admitted prompts in a forward of their own (block diffusion, AR)
        prefill_chunk: int | None = 2048,  # block diffusion: most prompt positions a row feeds per step
    ):
        config = getattr(model, "config", None)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mask_id = mask_id if mask_id is not None else getattr(config, "mask_token_id", None)
        if self.mask_id is None:
            raise ValueError("mask_id is not set and the model config has no mask_token_id")
        eos = eos_id if eos_id is not None else getattr(config, "eos_token_id", None)
        self.end_ids = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 1 (or None: whole prompts)")
        self.max_batch_size = max_batch_size
        self.family = decoding_family(config)
        self.causal = self.family == "autoregressive"  # the AR twin: next-token decoding
        self.default_config = default_config or DecodingConfig()
        self.device = next(model.parameters()).device
        self._window_past = PastStack()  # cached steps reuse the stacked caches inside a block
        self._ar = ARStepper(self.model, self.mask_id, self.device, prefill_apart) if self.causal else None
        self._blocks = (
            BlockStepper(self.model, self.device, prefill_apart, prefill_chunk)
            if self.family == "block_diffusion"
            else None
        )
        # masked diffusion on a model that keeps each row's window cache where it runs (expert parallel)
        keeps = self.family == "masked_diffusion" and getattr(model, "keeps_row_caches", False)
        self._windows = RemoteWindows(self.model) if keeps else None
        self.active: dict[str, Sequence] = {}
        self._pending: dict[str, Sequence] = {}  # queued, in arrival order
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.forwards = 0  # model calls so far
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop_task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        # Health, read by the server: when the running step began (a hang shows as an old value),
        # consecutive steps in which every row failed, and the error once that reaches the limit.
        self.step_started: float | None = None
        self.failed_steps, self.max_failed_steps = 0, 3
        self.failure: Exception | None = None

    # ---- synchronous interface -------------------------------------------------------------
    def add_request(self, prompt, config: DecodingConfig | None = None, request_id: str | None = None) -> str:
        """Queue a request (text or token ids); it joins the batch at the next step. Bad settings
        raise here, before anything is queued."""
        cfg = config or self.default_config
        ids = encode_prompt(self.tokenizer, prompt)
        check_prompt(getattr(self.model, "config", None), len(ids), cfg.gen_length)
        if self.mask_id in ids:
            raise ValueError(f"the prompt contains mask_id={self.mask_id}; only the answer canvas is decoded")
        if cfg.cfg_scale > 0:
            raise ValueError("cfg_scale > 0 is supported by generate() only, not by the batching Engine")
        if self.causal and not ids:
            raise ValueError("an autoregressive (causal) model needs a non-empty prompt")
        if self.family == "block_diffusion":
            if cfg.factor is not None or cfg.remasking != "low_confidence":
                raise ValueError(
                    "factor and remasking='random' are not used by block-diffusion (LLaDA2.x) decoding"
                )
        elif cfg.editing_threshold is not None:
            raise ValueError("editing_threshold is for block-diffusion (LLaDA2.x) models only")
        rid = request_id or f"req-{next(self._ids)}"
        seq = (BlockSequence if self.family == "block_diffusion" else Sequence)(
            rid,
            ids,
            cfg,
            mask_id=self.mask_id,
            end_ids=self.end_ids,
            tokenizer=self.tokenizer,
            device=self.device,
        )
        with self._lock:
            if rid in self.active or rid in self._pending:
                raise ValueError(f"request_id {rid!r} is already in flight")
            self._pending[rid] = seq
        return rid

    def cancel(self, request_id: str) -> None:
        """Drop a request at the next step (its slot and cache are freed); unknown ids are ignored."""
        with self._lock:
            self._cancelled.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self.active or self._pending)

    @torch.inference_mode()
    def step(self) -> list[StreamEvent]:
        """Admit, run one denoising step for every active request, retire; return the new events."""
        events = []
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            for rid in cancelled & self._pending.keys():
                events.append(self._pending.pop(rid).finish("cancelled"))
            for rid in cancelled & self.active.keys():
                events.append(self.active.pop(rid).finish("cancelled"))
            while self._pending and len(self.active) < self.max_batch_size:
                seq = self._pending.pop(next(iter(self._pending)))
                seq.admitted = time.perf_counter()
                self.active[seq.id] = seq
            batch = list(self.active.values())
        if not batch:
            return events
        return events + self._advance(batch)

    def _advance(self, batch) -> list[StreamEvent]:
        """One denoising (or next-token) step for ``batch``, then collect."""
        if self.causal:
            self.forwards += self._ar.step(batch)
            return self._collect(batch)
        if self._blocks is not None:
            self.forwards += self._blocks.step(batch)
            return self._collect(batch)
        full = [s for s in batch if s.wants_full_pass()]
        cached = [s for s in batch if not s.wants_full_pass()]
        for group, is_full in ((full, True), (cached, False)):
            if group:
                logits = self._forward_full(group) if is_full else self._forward_window(group)
                self._commit(group, logits)
        return self._collect(batch)

    @torch.inference_mode()
    def _isolate(self) -> tuple[list[StreamEvent], dict[str, Exception], bool]:
        """After a failed batched step, step each active request alone: one that fails again leaves
        the batch with its own error, so one bad request never fails the others. The flag says
        whether any row still advanced."""
        with self._lock:
            batch = list(self.active.values())
        events, failed, advanced = [], {}, False
        for seq in batch:
            try:
                events += self._advance([seq])
                advanced = True
            except Exception as err:  # noqa: BLE001 - reported to that request only
                failed[seq.id] = err
                seq.past, seq.dropped = None, True  # a cache the model keeps for it goes at the next step
                with self._lock:
                    self.active.pop(seq.id, None)
        return events, failed, advanced

    def _collect(self, batch) -> list[StreamEvent]:
        """Each request's new final tokens; finished requests leave the batch (slot and cache freed)."""
        events = []
        for seq in batch:
            event = seq.collect()
            if event is not None:
                events.append(event)
                if event.finished:
                    with self._lock:
                        self.active.pop(seq.id, None)
        return events

    def run(self, prompts, config: DecodingConfig | None = None) -> list[RequestOutput]:
        """Decode a list of prompts to completion (all queued at once); outputs in prompt order."""
        configs = config if isinstance(config, list) else [config] * len(prompts)
        ids = [self.add_request(p, c) for p, c in zip(prompts, configs)]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for event in self.step():
                if event.finished:
                    done[event.request_id] = event.output
        self.release_finished()
        return [done[i] for i in ids]

    def release_finished(self) -> None:
        """Free what finished requests still hold where the model runs (an expert-parallel
        replica's workers keep block caches until told); called when the engine goes idle."""
        for holder in (self._ar, self._blocks, self._windows):
            if holder is not None:
                holder.release_finished()

    # ---- batched forwards ----------------------------------------------------------------------
    def _block_index(self, group, starts):
        """[R, max block] positions of each row's block in its fed input (clamped for short blocks)."""
        width = max(s.cfg.block_length for s in group)
        cols = torch.arange(width)[None] + torch.tensor(starts)[:, None]
        limit = torch.tensor([s.cfg.block_length for s in group])[:, None] + torch.tensor(starts)[:, None] - 1
        return torch.minimum(cols, limit).to(self.device)

    def _forward_full(self, group):
        """Whole sequences, right-padded; rows with a cache keep their keys/values outside the window."""
        lengths = [s.length for s in group]
        width = max(lengths)
        ids = pad_sequence([s.x for s in group], batch_first=True, padding_value=self.mask_id)
        key_mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
        use_cache = any(s.cfg.cache != "none" for s in group)
        pos = self._block_index(group, [s.block_span[0] for s in group])
        if self._windows is not None:
            logits = self._windows.full(group, ids, key_mask, pos)
        else:
            logits, kv = block_logits(
                self.model,
                ids.to(self.device),
                pos,
                attention_mask=key_mask.to(self.device),
                use_cache=use_cache,
            )
            for r, s in enumerate(group):
                if use_cache and s.cfg.cache != "none":
                    s.keep_cache(kv, r)
        self.forwards += 1
        for s in group:
            s.steps += 1
            s.tokens_fed += s.length
        return logits

    def _forward_window(self, group):
        """Each row feeds only its window at its true positions and attends to its cached rest."""
        windows = [s.window for s in group]
        fed = [we - ws for ws, we in windows]
        rows, width = len(group), max(fed)
        ids = torch.full((rows, width), self.mask_id, dtype=torch.long)
        position_ids = torch.zeros(rows, width, dtype=torch.long)
        for r, (s, (ws, we)) in enumerate(zip(group, windows)):
            ids[r, : we - ws] = s.x[ws:we]
            position_ids[r] = torch.arange(ws, ws + width)
        fed_mask = torch.arange(width)[None] < torch.tensor(fed)[:, None]
        pos = self._block_index(group, [s.block_span[0] - ws for s, (ws, _) in zip(group, windows)])
        if self._windows is not None:
            logits = self._windows.window(group, ids, fed_mask, position_ids, pos)
        else:
            past, pasts, past_width = self._window_past.get(group, stack_past)
            key_mask = torch.cat([torch.arange(past_width)[None] < torch.tensor(pasts)[:, None], fed_mask], 1)
            logits, _ = block_logits(
                self.model,
                ids.to(self.device),
                pos,
                attention_mask=key_mask.to(self.device),
                position_ids=position_ids.to(self.device),
                past_key_values=past,
            )
        self.forwards += 1
        for s, n in zip(group, fed):
            s.steps += 1
            s.tokens_fed += n
        return logits

    def _commit(self, group, logits):
        """Predict and choose per row (vectorised where settings allow), then write the commits."""
        rows, width = logits.shape[:2]
        # every row's current block, padded with -1 (never the mask id) to the widest block
        blocks = pad_sequence([s.x[slice(*s.block_span)] for s in group], batch_first=True, padding_value=-1)
        blocks = torch.nn.functional.pad(blocks, (0, width - blocks.shape[1]), value=-1)
        masked = blocks == self.mask_id
        greedy = [
            r for r, s in enumerate(group) if s.cfg.temperature == 0 and s.cfg.remasking == "low_confidence"
        ]
        if len(greedy) == rows:
            x0, conf = predict(logits, 0.0, "low_confidence", mask_id=self.mask_id)
        else:
            x0 = torch.zeros(rows, width, dtype=torch.long)
            conf = torch.zeros(rows, width, dtype=torch.float64)
            for r, s in enumerate(group):  # each request draws from its own generator: batch-invariant
                n = s.cfg.block_length
                ids, c = predict(
                    logits[r : r + 1, :n],
                    s.cfg.temperature,
                    s.cfg.remasking,
                    s.generator,
                    self.mask_id,
                    s.cfg.top_k,
                    s.cfg.top_p,
                )
                x0[r, :n], conf[r, :n] = ids[0], c[0]
        x0, conf = x0.cpu(), conf.cpu()
        count = torch.tensor([s.count_now() for s in group])
        nan = float("nan")
        threshold = torch.tensor(
            [nan if s.cfg.threshold is None else s.cfg.threshold for s in group], dtype=torch.float64
        )
        factor = torch.tensor(
            [nan if s.cfg.factor is None else s.cfg.factor for s in group], dtype=torch.float64
        )
        transfer = select_transfer(conf, masked, count, threshold, factor)
        new = torch.where(transfer, x0, blocks)
        still_masked = (new == self.mask_id).any(-1).tolist()
        for r, s in enumerate(group):
            s.commit(new[r, : s.cfg.block_length], still_masked[r])

    # ---- asyncio interface ------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        """Background task: step while there is work, dispatch events to each request's queue."""
        while True:
            if not self.has_unfinished():
                self._wake.clear()
                try:
                    await asyncio.to_thread(self.release_finished)
                except Exception:  # noqa: BLE001 - best effort: a dead worker shows in the health check
                    pass
                if not self.has_unfinished():
                    await self._wake.wait()
                continue
            self.step_started = time.monotonic()
            try:
                events = await asyncio.to_thread(self.step)
                self.failed_steps = 0
            except Exception:  # retry row by row: only the rows that fail alone are dropped
                try:
                    events, failed, advanced = await asyncio.to_thread(self._isolate)
                except Exception as err:  # noqa: BLE001 - the isolation itself broke: fail everything
                    events, failed, advanced = [], {rid: err for rid in self._queues}, False
                    with self._lock:
                        self.active.clear()
                        self._pending.clear()
                # Every row failing, several steps running, means the engine (not a request) is broken.
                self.failed_steps = 0 if advanced else self.failed_steps + 1
                if self.failed_steps >= self.max_failed_steps and failed:
                    self.failure = next(iter(failed.values()))
                for rid, err in failed.items():
                    queue = self._queues.get(rid)
                    if queue is not None:
                        queue.put_nowait(err)
            finally:
                self.step_started = None
            for event in events:
                queue = self._queues.get(event.request_id)
                if queue is not None:
                    queue.put_nowait(event)

    async def stream(
        self, prompt, config: DecodingConfig | None = None, request_id: str | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Yield this request's events as its final prefix grows; the last has ``finished`` set.
        Leaving early (break + ``aclose()``, or task cancellation) cancels the request."""
        self._ensure_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = self.add_request(prompt, config, request_id)
        self._queues[rid] = queue
        self._wake.set()
        done = False
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                done = event.finished
                yield event
                if done:
                    return
        finally:
            self._queues.pop(rid, None)
            if not done:
                self.cancel(rid)

    async def generate(
        self, prompt, config: DecodingConfig | None = None, request_id: str | None = None
    ) -> RequestOutput:
        """Decode one request to completion (batched with whatever else is in flight)."""
        async for event in self.stream(prompt, config, request_id):
            if event.finished:
                return event.output
        raise RuntimeError("stream ended without a final event")

    async def shutdown(self) -> None:
        """Stop the background task; requests still in flight are dropped."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
