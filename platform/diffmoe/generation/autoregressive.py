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
import torch.nn.functional as F

from .block_cache import BlockKVCache, step_mask
from .sampler import add_gumbel_noise, block_logits, top_k_top_p


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


class ARStepper:
    """Next-token steps for a batch over one preallocated cache (``block_cache.BlockKVCache``): a
    decode step writes each row's new keys/values in place, so no step restacks or copies the
    rows' caches (which grows with the context). Requests without a cache are prefilled in their
    own padded forward, without the cache: they take their prompt's keys/values along
    (``Sequence.past``) and join the cache at their first decode step, once."""

    def __init__(self, model, pad_id: int, device):
        self.model, self.pad_id, self.device = model, pad_id, device
        self.cache = BlockKVCache()

    def step(self, group) -> int:
        """Advance every request of ``group`` by one token; return the number of forwards run."""
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
