"""Block-diffusion decoding (LLaDA2.x): blocks of ``block_length`` tokens left to right, block-causal
attention, an exact KV cache of finished blocks, LLaDA2.1 token editing.

Blocks are aligned to absolute positions (prompt included), so the prompt's last partial block is
decoded as the first answer block and its prompt tokens are never changed. Inside the current block
each step predicts every position (top-1 and its probability, or a temperature / top-k / top-p
draw) and commits every masked position whose probability is strictly above ``threshold``, or, when
fewer than k are, the k most confident (ties to the leftmost). k is 1 by default (LLaDA2.1, and
LLaDA2.0 at its default steps == block_length); with ``steps`` it splits ``block_length`` evenly
over that many steps, at most the masks left (LLaDA2.0's schedule: the prompt's partial first block
takes the same per-step counts as a whole one, so it finishes in fewer steps). With
``editing_threshold`` (LLaDA2.1), decoded non-prompt tokens of the block whose new top-1 differs
with probability above it are rewritten too, and a block with no mask left gets at most
``max_post_steps`` further editing steps, ending early when a step changes nothing. After each
block, a row whose answer has no mask and holds an end token stops.

Because attention is block-causal, a finished block's keys and values never change: they are
computed once (folded into the next block's first forward) and reused, so the cached sampler equals
the uncached one (``use_cache=False``: the whole prefix recomputed every step) token for token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..rng import check_generator
from .sampler import top1, top_k_top_p, transfer_schedule

NEG_INF = float("-inf")


def block_causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, block_length: int) -> torch.Tensor:
    """Bool [1, 1, Q, K]: query position q may attend key position k iff block(k) <= block(q)."""
    return (k_pos[None, :] // block_length <= q_pos[:, None] // block_length)[None, None]


def sample_tokens(logits, temperature: float = 0.0, top_k=None, top_p=None, generator=None, mask_id=None):
    """Logits [..., V] -> (token ids, float64 probability of each under the sampling distribution).

    Temperature 0 is top-1 (its probability under the model's softmax). Otherwise logits / T are cut
    to the ``top_k`` best and the smallest set whose mass reaches ``top_p`` (the best token always
    kept), then drawn by Gumbel-max in float64. ``mask_id`` is never chosen: a committed mask would
    leave its position undecoded, and the block would never finish.
    """
    if temperature == 0:
        return top1(logits, mask_id)
    logits = logits.double()
    if mask_id is not None:
        logits = logits.clone()
        logits[..., mask_id] = NEG_INF
    logits = top_k_top_p(logits / temperature, top_k, top_p)
    u = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=logits.device)
    ids = (logits - torch.log(-torch.log(u))).argmax(-1)
    return ids, logits.softmax(-1).gather(-1, ids[..., None]).squeeze(-1)


def commit_block(block, fixed, x0, conf, mask_id: int, threshold: float, k, editing_threshold=None):
    """One step's writes for rows of a block. block/x0 [R, n] ids, conf [R, n], fixed [R, n] prompt
    positions, k [R] minimum commits. Returns (new block, bool [R, n] of changed positions)."""
    masked = block == mask_id
    above = masked & (conf > threshold)
    ranked, order = conf.masked_fill(~masked, NEG_INF).sort(dim=-1, descending=True, stable=True)
    k = torch.minimum(k, masked.sum(-1))
    top = torch.zeros_like(masked).scatter(
        1, order, torch.arange(block.shape[1], device=block.device) < k[:, None]
    )
    enough = above.sum(-1) >= k
    m2t = torch.where(enough[:, None], above, top & masked)
    change = m2t
    if editing_threshold is not None:
        change = change | (~masked & ~fixed & (x0 != block) & (conf > editing_threshold))
    return torch.where(change, x0, block), change


@torch.no_grad()
def generate_blocks(
    model,
    input_ids: torch.Tensor,
    *,
    gen_length: int = 128,
    block_length: int = 32,
    steps: int | None = None,
    threshold: float | None = 0.95,
    editing_threshold: float | None = None,
    max_post_steps: int = 16,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    mask_id: int,
    eos_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Decode ``gen_length`` tokens after equal-length prompts [B, P]; returns [B, P + gen_length].

    Rows that stopped at an end token have the rest of their canvas filled with that (first) id.
    ``stats``, when given, gets the number of forward passes and of tokens fed to the model.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, prompt_length], got shape {tuple(input_ids.shape)}")
    if block_length < 1 or gen_length < 1:
        raise ValueError(f"block_length={block_length} and gen_length={gen_length} must be >= 1")
    if steps is not None and steps < 1:
        raise ValueError(f"steps={steps} must be >= 1 (or None for one token at least per step)")
    if bool((input_ids == mask_id).any()):
        raise ValueError(f"the prompt contains mask_id={mask_id}; only the answer canvas is decoded")
    device = input_ids.device
    check_generator(generator, device, "generate_blocks")
    threshold = float("inf") if threshold is None else threshold  # None: k per step, no threshold
    eos = [] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id))
    batch, plen = input_ids.shape
    num_blocks = -(-(plen + gen_length) // block_length)
    total = num_blocks * block_length
    x = torch.full((batch, total), mask_id, dtype=torch.long, device=device)
    x[:, :plen] = input_ids
    fixed = torch.zeros(batch, total, dtype=torch.bool, device=device)
    fixed[:, :plen] = True
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    counter = {"forwards": 0, "tokens_fed": 0}
    run = _Forward(model, block_length, counter, use_cache)
    run.prefill(x[:, : (plen // block_length) * block_length])
    schedule = None  # the same for every block: ``block_length`` split over ``steps``
    if steps is not None:
        schedule = transfer_schedule(torch.full((batch,), block_length, device=device), steps)

    for b in range(plen // block_length, num_blocks):
        bs, be = b * block_length, (b + 1) * block_length
        step = 0
        post = torch.zeros(batch, dtype=torch.long, device=device)  # editing steps after the last mask
        active = ~done
        while bool(active.any()):
            block = x[:, bs:be]
            had_mask = (block == mask_id).any(-1)
            if editing_threshold is None:
                active = active & had_mask  # no editing: a block without masks is final
            else:
                post += (active & ~had_mask).long()
                active = active & (had_mask | (post <= max_post_steps))
            if not bool(active.any()):
                break
            logits = run.block_logits(x, bs, be)
            x0, conf = sample_tokens(logits, temperature, top_k, top_p, generator, mask_id)
            if schedule is None:
                k = torch.ones(batch, dtype=torch.long, device=device)
            else:
                k = schedule[:, min(step, schedule.shape[1] - 1)]
            new, change = commit_block(
                block, fixed[:, bs:be], x0, conf, mask_id, threshold, k, editing_threshold
            )
            change &= active[:, None]
            x[:, bs:be] = torch.where(change, new, block)
            # rows with no mask left and nothing edited this step have a final block
            still_masked = (x[:, bs:be] == mask_id).any(-1)
            active = active & (still_masked | (change.any(-1) & (editing_threshold is not None)))
            step += 1
        run.block_done(x, bs, be)
        if eos:
            answer = x[:, plen:be]
            has_end = torch.isin(answer, torch.tensor(eos, device=device)).any(-1)
            done |= has_end & ~(answer == mask_id).any(-1)
            if bool(done.all()):
                break
    out = x[:, : plen + gen_length]
    if eos:  # undecoded tail of stopped rows: the end token (as the LLaDA sampler does)
        out = torch.where(out == mask_id, torch.full_like(out, eos[0]), out)
    if stats is not None:
        stats.update(counter)
    return out


class _Forward:
    """The model calls of block decoding: with the cache, finished blocks' keys/values are kept and
    each step feeds only the current block (plus, once, the block just finished); without it, every
    step recomputes the whole prefix under the block-causal mask (the published reference)."""

    def __init__(self, model, block_length: int, counter: dict, use_cache: bool):
        self.model, self.bl, self.counter, self.use_cache = model, block_length, counter, use_cache
        self.past = None  # per layer (k, v) of every finished position
        self.pending = None  # (start, end) of a finished block not yet in the cache

    def _call(self, ids, start: int, mask, past, want_cache: bool):
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        kwargs = {"position_ids": pos.expand(ids.shape[0], -1), "use_cache": want_cache}
        if mask is not None:
            kwargs["attention_mask"] = mask.expand(ids.shape[0], -1, -1, -1)
        if past is not None:
            kwargs["past_key_values"] = past
        self.counter["forwards"] += 1
        self.counter["tokens_fed"] += ids.numel()
        out = self.model(ids, **kwargs)
        return out.logits, out.past_key_values

    def _append(self, kv, upto: int) -> None:
        new = [(k[:, :, :upto], v[:, :, :upto]) for k, v in kv]
        if self.past is None:
            self.past = new
        else:
            self.past = [
                (torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(self.past, new)
            ]

    def prefill(self, prefix: torch.Tensor) -> None:
        """Keys/values of the prompt's whole blocks, computed once under the block-causal mask."""
        if not self.use_cache or prefix.shape[1] == 0:
            return
        pos = torch.arange(prefix.shape[1], device=prefix.device)
        _, kv = self._call(prefix, 0, block_causal_mask(pos, pos, self.bl), None, True)
        self._append(kv, prefix.shape[1])

    def block_logits(self, x: torch.Tensor, bs: int, be: int) -> torch.Tensor:
        """Logits [B, block, V] of the current block [bs, be)."""
        if not self.use_cache:
            pos = torch.arange(be, device=x.device)
            logits, _ = self._call(x[:, :be], 0, block_causal_mask(pos, pos, self.bl), None, False)
            return logits[:, bs:be]
        start = bs if self.pending is None else self.pending[0]
        ids = x[:, start:be]
        mask = None
        if self.pending is not None:  # the finished block must not see the current one
            q = torch.arange(start, be, device=x.device)
            k = torch.arange(be, device=x.device)
            mask = block_causal_mask(q, k, self.bl)
        logits, kv = self._call(ids, start, mask, self.past, self.pending is not None)
        if self.pending is not None:
            self._append(kv, bs - start)
            self.pending = None
        return logits[:, bs - start :]

    def block_done(self, x: torch.Tensor, bs: int, be: int) -> None:
        if self.use_cache:
            self.pending = (bs, be)
