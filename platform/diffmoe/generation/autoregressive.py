"""Autoregressive decoding for the causal twin (``config.causal``) inside the same ``Engine``.

The AR twin is the diffusion backbone with a causal mask and next-token loss; serving it with the
same engine, batching and server makes the comparison honest. Each request keeps the ``Sequence``
canvas (prompt + ``gen_length`` [MASK] slots) and fills it strictly left to right, so
``Sequence.collect`` (final prefix, EOS / stop ids, ``max_tokens``, stop strings) works unchanged.

Per engine step (``ARStepper``):
- prefill: requests without a cache share one right-padded forward over their prompts
  (``use_cache``); the next token comes from each row's last prompt position;
- decode: the others share one forward that feeds only their last committed token at its true
  position and attends to their own KV cache, kept in one preallocated buffer for the batch
  (``block_cache.BlockKVCache``, shorter caches' padding masked) where each step writes the new
  keys/values in place; the next token comes from that position (the AR shift).
The next token is the argmax at temperature 0, else a draw from softmax(logits / T) (Gumbel-max in
float64) with the request's own generator, so a request decodes the same tokens alone or batched.
Diffusion-only settings (``steps``, ``threshold``, ``factor``, ``cache``, ``remasking``) are ignored.
"""

from __future__ import annotations

import torch

from .block_cache import BlockKVCache, step_mask
from .remote_cache import RemoteRows
from .sampler import add_gumbel_noise, block_logits, top_k_top_p


class ARStepper:
    """Next-token steps for a batch over one preallocated cache (``block_cache.BlockKVCache``): a
    decode step writes each row's new keys/values in place, so no step restacks or copies the
    rows' caches (which grows with the context). Requests without a cache are prefilled in their
    own padded forward, without the cache: they take their prompt's keys/values along
    (``Sequence.past``) and join the cache at their first decode step, once."""

    def __init__(self, model, pad_id: int, device, prefill_apart: bool = True):
        self.model, self.pad_id, self.device = model, pad_id, device
        self.prefill_apart = prefill_apart  # on a model that keeps the caches (locally: always)
        self.cache = BlockKVCache()
        # A model that keeps the caches where it runs (``keeps_block_cache``: expert parallel)
        # is sent token ids and per-row lengths instead (``remote``: which rows it holds).
        self.remote = RemoteRows(model) if getattr(model, "keeps_block_cache", False) else None

    def step(self, group) -> int:
        """Advance every request of ``group`` by one token; return the number of forwards run."""
        if self.remote is not None:
            return self._step_kept(group)
        forwards = 0
        fresh = [s for s in group if not s.cached]
        cached = [s for s in group if s.cached]
        for part, is_prefill in ((cached, False), (fresh, True)):
            if not part:
                continue
            if is_prefill:
                logits = self._prefill(part)
            else:
                part = self.cache.bind(part)  # slot order; rows that left took their cache along
                logits = self._decode(part)
            forwards += 1
            for s, token in zip(part, choose(part, logits)):
                s.append(token)
        return forwards

    def _step_kept(self, group) -> int:
        """One step on a model that keeps the caches: each row feeds its prompt (first step) or
        its last token, and its worker stores what it fed (``HeldRows``: the same layout as here,
        causal as blocks of 1). With ``prefill_apart`` each worker feeds prompts in a forward apart
        from the single tokens (the ranks agree on how many forwards), as the local path does;
        without, they share one forward as wide as the longest prompt being prefilled."""
        spans = [(s.next_pos - 1, s.next_pos) if s.cached else (0, s.plen) for s in group]
        ids = torch.full((len(group), max(e - b for b, e in spans)), self.pad_id, dtype=torch.long)
        for r, (s, (b, e)) in enumerate(zip(group, spans)):
            ids[r, : e - b] = s.x[b:e]
        fed = [e - b for b, e in spans]
        last = torch.tensor(fed)[:, None] - 1
        logits = self.remote.block_logits(group, ids, spans, [1] * len(group), fed, last, self.prefill_apart)
        for s, n in zip(group, fed):
            s.steps += 1
            s.tokens_fed += n
        for s, token in zip(group, choose(group, logits[:, 0])):
            s.append(token)
        return self.remote.forwards

    def release_finished(self) -> None:
        """Evict finished rows' caches from a model that keeps them (the engine is going idle)."""
        if self.remote is not None:
            self.remote.release_finished()

    def _prefill(self, group) -> torch.Tensor:
        """One padded pass over the prompts; each row keeps its prompt's cache to take along."""
        lengths = [s.plen for s in group]
        ids = torch.full((len(group), max(lengths)), self.pad_id, dtype=torch.long)
        for r, s in enumerate(group):
            ids[r, : s.plen] = s.x[: s.plen]
        key_mask = torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]
        last = torch.tensor(lengths)[:, None] - 1
        logits, kv = block_logits(
            self.model,
            ids.to(self.device),
            last.to(self.device),
            attention_mask=key_mask.to(self.device),
            use_cache=True,
        )
        for r, s in enumerate(group):
            s.past = [(k[r : r + 1, :, : s.plen], v[r : r + 1, :, : s.plen]) for k, v in kv]
            s.cached = s.plen
            s.steps += 1
            s.tokens_fed += s.plen
        return logits[:, 0]

    def _decode(self, group) -> torch.Tensor:
        """Feed each row's last committed token at its true position against its own cache."""
        rows = len(group)
        past = self.cache.views(1)
        cached = torch.tensor([s.cached for s in group])
        mask = step_mask(
            cached,
            torch.ones(rows, dtype=torch.long),
            torch.ones(rows, dtype=torch.long),
            cached,
            1,
            past[0][0].shape[2],
        )
        ids = torch.tensor([[int(s.x[s.next_pos - 1])] for s in group])
        logits, kv = block_logits(
            self.model,
            ids.to(self.device),
            torch.zeros(rows, 1, dtype=torch.long, device=self.device),
            attention_mask=mask.to(self.device),
            position_ids=cached[:, None].to(self.device),
            past_key_values=past,
            use_cache=True,
        )
        for r, s in enumerate(group):
            self.cache.store(r, s.cached, [(k[r : r + 1], v[r : r + 1]) for k, v in kv])
            s.cached += 1
            s.steps += 1
            s.tokens_fed += 1
        return logits[:, 0]


def choose(group, logits: torch.Tensor) -> list[int]:
    """Next token per row: argmax, or a temperature draw from the request's own generator."""
    if all(s.cfg.temperature == 0 for s in group):
        return logits.argmax(-1).tolist()
    out = []
    for r, s in enumerate(group):
        row = logits[r].double()
        if s.cfg.temperature > 0 and (s.cfg.top_k is not None or s.cfg.top_p is not None):
            keep = top_k_top_p(row / s.cfg.temperature, s.cfg.top_k, s.cfg.top_p).isfinite()
            row = row.masked_fill(~keep, float("-inf"))
        out.append(int(add_gumbel_noise(row, s.cfg.temperature, s.generator).argmax(-1)))
    return out
