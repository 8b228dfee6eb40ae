"""Caches kept where the model runs: the engine's side and the holder's side.

An expert-parallel replica's workers compute every layer's keys and values, so a cache kept on the
replica has to cross processes twice per use: back after the pass that computes it, out again with
every pass that reads it. A model that says it keeps caches (``keeps_block_cache`` for block
diffusion, ``keeps_row_caches`` for masked diffusion) is instead sent token ids, masks and small
per-row plans, and keeps each row's cache on the worker the row is pinned to for its life
(``block_cache.RowRouter``). The engine remembers which rows a model holds (``RemoteRows``) and
evicts those that finished or failed.

Masked diffusion (LLaDA-MoE, dual or prefix cache): a block's full pass computes every position;
each row keeps what lies outside its window (``RowKeep``), and the block's cached steps feed the
window and read that (``WindowHolder`` on the worker; ``HeldPast`` stands in for it in the
engine's ``Sequence.past``). Hidden states come back only at the rows' block positions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .block_cache import RowPlan
from .sampler import at_positions
from .sequence import PastStack, WindowCut, stack_past


class RemoteRows:
    """The engine's record of the rows whose caches the model keeps, by cache key."""

    def __init__(self, model):
        self.model = model
        self.held: dict = {}  # cache key -> sequence
        self._keys = itertools.count()

    def keys_of(self, group) -> tuple[list[str], list[str]]:
        """Each row's cache key (unique for the engine's life, unlike a client's request id) and
        the keys of held rows, not in ``group``, that finished or failed: to evict."""
        for s in group:
            if s.cache_key is None:
                s.cache_key = f"{s.id}#{next(self._keys)}"
        keys = [s.cache_key for s in group]
        evict = self._gone(set(keys))
        self.held.update(zip(keys, group))
        return keys, evict

    def _gone(self, present=frozenset()) -> list[str]:
        gone = [k for k, s in self.held.items() if k not in present and (s.finish_reason or s.dropped)]
        for key in gone:
            del self.held[key]
        return gone

    def block_logits(self, group, ids, spans, block_lengths, stores, index, apart=False) -> torch.Tensor:
        """One step on a model that keeps block caches (``HeldRows`` on its workers; LLaDA2.x,
        and the AR twin as blocks of 1): row r feeds ``ids[r]`` = positions ``spans[r]`` and its
        holder stores the first ``stores[r]`` of them; ``apart``: prompt feeders in forwards of
        their own (``forwards``: how many ran). Logits at ``index`` (LM head here)."""
        keys, evict = self.keys_of(group)
        plans = [
            RowPlan(key, s.cached, e - b, b, length, store)
            for key, s, (b, e), length, store in zip(keys, group, spans, block_lengths, stores)
        ]
        hidden = self.model.block_step(ids, plans, evict, apart)
        self.forwards = getattr(self.model, "step_forwards", 1)
        for s, store in zip(group, stores):
            s.cached += store  # the holder stored them
        return self.model.lm_head(at_positions(hidden, index))

    def release_finished(self) -> None:
        """Evict finished rows' caches now rather than at the next step (the engine is going idle)."""
        gone = self._gone()
        if gone:
            self.model.release(gone)


@dataclass
class RowKeep:
    """What a full pass keeps of one row: the cache outside ``window`` of its ``length`` positions
    (the rest of the batch's width is padding); ``window`` None keeps nothing (cache "none")."""

    key: str
    length: int
    window: tuple[int, int] | None


@dataclass
class HeldPast:
    """``Sequence.past`` of a row whose cache the model keeps: its key and how many positions."""

    key: str
    length: int


class RemoteWindows(RemoteRows):
    """Masked-diffusion forwards on a model that keeps each row's window cache (engine side)."""

    def full(self, group, ids, key_mask, index) -> torch.Tensor:
        """A full pass; rows with a cache keep it on their worker. Logits at ``index`` [R, n]."""
        keys, evict = self.keys_of(group)
        keeps = [
            RowKeep(key, s.length, None if s.cfg.cache == "none" else s.window) for key, s in zip(keys, group)
        ]
        hidden = self.model.window_full(ids, key_mask, index.cpu(), keeps, evict)
        for s, keep in zip(group, keeps):
            if keep.window is not None:
                s.past = HeldPast(keep.key, keep.length - (keep.window[1] - keep.window[0]))
        return self.model.lm_head(hidden)

    def window(self, group, ids, fed_mask, positions, index) -> torch.Tensor:
        """A cached step: each row feeds its window and reads the cache its worker keeps."""
        keys, evict = self.keys_of(group)
        pasts = [s.past for s in group]
        if any(not isinstance(p, HeldPast) or p.key != k for p, k in zip(pasts, keys)):
            raise RuntimeError("a cached step for a row whose cache the model does not hold")
        hidden = self.model.window_cached(ids, fed_mask, positions, index.cpu(), pasts, evict)
        return self.model.lm_head(hidden)


class _Row:
    """What ``stack_past`` reads of a row."""

    __slots__ = ("past",)

    def __init__(self, past):
        self.past = past


class WindowHolder:
    """Rows' window caches where the model runs (an expert-parallel worker), by cache key."""

    def __init__(self):
        self.pasts: dict[str, WindowCut] = {}
        self._stack = PastStack()  # the block's cached steps reuse one stacking of the same rows

    def evict(self, keys) -> None:
        for key in keys:
            self.pasts.pop(key, None)
        self._stack.clear()

    def full(self, backbone, ids, key_mask, index, keeps: list[RowKeep]) -> torch.Tensor:
        """Run ``backbone`` on whole rows, keep each row's cache outside its window; return the
        final hidden states at ``index`` [R, n]."""
        device = next(backbone.parameters()).device
        use_cache = any(k.window is not None for k in keeps)
        out = backbone(ids.to(device), attention_mask=key_mask.to(device), use_cache=use_cache)
        for r, keep in enumerate(keeps):
            if keep.window is None:
                self.pasts.pop(keep.key, None)
            else:
                self.pasts[keep.key] = WindowCut(out.past_key_values, r, keep.length, keep.window)
        return at_positions(out.last_hidden_state, index)

    def cached(self, backbone, ids, fed_mask, positions, index, rows: list[HeldPast]) -> torch.Tensor:
        """Run ``backbone`` on the rows' windows over the caches kept here (``fed_mask``: the fed
        positions that are not padding); return the final hidden states at ``index``."""
        missing = [r.key for r in rows if r.key not in self.pasts]
        if missing:
            raise RuntimeError(f"no cache kept here for rows {missing}: a full pass must come first")
        past, lengths, width = self._stack.get([_Row(self.pasts[r.key]) for r in rows], stack_past)
        if lengths != [r.length for r in rows]:
            raise RuntimeError(f"cache lengths {lengths} differ from the engine's {[r.length for r in rows]}")
        mask = torch.cat([torch.arange(width)[None] < torch.tensor(lengths)[:, None], fed_mask], 1)
        device = next(backbone.parameters()).device
        out = backbone(
            ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            past_key_values=past,
        )
        return at_positions(out.last_hidden_state, index)
