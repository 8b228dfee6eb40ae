"""In-process stand-ins for an expert-parallel replica whose ranks keep the caches.

``ExpertParallelModel`` (``diffmoe.serve.expert_parallel``) does this with Ray actors; here the
holders the workers use (``HeldRows``, ``WindowHolder``) live in the test process, rows pinned by
the same ``RowRouter``, the backbone and LM head of one real model. Every tensor sent to a rank is
recorded, so a test can check that no key or value crossed.
"""

from __future__ import annotations

import torch

from diffmoe.generation.block_cache import HeldRows, RowRouter, feeds_apart
from diffmoe.generation.remote_cache import WindowHolder


class KeepsCaches(torch.nn.Module):
    """What the engine sees of an expert-parallel model (see the module docstring)."""

    keeps_block_cache = True  # block diffusion and the AR twin: ``block_step``
    keeps_row_caches = True  # masked diffusion: ``window_full`` / ``window_cached``

    def __init__(self, model, ranks: int = 2):
        super().__init__()
        self.backbone, self.lm_head, self.config = model.model, model.lm_head, model.config
        self.held = [HeldRows() for _ in range(ranks)]
        self.windows = [WindowHolder() for _ in range(ranks)]
        self.router = RowRouter(ranks)
        self.sent: list = []  # what crossed to the ranks: tensors and per-row plans

    def _on_ranks(self, run, items, evict, *tensors):
        rows, drops = self.router.route(items, evict)
        out = None
        for rank, (idx, drop) in enumerate(zip(rows, drops)):
            self.release_on(rank, drop)
            if idx:
                parts = [t[idx] for t in tensors]
                mine = [items[i] for i in idx]
                self.sent += [*parts, *mine]
                part = run(rank, *parts, mine)
                out = part.new_empty(len(items), *part.shape[1:]) if out is None else out
                out[idx] = part
        return out

    def block_step(self, ids, plans, evict, apart=False):
        apart = apart and feeds_apart(plans)  # as ExpertParallelModel decides it
        forwards = []

        def run(rank, ids, plans):  # the ranks run one after the other here: nothing to agree on
            out = self.held[rank].step(self.backbone, ids, plans, apart)
            forwards.append(self.held[rank].forwards)
            return out

        out = self._on_ranks(run, plans, evict, ids)
        self.step_forwards = max(forwards)
        return out

    def window_full(self, ids, key_mask, index, keeps, evict):
        run = lambda r, *a: self.windows[r].full(self.backbone, *a)  # noqa: E731
        return self._on_ranks(run, keeps, evict, ids, key_mask, index)

    def window_cached(self, ids, fed_mask, positions, index, rows, evict):
        run = lambda r, *a: self.windows[r].cached(self.backbone, *a)  # noqa: E731
        return self._on_ranks(run, rows, evict, ids, fed_mask, positions, index)

    def release_on(self, rank: int, keys) -> None:
        self.held[rank].evict(keys)
        self.windows[rank].evict(keys)

    def release(self, keys):
        _, drops = self.router.route([], keys)
        for rank, drop in enumerate(drops):
            self.release_on(rank, drop)

    def holds_nothing(self) -> bool:
        return (
            not any(h.rows or h.cache.slots for h in self.held)
            and not any(w.pasts for w in self.windows)
            and not self.router.rank_of
            and not any(self.router.load)
        )
