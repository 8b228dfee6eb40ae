"""LLaDA sampling for a batch of equal-length prompts: the reference sampler, Fast-dLLM parallel
decoding (confidence threshold, factor rule) and prefix / dual KV caches.

The answer starts as ``gen_length`` [MASK] tokens and is decoded block by block. Every step runs the
model, predicts each masked position of the current block (argmax, or Gumbel-max in float64 when
``temperature > 0``) and commits some of the predictions; committed tokens are never remasked.

Which predictions are committed:
- fixed schedule (LLaDA): the k most confident, k splitting the block evenly over its steps with the
  earlier steps taking the remainder; ``remasking="random"`` ranks by a random draw instead.
- ``threshold``: every prediction with confidence >= threshold, and at least the most confident one.
- ``factor``: the n most confident where the i-th best has confidence >= 1 - factor / (i + 1).

Caches: a full pass at each block start (and every ``refresh_every`` steps) stores every position's
keys and values; the other steps feed only a window and attend to the cached rest. The window is the
block and everything after it for ``prefix``, the block plus ``vicinity`` tokens for ``dual``.
Confidences are softmax probabilities in float64 so rankings are not decided by float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..rng import check_generator
from .config import DecodingConfig, check_prompt

NEG_INF = float("-inf")
# float64 elements one softmax chunk holds (128 MiB): at the LLaDA vocab of 157184 a batch-32 step's
# 1024 positions would take 1.3 GB as float64 logits and as much again for their softmax
SOFTMAX_CHUNK_ELEMENTS = 1 << 24


def position_chunks(logits: torch.Tensor) -> tuple[torch.Tensor, list[slice]]:
    """Logits [..., V] as [N, V] and slices of N holding at most ``SOFTMAX_CHUNK_ELEMENTS`` each."""
    flat = logits.reshape(-1, logits.shape[-1])
    rows = max(1, SOFTMAX_CHUNK_ELEMENTS // flat.shape[-1])
    return flat, [slice(s, s + rows) for s in range(0, flat.shape[0], rows)]


def chosen_probability(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float64 softmax probability of ``ids`` [...] under ``logits`` [..., V], a chunk at a time (each
    position's softmax is its own, so chunks change no value, only the peak memory)."""
    flat, chunks = position_chunks(logits)
    picked = ids.reshape(-1, 1)
    conf = torch.empty(picked.shape[0], dtype=torch.float64, device=logits.device)
    for c in chunks:
        conf[c] = flat[c].double().softmax(-1).gather(-1, picked[c]).squeeze(-1)
    return conf.view(ids.shape)


def top1(logits: torch.Tensor, mask_id=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 ids (never ``mask_id``) and their float64 softmax probability, a chunk of positions at a
    time (see ``position_chunks``)."""
    flat, chunks = position_chunks(logits)
    ids = torch.empty(flat.shape[0], dtype=torch.long, device=logits.device)
    conf = torch.empty(flat.shape[0], dtype=torch.float64, device=logits.device)
    for c in chunks:
        probs = flat[c].double().softmax(-1)
        if mask_id is not None:
            probs[:, mask_id] = -1.0
        torch.max(probs, -1, out=(conf[c], ids[c]))
    return ids.view(logits.shape[:-1]), conf.view(logits.shape[:-1])


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """LLaDA's ``exp(l) / (-log u) ** T`` in float64, taken in log form (same argmax, no overflow)."""
    if temperature == 0:
        return logits
    u = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=logits.device)
    return logits.double() - temperature * torch.log(-torch.log(u))


def top_k_top_p(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits with everything outside the ``top_k`` best and outside the smallest set whose
    probability mass reaches ``top_p`` set to -inf (the best token is always kept)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p  # the best token has mass 0 before it: kept
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), NEG_INF)
    return logits


def predict(
    logits: torch.Tensor,
    temperature: float,
    remasking: str,
    generator=None,
    mask_id=None,
    top_k: int | None = None,
    top_p: float | None = None,
):
    """Block logits [R, n, V] -> (predicted ids [R, n], float64 confidence [R, n]).

    ``mask_id`` is never predicted: a committed mask token would leave its position undecoded after
    the block's last scheduled step. ``top_k`` / ``top_p`` cut the sampling distribution
    (temperature > 0). Confidence stays the unmodified softmax of the chosen token."""
    if temperature == 0 and remasking == "low_confidence":
        return top1(logits, mask_id)
    filtered = logits
    if temperature > 0 and (top_k is not None or top_p is not None):  # cut at temperature, as usual
        keep = top_k_top_p(logits.double() / temperature, top_k, top_p).isfinite()
        filtered = logits.double().masked_fill(~keep, NEG_INF)
    noisy = add_gumbel_noise(filtered, temperature, generator)
    if mask_id is not None:
        noisy = noisy.clone() if noisy is logits else noisy
        noisy[..., mask_id] = NEG_INF
    x0 = noisy.argmax(-1)
    if remasking == "low_confidence":
        conf = chosen_probability(logits, x0)
    elif remasking == "random":
        conf = torch.rand(x0.shape, dtype=torch.float64, generator=generator, device=x0.device)
    else:
        raise ValueError(f"remasking={remasking!r}: use 'low_confidence' or 'random'")
    return x0, conf


def transfer_schedule(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's tokens per step [R, steps]: an even split, the first ``count % steps`` steps get one more."""
    base = masked_count[:, None] // steps
    extra = torch.arange(steps, device=masked_count.device)[None] < (masked_count % steps)[:, None]
    return base + extra.long()


def select_transfer(conf, masked, count=None, threshold=None, factor=None) -> torch.Tensor:
    """Bool [R, n]: the masked positions to commit this step.

    Per row, ``count`` (int, >= 0) gives a fixed number; where it is negative or absent, ``threshold``
    or ``factor`` (float, NaN = unused) decide and at least one token is committed. Ties go to the
    leftmost position.
    """
    rows, n = conf.shape
    if _threshold_only(count, threshold, factor):
        # every row decides by threshold: the committed set is the masked positions at or above it,
        # or the most confident one (leftmost of ties) where none is; no sort needed
        candidates = conf.masked_fill(~masked, NEG_INF)
        transfer = candidates >= threshold.to(conf.device)[:, None]
        best = torch.zeros_like(transfer).scatter(1, candidates.argmax(-1, keepdim=True), True)
        return torch.where(transfer.any(-1, keepdim=True), transfer, best) & masked
    ranked, order = conf.masked_fill(~masked, NEG_INF).sort(dim=-1, descending=True, stable=True)
    num = torch.full((rows,), -1, dtype=torch.long) if count is None else count.long().clone()
    if threshold is not None:
        use = (num < 0) & ~threshold.isnan()
        num = torch.where(use, (ranked >= threshold[:, None]).sum(-1).clamp_min(1), num)
    if factor is not None:
        use = (num < 0) & ~factor.isnan()
        rank = torch.arange(1, n + 1, dtype=torch.float64, device=conf.device)
        ok = ranked >= 1.0 - factor[:, None].double() / (rank + 1.0)
        num = torch.where(use, ok.long().cumprod(-1).sum(-1).clamp_min(1), num)
    if bool((num < 0).any()):
        raise ValueError("select_transfer: a row has neither a count nor a threshold/factor")
    take = torch.arange(n, device=conf.device)[None] < num[:, None]
    transfer = torch.zeros_like(masked).scatter(1, order, take)
    return transfer & masked


def _threshold_only(count, threshold, factor) -> bool:
    if threshold is None or bool(threshold.isnan().any()):
        return False
    if count is not None and bool((count >= 0).any()):
        return False
    return factor is None or bool(factor.isnan().all())


def at_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``states`` [R, L, D] at ``positions`` [R, n] (indices into each row) -> [R, n, D]."""
    positions = positions.to(states.device)
    return states.gather(1, positions[..., None].expand(-1, -1, states.shape[-1]))


def block_logits(model, ids, positions, **kwargs):
    """Run the model on ``ids``; return logits only at ``positions`` ([R, n] indices into the input)
    and the layer caches. Computing the LM head only where needed matters for a 157k vocabulary."""
    if hasattr(model, "model") and hasattr(model, "lm_head"):
        out = model.model(ids, **kwargs)
        hidden = out.last_hidden_state
        return model.lm_head(at_positions(hidden, positions)), out.past_key_values
    out = model(ids, **kwargs)
    logits = out.logits
    return at_positions(logits, positions), out.past_key_values


def finished_rows(answer: torch.Tensor, mask_id: int, eos_ids) -> torch.Tensor:
    """Bool [R]: an end token is committed and everything before it is decoded."""
    n = answer.shape[1]
    idx = torch.arange(n, device=answer.device).expand_as(answer)
    first_mask = torch.where(answer == mask_id, idx, n).min(-1).values
    is_end = torch.isin(answer, torch.as_tensor(list(eos_ids), device=answer.device))
    first_end = torch.where(is_end, idx, n).min(-1).values
    return first_end < first_mask


class _Runner:
    """Full passes and cached window passes for one batch, counting what the model was fed."""

    def __init__(self, model, key_mask, stats):
        self.model, self.key_mask, self.stats = model, key_mask, stats
        self.past = self.past_mask = None

    def _count(self, ids):
        if self.stats is not None:
            self.stats["forwards"] = self.stats.get("forwards", 0) + 1
            self.stats["tokens_fed"] = self.stats.get("tokens_fed", 0) + ids.numel()

    def full(self, ids, bs, be, window=None):
        """One pass over everything; with ``window=(ws, we)`` keep the keys/values outside it."""
        self._count(ids)
        pos = torch.arange(bs, be, device=ids.device).expand(ids.shape[0], -1)
        logits, kv = block_logits(
            self.model, ids, pos, attention_mask=self.key_mask, use_cache=window is not None
        )
        if window is not None:
            ws, we = window
            self.past = [
                (torch.cat([k[:, :, :ws], k[:, :, we:]], 2), torch.cat([v[:, :, :ws], v[:, :, we:]], 2))
                for k, v in kv
            ]
            if self.key_mask is not None:
                self.past_mask = torch.cat([self.key_mask[:, :ws], self.key_mask[:, we:]], 1)
        return logits

    def window(self, ids, bs, be, ws, we):
        """Feed only ``ids[:, ws:we]`` at their true positions; attend to the cached rest."""
        fed = ids[:, ws:we]
        self._count(fed)
        rows = ids.shape[0]
        position_ids = torch.arange(ws, we, device=ids.device).expand(rows, -1)
        mask = None
        if self.key_mask is not None:
            mask = torch.cat([self.past_mask, self.key_mask[:, ws:we]], 1)
        pos = torch.arange(bs - ws, be - ws, device=ids.device).expand(rows, -1)
        logits, _ = block_logits(
            self.model, fed, pos, attention_mask=mask, position_ids=position_ids, past_key_values=self.past
        )
        return logits


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    gen_length: int,
    steps: int | None,
    block_length: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int,
    attention_mask: torch.Tensor | None = None,
    cfg_scale: float = 0.0,
    threshold: float | None = None,
    factor: float | None = None,
    cache: str = "none",
    refresh_every: int | None = None,
    vicinity: int = 0,
    eos_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    stats: dict | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """LLaDA's ``generate``: returns [B, prompt + gen_length] with the prompt unchanged.

    ``attention_mask`` [B, prompt] marks real prompt tokens (left padding); as in the reference,
    positions are not shifted for padding. ``eos_id`` (one id or several; not in the reference) stops
    once every row has an end token with everything before it decoded; the undecoded rest is filled
    with that (first) id. ``stats``, when
    given, is filled with the number of forward passes and of tokens fed to the model.
    """
    cfg = DecodingConfig(
        gen_length=gen_length,
        steps=steps,
        block_length=block_length,
        temperature=temperature,
        remasking=remasking,
        cfg_scale=cfg_scale,
        threshold=threshold,
        factor=factor,
        cache=cache,
        refresh_every=refresh_every,
        vicinity=vicinity,
        top_k=top_k,
        top_p=top_p,
    )
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, prompt_length], got shape {tuple(input_ids.shape)}")
    batch, plen = input_ids.shape
    check_prompt(getattr(model, "config", None), plen, gen_length)
    if bool((input_ids == mask_id).any()):
        raise ValueError(f"the prompt contains mask_id={mask_id}; only the answer canvas is decoded")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, plen):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, plen)}")

    device = input_ids.device
    check_generator(generator, device, "generate")
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :plen] = input_ids
    key_mask = None
    if attention_mask is not None:
        key_mask = torch.cat(
            [
                attention_mask.to(device),
                torch.ones(batch, gen_length, dtype=attention_mask.dtype, device=device),
            ],
            1,
        )
        if cfg_scale > 0:
            key_mask = torch.cat([key_mask, key_mask])
    runner = _Runner(model, key_mask, stats)
    nan = torch.full((batch,), float("nan"), dtype=torch.float64, device=device)
    end_ids = [] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id))
    thr = nan if threshold is None else torch.full_like(nan, threshold)
    fac = nan if factor is None else torch.full_like(nan, factor)
    total = x.shape[1]

    for blk in range(cfg.num_blocks):
        bs, be = plen + blk * block_length, plen + (blk + 1) * block_length
        ws, we = bs, (total if cache == "prefix" else min(be + vicinity, total))
        if not cfg.parallel:
            schedule = transfer_schedule((x[:, bs:be] == mask_id).sum(1), cfg.steps_per_block)
        step = 0
        while True:
            masked = x[:, bs:be] == mask_id
            if not bool(masked.any()) or (not cfg.parallel and step >= cfg.steps_per_block):
                break
            count = None if cfg.parallel else schedule[:, step]
            if count is not None and not bool((count > 0).any()):
                step += 1  # the reference runs this step but it commits nothing
                continue
            inputs = x
            if cfg_scale > 0:
                uncond = x.clone()
                uncond[:, :plen] = mask_id
                inputs = torch.cat([x, uncond])
            if cache == "none":
                logits = runner.full(inputs, bs, be)
            elif step == 0 or (refresh_every is not None and step % refresh_every == 0):
                logits = runner.full(inputs, bs, be, window=(ws, we))
            else:
                logits = runner.window(inputs, bs, be, ws, we)
            if cfg_scale > 0:
                cond, uncond_logits = logits.chunk(2)
                logits = uncond_logits + (cfg_scale + 1) * (cond - uncond_logits)
            x0, conf = predict(logits, temperature, remasking, generator, mask_id, top_k, top_p)
            transfer = select_transfer(conf, masked, count, thr, fac)
            x[:, bs:be] = torch.where(transfer, x0, x[:, bs:be])
            step += 1
            if end_ids and bool(finished_rows(x[:, plen:], mask_id, end_ids).all()):
                x[x == mask_id] = end_ids[0]
                return x
    return x
