"""Expert-parallel masked diffusion (LLaDA-MoE): window caches kept on the workers vs sent per forward.

One expert-parallel model (2 Ray workers, 1 CPU each, experts split in two, gloo all-to-all) and
the continuous-batching Engine at batch 32 with the dual cache: a block's full pass computes every
position, its cached steps feed the block and read the rest from the cache. A tiny LLaDA-MoE with
random weights, 32 prompts of 128-384 tokens, 64 answer tokens in blocks of 32 decoded in 16 steps
(LLaDA's fixed schedule, 4 tokens per step: each block is one full pass and 7 cached steps; a
random model's confidences would make threshold decoding all or nothing), every answer the full
64 tokens:

- ours: each request pinned to one worker, which keeps its cache outside the window
  (``WindowHolder``); a step sends token ids, masks and positions, and gets hidden states back at
  the block's positions only;
- baseline: the engine keeps the caches, so every full pass brings every position's keys/values
  back from the workers and every cached step sends the rows' caches out again (the path before).

Same workers, interleaved, medians over ``--repeats`` runs of the whole prompt set (the
``bench_ep_block_cache`` harness). Quality: both sides' answers are compared token for token with
the single-process Engine's. Bytes are the keys/values that crossed processes.
"""

from __future__ import annotations

import os
import time

import torch

from bench_ep_block_cache import on_two_workers, report
from common import ROOT
from diffmoe.generation import DecodingConfig, Engine
from diffmoe.model import LLaDAMoEModelLM, named_config

MASK, EOS = 1, 2
GEN, BLOCK, THRESHOLD, PROMPTS = 64, 32, 0.9, 32
DECODING = DecodingConfig(
    gen_length=GEN, block_length=BLOCK, threshold=THRESHOLD, cache="dual", ignore_eos=True
)


def model() -> LLaDAMoEModelLM:
    torch.manual_seed(0)
    cfg = named_config(
        "tiny", vocab_size=512, max_position_embeddings=512, mask_token_id=MASK, eos_token_id=EOS
    )
    return LLaDAMoEModelLM(cfg).eval()


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(128, 385, (PROMPTS,), generator=g).tolist()
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]


def run(ep_model, ps, keep: bool):
    ep_model.keeps_row_caches = keep  # read when the engine is built
    engine = Engine(ep_model, max_batch_size=32, mask_id=MASK, eos_id=EOS)
    before = ep_model.model.bytes
    t0 = time.perf_counter()
    outs = engine.run(ps, DECODING)
    return (
        time.perf_counter() - t0,
        [o.token_ids for o in outs],
        engine.forwards,
        ep_model.model.bytes - before,
    )


def main() -> None:
    m, ps = model(), prompts()
    reference = [o.token_ids for o in Engine(m, max_batch_size=32).run(ps, DECODING)]
    rows = on_two_workers(m, lambda ep, keep: run(ep, ps, keep), reference, GEN * len(ps))
    report(
        "ep_window_cache",
        "expert-parallel Engine (2 workers) that takes every full pass's keys/values back from the "
        "workers and sends the rows' caches with every cached step",
        rows,
        {
            "model": "LLaDA-MoE tiny (random), fp32, vocab 512, 8 experts over 2 workers",
            "prompts": len(ps),
            "decoding": DECODING.model_dump(include={"gen_length", "block_length", "steps", "cache"}),
        },
    )


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
