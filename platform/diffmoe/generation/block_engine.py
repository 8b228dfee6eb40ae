"""Block diffusion (LLaDA2.x) inside the continuous-batching ``Engine``.

Each request is a ``BlockSequence``: its canvas is the prompt plus [MASK] up to a block boundary,
blocks aligned to absolute positions (the prompt's last partial block is its first answer block).
Per engine step every active request, whatever block it is in, takes one denoising step of its
current block in one padded forward:

- it feeds its current block, plus the finished block (or, on admission, the prompt's whole blocks)
  whose keys/values are not cached yet: those are computed exactly once, folded into that forward,
  unless most of the batch feeds one block only: then a row's finished block is cached in a step of
  its own rather than padding every row to two blocks (``unpadded_spans``);
- it attends to its own cache of finished positions (caches right-padded to the longest and the
  padding masked) and, inside what it feeds, block-causally (a position sees its block and earlier);
- rows admitted this step whose prompts span more than two blocks run in a second forward of their
  own (``block_cache.feed_parts``), so that a long prompt arriving does not pad every decoding
  row of the batch to its length (an expert-parallel model's ranks, which step in lockstep, each
  cut their own rows and agree on how many forwards the step takes); a prompt longer than
  ``prefill_chunk`` positions is cached over several steps, ``prefill_chunk`` at a time, before
  its first denoising step (chunked prefill: one step's mask and activations stay bounded whatever
  the prompt's length);
- the step's commits follow ``block_diffusion.commit_block`` (threshold, k per step, editing).

A finished block never changes again, so streaming (``collect``) emits each block when it is final,
editing included. Decoding is per row: at temperature 0 a request decodes the same tokens alone, in
any batch, and as ``generate_blocks`` does for it alone.

Cache: the batch's finished positions live in one preallocated buffer per layer (``block_cache``);
each forward writes the fed positions' keys/values into it and attends to views, so no step copies
the cache; a finished block's keys/values are stored once, when it is fed for the last time. A model
that keeps the cache itself (``keeps_block_cache``: the expert-parallel stand-in, whose workers hold
it) is sent each row's ``RowPlan`` instead, and finished rows are evicted from it.
"""

from __future__ import annotations

import torch

from .block_cache import BlockKVCache, forward_on_cache, step_parts
from .block_diffusion import commit_block, sample_tokens
from .remote_cache import RemoteRows
from .sampler import block_logits, transfer_schedule
from .sequence import Sequence


class BlockSequence(Sequence):
    """A request decoded by block diffusion (see the module docstring)."""

    def __init__(self, request_id, prompt, cfg, **kwargs):
        super().__init__(request_id, prompt, cfg, **kwargs)
        bl = cfg.block_length
        total = -(-(self.plen + cfg.gen_length) // bl) * bl
        self.x = torch.cat([self.x, torch.full((total - self.x.shape[0],), self.mask_id, dtype=torch.long)])
        self.block = self.plen // bl  # absolute index of the block being decoded
        self.num_blocks = total // bl
        self.pending = (0, self.block * bl)  # positions fed once and then cached: the prompt's whole blocks
        self.post = 0  # editing steps after the block's last mask
        # tokens to commit at least per step, the same for every block (LLaDA2.0 ``steps``:
        # ``block_length`` split over them, at most the masks left); None: one
        self.schedule = None
        if cfg.steps is not None:
            self.schedule = transfer_schedule(torch.tensor([bl]), cfg.steps_per_block)[0]

    @property
    def block_span(self) -> tuple[int, int]:
        bl = self.cfg.block_length
        return self.block * bl, (self.block + 1) * bl

    def fed_span(self, chunk: int | None = None) -> tuple[int, int]:
        """Positions this step feeds: what is pending (uncached), then the current block. With more
        than ``chunk`` of them, only the next whole blocks of the pending ones, ``chunk`` at most
        (one block at least): a step that prefills and does not denoise (``prefilling``)."""
        bs, be = self.block_span
        if self.pending is None:
            return bs, be
        start = self.pending[0]
        if chunk is None or be - start <= chunk:
            return start, be
        bl = self.cfg.block_length
        return start, min(bs, start + max(bl, chunk // bl * bl))

    def prefilling(self, span: tuple[int, int]) -> bool:
        return span[1] <= self.block_span[0]

    def min_commits(self) -> int:
        if self.schedule is None:
            return 1
        return int(self.schedule[min(self.step_in_block, self.schedule.shape[0] - 1)])

    def advance(self, block: torch.Tensor, still_masked: bool, changed: bool) -> None:
        """Write this step's block; move on to the next block when this one is final (no mask left
        and, with editing, nothing rewritten or the post-decoding steps used up)."""
        cfg = self.cfg
        bs, be = self.block_span
        self.x[bs:be] = block
        self.step_in_block += 1
        if still_masked:
            return
        if cfg.editing_threshold is not None and changed:
            self.post += 1  # the next step would be a post-decoding editing step
            if self.post <= cfg.max_post_steps:
                return
        self.pending = (bs, be)  # final: cached by the next forward
        self.block += 1
        self.step_in_block, self.post = 0, 0

    def _final_length(self) -> int | None:
        """Answer positions in finished blocks (they never change again)."""
        done = min(self.cfg.gen_length, max(0, self.block * self.cfg.block_length - self.plen))
        if self.block >= self.num_blocks:
            done = self.cfg.gen_length
        return None if done == self.final_len and done < self.cfg.gen_length else done


def unpadded_spans(group, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The step's spans when most decoding rows feed just their block and a few feed two, their
    previous block having just finished (its keys/values are computed once, folded into the next
    block's first step): the few feed only the finished block this step (cached, no denoising) and
    denoise from the next, rather than every row being padded to two blocks, which nearly doubles
    the tokens of a large batch's step. The computation is the same, so are the answers; those rows
    take one step more per block. Rows feeding a prompt (more than two blocks) run in a forward of
    their own (``block_cache.feed_parts``) and are left alone; a lone row is never split."""
    fed = [e - b for b, e in spans]
    narrow = [r for r, s in enumerate(group) if fed[r] <= s.cfg.block_length]
    if not narrow:
        return spans
    width = max(fed[r] for r in narrow)
    wide = [r for r, s in enumerate(group) if width < fed[r] <= 2 * s.cfg.block_length]
    if not wide or len(wide) >= len(narrow):
        return spans
    spans = list(spans)
    for r in wide:
        spans[r] = group[r].fed_span(group[r].cfg.block_length)
    return spans


class BlockStepper:
    """Runs one denoising step for a batch of ``BlockSequence``s over the batch's ``BlockKVCache``."""

    def __init__(self, model, device, prefill_apart: bool = True, prefill_chunk: int | None = None):
        self.model, self.device = model, device
        self.prefill_apart, self.prefill_chunk = prefill_apart, prefill_chunk
        self.cache = BlockKVCache()
        # A model that keeps the cache where it runs (``keeps_block_cache``: the expert-parallel
        # stand-in) is sent token ids and per-row lengths instead (``remote``: which rows it holds).
        self.remote = RemoteRows(model) if getattr(model, "keeps_block_cache", False) else None

    def step(self, group) -> int:
        """One step for every row of ``group``; returns the number of forwards: more than 1 when
        rows feeding a prompt run apart from the decoding rows (``block_cache.feed_parts``)."""
        if self.remote is None:
            group = self.cache.bind(group)  # rows in slot order from here on
        rows = len(group)
        spans = unpadded_spans(group, [s.fed_span(self.prefill_chunk) for s in group])
        width = max(e - b for b, e in spans)
        ids = torch.full((rows, width), group[0].mask_id, dtype=torch.long)
        for r, (s, (b, e)) in enumerate(zip(group, spans)):
            ids[r, : e - b] = s.x[b:e]
        fed_n = [e - b for b, e in spans]
        fed = torch.tensor(fed_n)
        stores = [
            min(e, s.block_span[0]) - b if s.pending is not None else 0 for s, (b, e) in zip(group, spans)
        ]
        block_width = max(s.cfg.block_length for s in group)
        starts = torch.tensor([s.block_span[0] - b for s, (b, _) in zip(group, spans)])
        index = torch.minimum(starts[:, None] + torch.arange(block_width)[None], fed[:, None] - 1)
        lengths = [s.cfg.block_length for s in group]
        if self.remote is not None:
            logits = self.remote.block_logits(group, ids, spans, lengths, stores, index, self.prefill_apart)
            forwards = self.remote.forwards
        else:

            def run(lo, hi, part, **kwargs):
                return block_logits(self.model, part, index[lo:hi].to(self.device), **kwargs)

            parts = forward_on_cache(
                self.cache,
                group,
                ids,
                [b for b, _ in spans],
                fed_n,
                lengths,
                stores,
                run,
                self.device,
                step_parts(fed_n, lengths, self.prefill_apart),
            )
            logits, forwards = torch.cat(parts), len(parts)
        live = []  # rows that denoise this step: not only prefilling a long prompt's blocks
        for r, (s, (b, e)) in enumerate(zip(group, spans)):
            s.steps += 1
            s.tokens_fed += e - b
            if s.prefilling((b, e)):
                s.pending = (e, s.block_span[0])  # the rest of the prompt: next steps
            else:
                s.pending = None  # whatever was pending is cached now
                live.append(r)
        if live:
            self._choose_and_commit([group[r] for r in live], logits[live])
        return forwards

    def release_finished(self) -> None:
        """Evict finished rows' caches now rather than at the next step (the engine is going idle)."""
        if self.remote is not None:
            self.remote.release_finished()

    def _choose_and_commit(self, group, logits) -> None:
        """Predict per row (batched at temperature 0), then commit all rows in one call."""
        mask_id, n = group[0].mask_id, logits.shape[1]
        if all(s.cfg.temperature == 0 for s in group):
            x0, conf = sample_tokens(logits, 0.0, mask_id=mask_id)
        else:
            picks = [
                sample_tokens(logits[r], s.cfg.temperature, s.cfg.top_k, s.cfg.top_p, s.generator, mask_id)
                for r, s in enumerate(group)
            ]
            x0, conf = torch.stack([p[0] for p in picks]), torch.stack([p[1] for p in picks])
        x0, conf = x0.cpu(), conf.cpu()
        rows = len(group)
        blocks = torch.full((rows, n), mask_id, dtype=torch.long)
        fixed = torch.ones(rows, n, dtype=torch.bool)  # columns past a shorter block: never written
        for r, s in enumerate(group):
            bs, be = s.block_span
            blocks[r, : be - bs] = s.x[bs:be]
            fixed[r, : be - bs] = torch.arange(bs, be) < s.plen
        padded = torch.arange(n)[None] >= torch.tensor([s.cfg.block_length for s in group])[:, None]
        conf = conf.masked_fill(padded, -1.0)  # padding columns are never chosen
        blocks = blocks.masked_fill(padded, -1)  # not a mask, and fixed: never written
        inf = float("inf")
        threshold = torch.tensor([[inf if s.cfg.threshold is None else s.cfg.threshold] for s in group])
        editing = torch.tensor(
            [[inf if s.cfg.editing_threshold is None else s.cfg.editing_threshold] for s in group]
        )
        k = torch.tensor([s.min_commits() for s in group])
        new, change = commit_block(blocks, fixed, x0, conf, mask_id, threshold, k, editing)
        still_masked = (new == mask_id).any(-1).tolist()
        changed = change.any(-1).tolist()
        for r, s in enumerate(group):
            s.advance(new[r, : s.cfg.block_length], still_masked[r], changed[r])
