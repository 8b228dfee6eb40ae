"""Exact match on a checkable task, decoded by the serving ``Engine``: the figure the benchmarks
report and the one a training run can stop on (``train.check``).

Prompts are task examples in the chat layout the SFT rows use. Each answer canvas is the rest of a
training row (``seq_len`` minus the prompt; whole blocks for a block-diffusion model), decoded with
threshold decoding and stopped at EOS or the chat template's end of turn, so the figure measures what
a user of the served model would get.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .config import DecodingConfig
from .engine import Engine
from .tasks import TASKS, Example, score


def make_task(name: str, min_digits: int, max_digits: int):
    """A task of ``TASKS`` by name (addition takes only ``max_digits``; lookup reads 2 digits per key)."""
    if name in ("reverse", "sort", "lookup"):
        return TASKS[name](min_digits=min_digits, max_digits=max_digits)
    return TASKS[name](max_digits=max_digits)


def chat_prompts(tokenizer, examples: Sequence[Example]) -> list[list[int]]:
    """Each example's prompt as one user turn plus the assistant header, as token ids."""
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": ex.prompt}], add_generation_prompt=True, tokenize=True
            )["input_ids"]
        )
        for ex in examples
    ]


def answer_decoding(
    seq_len: int,
    prompt_len: int,
    stop_ids: list[int],
    *,
    threshold: float | None,
    cache: str,
    temperature: float = 0.0,
    block_length: int | None = None,
) -> DecodingConfig:
    """The rest of a ``seq_len`` row as one block, or in blocks of ``block_length`` (the canvas
    rounded up to whole blocks); an autoregressive model ignores the diffusion settings."""
    gen = seq_len - prompt_len
    if block_length:
        gen = -(-gen // block_length) * block_length
    return DecodingConfig(
        gen_length=gen,
        block_length=block_length or gen,
        threshold=threshold,
        cache=cache,
        temperature=temperature,
        stop_token_ids=stop_ids,
        seed=0,
    )


def engine_accuracy(
    model,
    tokenizer,
    special,
    examples: Sequence[Example],
    prompts: list[list[int]],
    configs: list[DecodingConfig],
    max_batch_size: int = 32,
) -> dict:
    """Exact match of ``model`` on ``examples`` (prompts and settings given), with the decoding
    speed of the same run: answer tokens per forward and offline tokens/s."""
    engine = Engine(
        model, tokenizer, max_batch_size=max_batch_size, mask_id=special.mask_id, eos_id=special.eos_id
    )
    start = time.perf_counter()
    outs = engine.run(prompts, configs)
    seconds = time.perf_counter() - start
    result = score(examples, [o.text for o in outs])
    tokens = sum(len(o.token_ids) for o in outs)
    result.update(
        answer_tokens=tokens,
        offline_seconds=round(seconds, 3),
        offline_tokens_per_s=tokens / max(seconds, 1e-9),
        forwards_per_token=engine.forwards / max(tokens, 1),
        # per request: answer tokens (EOS included) per forward it took part in (parallel decoding)
        tokens_per_step=sum(len(o.token_ids) + 1 for o in outs) / max(sum(o.steps for o in outs), 1),
    )
    return result
