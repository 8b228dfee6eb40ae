"""One in-flight request: its canvas, where it is in its block schedule, its cache, and its answer.

The ``Engine`` batches many of these. Each step a sequence says what it needs (``wants_full_pass``
and ``window``), receives the logits of its current block, commits tokens (``commit``), and reports
what became final (``collect``): the answer's final prefix, cut at EOS / stop ids, ``max_tokens``
and stop strings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..rng import device_generator
from .config import DecodingConfig
from .sampler import transfer_schedule
from .streaming import TextStream


@dataclass
class StreamEvent:
    """What became final for one request in one engine step. ``token_ids`` / ``text`` are deltas;
    the last event of a request has ``finished`` set and carries the whole ``output``."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS, stop id or stop string), "length", "cancelled"
    output: RequestOutput | None = None


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]  # the answer, without EOS
    text: str
    finish_reason: str
    prompt_tokens: int
    steps: int  # forward passes this request took part in
    tokens_fed: int = 0  # positions it fed to the model over all its steps
    timings: dict[str, float] = field(default_factory=dict)  # seconds: queued, first_token, total


class WindowCut:
    """One row's cache outside its window, cut from a batched pass's keys/values when first read.

    Reads like the list of per-layer (k, v) [1, heads, P, head_dim] it stands for. Until then it
    only references the batch's tensors (which the other rows of that pass share)."""

    def __init__(self, kv, row: int, length: int, window: tuple[int, int]):
        self._source, self._row, self._length, self._window = kv, row, length, window
        self._layers = None

    def _cut(self):
        if self._layers is None:
            r, (ws, we), n = self._row, self._window, self._length
            self._layers = [
                tuple(torch.cat([t[r : r + 1, :, :ws], t[r : r + 1, :, we:n]], 2) for t in layer)
                for layer in self._source
            ]
            self._source = None  # the batch's tensors can go once every row has cut its part
        return self._layers

    def __getitem__(self, layer):
        return self._cut()[layer]

    def __len__(self) -> int:
        return len(self._cut())

    def __iter__(self):
        return iter(self._cut())


def stack_past(group) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int], int]:
    """Per layer (k, v) of all rows, right-padded to the longest cache; plus each row's length."""
    lengths = [s.past[0][0].shape[2] for s in group]
    width = max(lengths)
    past = []
    for layer in range(len(group[0].past)):
        kv = []
        for i in (0, 1):
            parts = [s.past[layer][i] for s in group]
            if any(p.shape[2] != width for p in parts):
                parts = [F.pad(p, (0, 0, 0, width - p.shape[2])) for p in parts]
            kv.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        past.append(tuple(kv))
    return past, lengths, width


class PastStack:
    """The stacked caches of a batch, rebuilt only when some row holds a different cache object.

    Inside a block a diffusion row's cache does not change from step to step, so restacking every
    row's keys/values (a copy of all of them) on every step is waste; this keeps the last stack
    (its memory: one more copy of the batch's caches) and reuses it while the rows are the same."""

    def __init__(self):
        self._rows: list | None = None
        self._value = None

    def get(self, group, build):
        rows = [s.past for s in group]
        if (
            self._rows is None
            or len(rows) != len(self._rows)
            or any(a is not b for a, b in zip(rows, self._rows))
        ):
            self._value, self._rows = build(group), rows
        return self._value

    def clear(self) -> None:
        self._rows = self._value = None


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        cfg: DecodingConfig,
        *,
        mask_id: int,
        end_ids: set[int],
        tokenizer=None,
        device: torch.device | str = "cpu",
    ):
        self.id, self.cfg, self.mask_id = request_id, cfg, mask_id
        self.end_ids = set() if cfg.ignore_eos else set(end_ids) | set(cfg.stop_token_ids)
        self.plen = len(prompt)
        self.x = torch.tensor(prompt + [mask_id] * cfg.gen_length, dtype=torch.long)
        # the sampler's draws fill tensors on the model's device: the generator must live there too
        self.generator = device_generator(device, cfg.seed)
        self.block = 0
        self.step_in_block = 0
        self.schedule = (
            None
            if cfg.parallel
            else transfer_schedule(torch.tensor([cfg.block_length]), cfg.steps_per_block)[0]
        )
        self.past = None  # per layer (k, v) [1, kv_heads, P, head_dim]: cached positions outside the window
        self.cached = 0  # positions whose keys/values are in the engine's preallocated cache (AR, LLaDA2)
        self.cache_key: str | None = None  # its cache's name where the model keeps the cache
        self.dropped = False  # left the engine unfinished (its step failed)
        self.final_len = 0  # answer positions decoded without a gap from the start
        self.next_pos = self.plen  # autoregressive decoding: the next canvas position to fill
        self.stream = TextStream(tokenizer, cfg.stop)
        self.steps = 0
        self.tokens_fed = 0
        self.finish_reason: str | None = None
        self.created = time.perf_counter()
        self.admitted: float | None = None
        self.first_token: float | None = None

    @property
    def length(self) -> int:
        return self.x.shape[0]

    @property
    def block_span(self) -> tuple[int, int]:
        start = self.plen + self.block * self.cfg.block_length
        return start, start + self.cfg.block_length

    @property
    def window(self) -> tuple[int, int]:
        """Positions fed on a cached step: the block, plus the suffix (prefix cache) or ``vicinity``."""
        bs, be = self.block_span
        if self.cfg.cache == "prefix":
            return bs, self.length
        return bs, min(be + self.cfg.vicinity, self.length)

    def wants_full_pass(self) -> bool:
        cfg = self.cfg
        if cfg.cache == "none" or self.past is None or self.step_in_block == 0:
            return True
        return cfg.refresh_every is not None and self.step_in_block % cfg.refresh_every == 0

    def keep_cache(self, kv, row: int) -> None:
        """After a full pass: keep this row's keys/values outside the window (``kv``: the batch's
        per-layer (k, v) [R, heads, width, head_dim], this row at ``row``). The cut is made only if
        a cached step reads it: a row that finishes its block in one pass never pays for it."""
        if self.cfg.cache == "none":
            return
        self.past = WindowCut(kv, row, self.length, self.window)

    def count_now(self) -> int:
        """Tokens the fixed schedule commits this step, -1 for threshold / factor decoding."""
        return -1 if self.schedule is None else int(self.schedule[self.step_in_block])

    def commit(self, block: torch.Tensor, still_masked: bool) -> None:
        """Write the current block after this step's commits (the engine merges them for the whole
        batch at once) and advance the schedule; a block without masks moves on to the next."""
        bs, be = self.block_span
        self.x[bs:be] = block
        self.step_in_block += 1
        if not still_masked:
            self.block += 1
            self.step_in_block = 0
            self.past = None  # the next block starts with a full refresh

    def append(self, token: int) -> None:
        """Autoregressive decoding: write the next answer token (strictly left to right). The block
        bookkeeping advances as blocks fill so ``collect`` works unchanged; the KV cache is kept."""
        pos = self.next_pos
        self.x[pos] = token
        self.next_pos = pos + 1
        if self.next_pos >= self.block_span[1]:
            self.block += 1
            self.step_in_block = 0
        else:
            self.step_in_block += 1

    def collect(self) -> StreamEvent | None:
        """Advance the final prefix, decide whether the request is done, return what is new."""
        cfg = self.cfg
        final_len = self._final_length()
        if final_len is None:
            return None
        self.final_len = final_len
        final = self.x[self.plen : self.plen + self.final_len].tolist()
        reason = None
        end = next((i for i, t in enumerate(final) if t in self.end_ids), None)
        if end is not None:
            final, reason = final[:end], "stop"
        if cfg.max_tokens is not None and len(final) >= cfg.max_tokens:
            if reason is None or end > cfg.max_tokens:
                reason = "length"
            final = final[: cfg.max_tokens]
        if reason is None and self.final_len == cfg.gen_length:
            reason = "length"
        new_ids, new_text, stopped = self.stream.update(final, final=reason is not None)
        if stopped:
            reason = "stop"
        if reason is not None:
            return self.finish(reason, new_ids, new_text)
        if not new_ids and not new_text:
            return None
        if self.first_token is None:
            self.first_token = time.perf_counter()
        return StreamEvent(self.id, new_ids, new_text)

    def _final_length(self) -> int | None:
        """Answer positions decoded without a gap from the start; None when nothing is new."""
        if self.block >= self.cfg.num_blocks:
            return self.cfg.gen_length
        # the final prefix can only end inside the current block
        tail = self.x[self.plen + self.final_len : self.block_span[1]].tolist()
        gap = tail.index(self.mask_id) if self.mask_id in tail else len(tail)
        return None if gap == 0 else self.final_len + gap

    def finish(self, reason: str, new_ids=(), new_text: str = "") -> StreamEvent:
        self.finish_reason = reason
        self.past = None
        now = time.perf_counter()
        timings = {"total": now - self.created}
        if self.admitted is not None:
            timings["queued"] = self.admitted - self.created
        if self.first_token is not None or new_ids:
            timings["first_token"] = (self.first_token or now) - self.created
        out = RequestOutput(
            request_id=self.id,
            token_ids=list(self.stream.token_ids),
            text=self.stream.text,
            finish_reason=reason,
            prompt_tokens=self.plen,
            steps=self.steps,
            tokens_fed=self.tokens_fed,
            timings=timings,
        )
        return StreamEvent(self.id, list(new_ids), new_text, True, reason, out)
