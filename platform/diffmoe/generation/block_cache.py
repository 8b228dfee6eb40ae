"""The Engine's key/value cache for block diffusion: one preallocated buffer per layer for the batch.

Layout: per layer a key and a value buffer [slots, kv_heads, capacity, head_dim]. Slot r holds the
r-th request of the batch; its finished positions sit at [0, cached_r). A forward feeds each row's
positions at [W, W + fed) with W = the longest cache of the batch: the model writes them there
(``append_in_place``) and attends to views of [0, W + fed), so no step copies the cache. Between a
shorter row's cache end and W lies padding, masked by the engine. When a row's block is final, its
keys/values move to [cached_r, cached_r + block), in place already for the longest row.

Rows join at the end; a row that leaves frees its slot by moving the last row into it (one row copied,
once). A row that leaves unfinished (stepped alone after a failed batch) takes a copy of its cache
along (``Sequence.past``) and brings it back when it rejoins. Capacity grows geometrically, copying
what is cached, so a long request costs a handful of copies over its lifetime rather than one per step.

Why preallocated rather than paged: attention here is SDPA, which takes one dense [B, H, L, D] key
tensor; pages would have to be gathered into such a tensor every forward, the very copy this avoids.
A paged layout pays off with a paged attention kernel (FlashInfer, flash-attn's block tables on GPU),
which this engine does not use yet. A model that computes remotely (the expert-parallel stand-in)
keeps the cache where it computes instead (``HeldRows``, one per worker, rows pinned by ``RowRouter``)
and is sent only ``RowPlan``s: no key or value crosses processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class _LayerView:
    """One layer's cache for one forward: behaves as the (k, v) pair of the cached region (so code
    that unpacks or reads shapes works unchanged) and appends this call's keys/values in place."""

    def __init__(self, cache: BlockKVCache, layer: int, width: int, lo: int, hi: int):
        self.cache, self.layer, self.width, self.lo, self.hi = cache, layer, width, lo, hi

    def _buffers(self):
        return self.cache.keys[self.layer], self.cache.values[self.layer]

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        if i not in (0, 1):
            raise IndexError(i)
        return self._buffers()[i][self.lo : self.hi, :, : self.width]

    def __iter__(self):
        return iter((self[0], self[1]))

    def append_in_place(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the fed positions after the cached region; return views of cached + fed."""
        kb, vb = self._buffers()
        rows, end = slice(self.lo, self.hi), self.width + k.shape[2]
        kb[rows, :, self.width : end] = k
        vb[rows, :, self.width : end] = v
        return kb[rows, :, :end], vb[rows, :, :end]


class BlockKVCache:
    """Slots of the batch's rows and their keys/values (see the module docstring)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.slots: list = []  # the sequences, in slot order

    @property
    def rows(self) -> int:
        return len(self.slots)

    def bind(self, group) -> list:
        """Make the slots hold exactly ``group``; return it in slot order (the order to feed rows)."""
        present = {id(s) for s in group}
        for s in [s for s in self.slots if id(s) not in present]:
            self._leave(s)
        held = {id(s) for s in self.slots}
        for s in group:
            if id(s) not in held:
                self._join(s)
        return list(self.slots)

    def views(self, fed_width: int, lo: int = 0, hi: int | None = None) -> list[_LayerView] | None:
        """Per layer the cache of slots [lo, hi) as the model's ``past_key_values`` for a forward
        feeding ``fed_width`` positions per row; None while those rows have nothing cached."""
        hi = self.rows if hi is None else hi
        width = max((s.cached for s in self.slots[lo:hi]), default=0)
        if width == 0 or not self.keys:
            return None
        self._reserve(self.rows, width + fed_width)
        return [_LayerView(self, i, width, lo, hi) for i in range(len(self.keys))]

    def store(self, slot: int, start: int, new) -> None:
        """Keep ``new`` (per layer (k, v) [1, kv_heads, n, head_dim], this row's newly final
        positions) as positions [start, start + n) of ``slot``."""
        if not self.keys:
            self._allocate(new, max(len(self.slots), 1), start + new[0][0].shape[2])
        self._reserve(self.rows, start + new[0][0].shape[2])
        for (kb, vb), (k, v) in zip(zip(self.keys, self.values), new):
            n = k.shape[2]
            kb[slot, :, start : start + n] = k[0]
            vb[slot, :, start : start + n] = v[0]

    def _allocate(self, like, slots: int, length: int) -> None:
        self.keys = [torch.zeros(_shape(k, slots, length), dtype=k.dtype, device=k.device) for k, _ in like]
        self.values = [torch.zeros(_shape(v, slots, length), dtype=v.dtype, device=v.device) for _, v in like]

    def _reserve(self, slots: int, length: int) -> None:
        """Grow the buffers (geometrically, copying what is cached) to hold ``slots`` x ``length``."""
        have_slots, have_len = self.keys[0].shape[0], self.keys[0].shape[2]
        if slots <= have_slots and length <= have_len:
            return
        new_slots = max(slots, have_slots if slots <= have_slots else 2 * have_slots)
        new_len = max(length, have_len if length <= have_len else have_len + have_len // 2)
        # what is cached so far (a row joining with a longer cache counts before it is stored)
        keep = min(max((s.cached for s in self.slots), default=0), have_len)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                grown = old.new_zeros(_shape(old, new_slots, new_len))
                grown[: old.shape[0], :, :keep] = old[:, :, :keep]
                buffers[i] = grown

    def _join(self, s) -> None:
        self.slots.append(s)
        if s.past is not None:  # rejoining with the cache it took along
            self.store(len(self.slots) - 1, 0, s.past)
            s.past = None

    def _leave(self, s) -> None:
        slot, last = self.slots.index(s), len(self.slots) - 1
        if self.keys and s.finish_reason is None and s.cached:  # may rejoin: take the cache along
            s.past = [
                (k[slot : slot + 1, :, : s.cached].clone(), v[slot : slot + 1, :, : s.cached].clone())
                for k, v in zip(self.keys, self.values)
            ]
        if slot != last and self.keys:
            moved = self.slots[last].cached
            for kb, vb in zip(self.keys, self.values):
                kb[slot, :, :moved] = kb[last, :, :moved]
                vb[slot, :, :moved] = vb[last, :, :moved]
        self.slots[slot] = self.slots[last]
        self.slots.pop()


def _shape(t: torch.Tensor, slots: int, length: int) -> tuple[int, int, int, int]:
    return slots, t.shape[1], length, t.shape[3]


def step_mask(begin, fed, block_lengths, cached, width: int, past_width: int) -> torch.Tensor:
    """Bool [R, 1, width, past_width + width] of one block-diffusion step (True = attend): each row's
    cached positions [0, cached_r), then, among the ``fed_r`` positions it feeds from absolute
    position ``begin_r``, its own block and earlier ones (block-causal). Tensors [R], on the CPU."""
    pos = begin[:, None] + torch.arange(width)[None]
    block = pos // block_lengths[:, None]
    current = (block[:, None, :] <= block[:, :, None]) & (torch.arange(width)[None] < fed[:, None])[
        :, None, :
    ]
    old = torch.arange(past_width)[None] < cached[:, None]
    return torch.cat([old[:, None, :].expand(-1, width, -1), current], -1)[:, None]


def feed_parts(fed: list[int], block_width: int) -> list[tuple[int, int]]:
    """The forwards of one step, as slot ranges: rows that feed a prompt (more than two blocks: just
    admitted, or a long prompt's next chunk) apart from rows that only decode (a block, or a block
    and the finished one), else every decoding row would be padded to the prompt's width. Runs of
    consecutive slots, so each forward reads a contiguous slice of the cache (newly admitted rows
    are the last slots: usually two forwards)."""
    wide = [n > 2 * block_width for n in fed]
    cuts = [r for r in range(1, len(fed)) if wide[r] != wide[r - 1]]
    bounds = [0, *cuts, len(fed)]
    return list(zip(bounds[:-1], bounds[1:]))


def step_parts(fed: list[int], block_lengths: list[int], apart: bool) -> list[tuple[int, int]]:
    """The forwards of a step: ``feed_parts`` when ``apart``, else one over every row."""
    return feed_parts(fed, max(block_lengths)) if apart else [(0, len(fed))]


def forward_on_cache(cache: BlockKVCache, rows, ids, begin, fed, block_lengths, stores, run, device, parts):
    """One block-diffusion step of ``rows`` (the cache's slots, in slot order) feeding ``ids``
    [R, width] from absolute positions ``begin``: per part (slot ranges: ``step_parts``) build
    the mask and positions, call
    ``run(lo, hi, ids, attention_mask=, position_ids=, past_key_values=, use_cache=)`` -> (out, kv),
    and keep the first ``stores[r]`` fed positions' keys/values. Returns the parts' outputs."""
    outs = []
    for lo, hi in parts:
        width = max(fed[lo:hi])
        past = cache.views(width, lo, hi)
        past_width = 0 if past is None else past[0][0].shape[2]
        b = torch.tensor(begin[lo:hi])
        mask = step_mask(
            b,
            torch.tensor(fed[lo:hi]),
            torch.tensor(block_lengths[lo:hi]),
            torch.tensor([row.cached for row in rows[lo:hi]]),
            width,
            past_width,
        )
        out, kv = run(
            lo,
            hi,
            ids[lo:hi, :width].to(device),
            attention_mask=mask.to(device),
            position_ids=(b[:, None] + torch.arange(width)[None]).to(device),
            past_key_values=past,
            use_cache=any(stores[lo:hi]),
        )
        for r in range(lo, hi):
            if stores[r]:  # keep the keys/values of the positions fed once
                n = stores[r]
                cache.store(
                    r,
                    rows[r].cached,
                    [(k[r - lo : r - lo + 1, :, :n], v[r - lo : r - lo + 1, :, :n]) for k, v in kv],
                )
                rows[r].cached += n  # now: a later row's store may grow the buffers, keeping [0, cached)
        outs.append(out)
    return outs


@dataclass
class RowPlan:
    """What a cache-keeping model needs to know of one row for one step (see ``HeldRows``)."""

    key: str  # the request id: rows are matched to their cache by it
    cached: int  # positions whose keys/values the cache holds (the model checks it agrees)
    fed: int  # positions this row feeds (the rest of the width is padding)
    begin: int  # absolute position of the first one fed
    block_length: int
    store: int = 0  # keep the first ``store`` fed positions' keys/values after this forward


class _HeldRow:
    """A row as ``BlockKVCache`` sees it, on the side that holds the cache."""

    def __init__(self, key: str):
        self.key, self.cached, self.finish_reason, self.past = key, 0, None, None


class HeldRows:
    """The block cache kept where the model runs (an expert-parallel worker), so that only token ids
    and per-row lengths travel per step, never keys/values: a ``BlockKVCache`` over rows known by
    request id. A row absent from a step keeps its cache (``BlockKVCache`` takes it along) until the
    engine evicts it."""

    def __init__(self):
        self.cache = BlockKVCache()
        self.rows: dict[str, _HeldRow] = {}
        self.forwards = 0  # forwards the last step ran (dummies included)

    def evict(self, keys) -> None:
        """Drop these rows' caches; with no row left the buffers go too (an idle worker holds none)."""
        for key in keys:
            row = self.rows.pop(key, None)
            if row is not None:
                row.finish_reason, row.past = "evicted", None  # leaves the slots without a copy
        if not self.rows:
            self.cache = BlockKVCache()
        else:
            self.cache.bind([row for row in self.cache.slots if row.key in self.rows])

    def step(self, backbone, ids, plans: list[RowPlan], apart: bool = False, agree=None) -> torch.Tensor:
        """Run ``backbone`` on ``ids`` [R, width] (row r planned by ``plans[r]``) over the held
        cache; store what the plans say; return the final hidden states [R, width, hidden].

        ``apart``: rows feeding a prompt run apart from decoding rows (``feed_parts``), as in the
        engine's own cache. Expert-parallel ranks step in lockstep (each MoE layer's all-to-all
        couples their forwards), and each rank cuts its own rows, so ``agree(n)`` returns the most
        forwards any rank runs this step and this rank pads its n with one-token dummy forwards
        (``forwards`` holds the agreed count afterwards)."""
        rows = [self.rows.setdefault(p.key, _HeldRow(p.key)) for p in plans]
        for row, p in zip(rows, plans):
            if row.cached > p.cached:  # a step the engine saw fail (on another rank) stored here
                row.cached = p.cached  # the engine feeds those positions again
            elif row.cached < p.cached:
                raise RuntimeError(
                    f"row {p.key!r}: the engine counts {p.cached} cached positions, this cache only {row.cached}"
                )
        at = {id(row): r for r, row in enumerate(rows)}
        slots = self.cache.bind(rows)
        order = [at[id(row)] for row in slots]  # slot order
        plans = [plans[r] for r in order]
        fed, lengths = [p.fed for p in plans], [p.block_length for p in plans]
        device = next(backbone.parameters()).device
        parts = step_parts(fed, lengths, apart)
        # agreed before any forward: every rank's k-th forward must meet the others' k-th
        self.forwards = agree(len(parts)) if agree is not None else len(parts)

        def run(lo, hi, part, **kwargs):
            out = backbone(part, **kwargs)
            return out.last_hidden_state, out.past_key_values

        hidden_parts = forward_on_cache(
            self.cache,
            slots,
            ids[order],
            [p.begin for p in plans],
            fed,
            lengths,
            [p.store for p in plans],
            run,
            device,
            parts,
        )
        for _ in range(self.forwards - len(parts)):
            backbone(ids[:1, :1].to(device))  # this rank's share of another rank's extra forward
        width = ids.shape[1]
        stacked = torch.cat([F.pad(h, (0, 0, 0, width - h.shape[1])) for h in hidden_parts])
        hidden = torch.empty_like(stacked)
        hidden[order] = stacked
        return hidden


def feeds_apart(plans: list[RowPlan]) -> bool:
    """Whether a step's rows (all ranks') mix prompt feeders and decoding rows (``feed_parts``)."""
    width = max(p.block_length for p in plans)
    wide = [p.fed > 2 * width for p in plans]
    return any(wide) and not all(wide)


class RowRouter:
    """Pins each row (by cache key) to one of ``ranks`` cache holders for its whole life, the least
    loaded when it first appears, so its cache never moves between ranks."""

    def __init__(self, ranks: int):
        self.ranks = ranks
        self.rank_of: dict[str, int] = {}
        self.load = [0] * ranks

    def route(self, plans: list[RowPlan], evict) -> tuple[list[list[int]], list[list[str]]]:
        """Per rank: the indices of ``plans`` it runs, and the evicted keys it held."""
        drops: list[list[str]] = [[] for _ in range(self.ranks)]
        for key in evict:
            rank = self.rank_of.pop(key, None)
            if rank is not None:
                drops[rank].append(key)
                self.load[rank] -= 1
        rows: list[list[int]] = [[] for _ in range(self.ranks)]
        for r, p in enumerate(plans):
            rank = self.rank_of.get(p.key)
            if rank is None:
                rank = min(range(self.ranks), key=self.load.__getitem__)
                self.rank_of[p.key] = rank
                self.load[rank] += 1
            rows[rank].append(r)
        return rows, drops
