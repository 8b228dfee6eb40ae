"""Block diffusion (LLaDA2.x): admitted prompts fed apart from the decoding rows, or with them.

When a request joins the Engine's batch it feeds its prompt's whole blocks once (their keys/values
are cached from then on). Fed in the same padded forward as the rows already decoding, every one of
those rows is padded to the prompt's length for that step; the Engine feeds such rows in a forward
of their own (``Engine(prefill_apart=True)``, the default). Side by side in one run, same tiny
LLaDA2 model and 32 prompts of 128-384 tokens as bench_block_diffusion.py, 64 answer tokens in blocks
of 32, threshold 0.95, fp32 on this CPU:

- ``queue``: all 32 requests queued at once, a batch of 8: requests join as others finish;
- ``arrivals``: one request arriving every ``--gap`` engine steps (batch up to 32): the online
  serving shape, where most steps see a decoding batch and some see a new prompt join it.

Baseline: the same Engine with ``prefill_apart=False`` (the behaviour before). Answers are compared
token for token between the sides (same algorithm: equal answers, equal quality). Seconds are medians
over ``--repeats`` interleaved runs.

Also recorded: ``details.expert_parallel``, the ``arrivals`` scenario on a 2-worker expert-parallel
model (Ray actors, experts split in two, gloo all-to-all, each worker keeping its rows' caches), where
the workers, which step in lockstep, agree per mixed step on how many forwards it takes; and
(``details.long_prompt``) one request with an 8192-token prompt, its prompt cached in
one forward (``prefill_chunk=None``, the behaviour before) or in chunks of 2048 positions (the
default): seconds and peak resident memory above the loaded model, each run in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench_block_diffusion import BLOCK, GEN, MASK, THRESHOLD, model, prompts
from common import expert_parallel_model, run_interleaved, write_result
from diffmoe.generation import DecodingConfig, Engine
from diffmoe.model import LLaDA2MoeModelLM, llada2_named_config

CFG = DecodingConfig(gen_length=GEN, block_length=BLOCK, threshold=THRESHOLD, ignore_eos=True)


def queue(m, ps, apart: bool) -> tuple[float, list[list[int]], int]:
    eng = Engine(m, max_batch_size=8, mask_id=MASK, eos_id=2, prefill_apart=apart)
    t0 = time.perf_counter()
    outs = eng.run(ps, CFG)
    return time.perf_counter() - t0, [o.token_ids for o in outs], eng.forwards


def arrivals(m, ps, apart: bool, gap: int) -> tuple[float, list[list[int]], int]:
    eng = Engine(m, max_batch_size=32, mask_id=MASK, eos_id=2, prefill_apart=apart)
    rids, outputs, step = [], {}, 0
    t0 = time.perf_counter()
    while len(outputs) < len(ps):
        if step % gap == 0 and len(rids) < len(ps):
            rids.append(eng.add_request(ps[len(rids)], CFG))
        outputs.update((e.request_id, e.output.token_ids) for e in eng.step() if e.finished)
        step += 1
    return time.perf_counter() - t0, [outputs[r] for r in rids], eng.forwards


LONG_PROMPT, CHUNK = 8192, 2048


def long_prompt_side(chunk: int | None) -> dict:
    """One request with a LONG_PROMPT-token prompt (this process: peak memory is per process)."""
    torch.manual_seed(0)
    cfg = llada2_named_config(
        "llada2-tiny",
        vocab_size=512,
        mask_token_id=MASK,
        eos_token_id=2,
        max_position_embeddings=LONG_PROMPT + GEN,
    )
    m = LLaDA2MoeModelLM(cfg).eval()
    prompt = torch.randint(3, 512, (LONG_PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    eng = Engine(m, max_batch_size=1, mask_id=MASK, eos_id=2, prefill_chunk=chunk)
    t0 = time.perf_counter()
    out = eng.run([prompt], CFG)[0]
    seconds = time.perf_counter() - t0
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"seconds": seconds, "peak_mb": peak_mb, "steps": out.steps, "answer": out.token_ids}


def long_prompt(repeats: int) -> dict:
    runs = {CHUNK: [], None: []}
    for _ in range(repeats):
        for chunk in runs:
            arg = "none" if chunk is None else str(chunk)
            line = subprocess.check_output([sys.executable, __file__, "--long-prompt-side", arg], text=True)
            runs[chunk].append(json.loads(line.strip().splitlines()[-1]))
    rows = {}
    for chunk, got in runs.items():
        rows[f"chunks of {chunk}" if chunk else "whole prompt (baseline)"] = {
            "seconds_median": round(statistics.median(r["seconds"] for r in got), 3),
            "peak_mb_median": round(statistics.median(r["peak_mb"] for r in got), 1),
            "steps": got[0]["steps"],
        }
    return {
        "prompt_tokens": LONG_PROMPT,
        "rows": rows,
        "answers_identical": runs[CHUNK][0]["answer"] == runs[None][0]["answer"],
    }


def expert_parallel(m, ps, gap: int, repeats: int, reference: list[list[int]]) -> dict:
    """``arrivals`` on a 2-worker expert-parallel model of ``m``, apart vs together, interleaved;
    answers compared with the single-process Engine's (``reference``)."""
    with expert_parallel_model(m) as ep:
        sides = {apart: lambda a=apart: arrivals(ep, ps, a, gap) for apart in (True, False)}
        times, results = run_interleaved(sides, repeats)
    rows = {}
    for apart in (True, False):
        med = statistics.median(times[apart])
        same = sum(a == r for a, r in zip(results[apart][0], reference))
        rows["apart" if apart else "together (baseline)"] = {
            "seconds_median": round(med, 3),
            "seconds_all": [round(t, 3) for t in times[apart]],
            "tokens_per_s": round(GEN * len(ps) / med, 1),
            "forwards": results[apart][1],
            "answers_equal_to_single_process": f"{same}/{len(ps)}",
        }
    return {
        "workers": "2 Ray actors, 1 CPU each, gloo",
        "scenario": f"arrivals every {gap} steps",
        "rows": rows,
        "ratio": round(rows["apart"]["tokens_per_s"] / rows["together (baseline)"]["tokens_per_s"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gap", type=int, default=8)
    ap.add_argument("--long-prompt-side", help=argparse.SUPPRESS)  # internal: one side, in a fresh process
    args = ap.parse_args()
    if args.long_prompt_side:
        chunk = None if args.long_prompt_side == "none" else int(args.long_prompt_side)
        print(json.dumps(long_prompt_side(chunk)))
        return
    m, ps = model(), prompts()
    sides = {}
    for apart in (True, False):
        sides[("queue", apart)] = lambda a=apart: queue(m, ps, a)
        sides[("arrivals", apart)] = lambda a=apart: arrivals(m, ps, a, args.gap)
    times, results = run_interleaved(sides, args.repeats)  # per side: (answers, forwards)
    tokens = GEN * len(ps)
    scenarios = {}
    for scenario in ("queue", "arrivals"):
        rows = {}
        for apart in (True, False):
            med = statistics.median(times[(scenario, apart)])
            rows["apart" if apart else "together (baseline)"] = {
                "seconds_median": round(med, 3),
                "seconds_all": [round(t, 3) for t in times[(scenario, apart)]],
                "tokens_per_s": round(tokens / med, 1),
                "forwards": results[(scenario, apart)][1],
            }
        same = sum(a == b for a, b in zip(results[(scenario, True)][0], results[(scenario, False)][0]))
        scenarios[scenario] = {
            "rows": rows,
            "ratio": round(rows["apart"]["tokens_per_s"] / rows["together (baseline)"]["tokens_per_s"], 3),
            "answers_identical": f"{same}/{len(ps)}",
        }
    identical = all(s["answers_identical"] == f"{len(ps)}/{len(ps)}" for s in scenarios.values())
    ep = expert_parallel(m, ps, args.gap, args.repeats, results[("arrivals", True)][0])
    ep_identical = all(
        r["answers_equal_to_single_process"] == f"{len(ps)}/{len(ps)}" for r in ep["rows"].values()
    )
    long = long_prompt(args.repeats)
    write_result(
        "block_admission",
        command="python benchmarks/bench_block_admission.py",
        baseline="the same Engine feeding admitted prompts in the decoding rows' forward (prefill_apart=False)",
        ratio=scenarios["arrivals"]["ratio"],
        target="admitted prompts fed apart: >= 1.3x tokens/s with arrivals every --gap steps, not slower "
        "with a queue drained at batch 8, answers identical",
        target_ratio=1.3,
        checks={
            "queue_not_slower": scenarios["queue"]["ratio"] >= 0.95,
            "answers_identical": identical and long["answers_identical"],
            "expert_parallel_answers_identical": ep_identical,
        },
        details={
            "model": "llada2-tiny (random, sharpened head), fp32, vocab 512",
            "prompts": len(ps),
            "prompt_tokens": "128-384",
            "gen_length": GEN,
            "block_length": BLOCK,
            "threshold": THRESHOLD,
            "gap_steps": args.gap,
            "repeats": args.repeats,
            "scenarios": scenarios,
            "expert_parallel": ep,
            "long_prompt": long,
            "quality": "answers compared token for token between the two sides",
        },
    )


if __name__ == "__main__":
    main()
