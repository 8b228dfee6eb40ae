"""Expert-parallel LLaDA2 serving: the block cache kept on the workers vs sent with every forward.

One expert-parallel model (2 Ray workers, 1 CPU each, experts split in two, gloo all-to-all) and
the continuous-batching Engine at batch 32, on the block-diffusion benchmark's model and prompts
(llada2-tiny with a sharpened head, 32 prompts of 128-384 tokens, 64 answer tokens in blocks of
32, threshold 0.95, every answer the full 64 tokens):

- ours: each request pinned to one worker, which keeps its keys/values (``HeldRows``); a step sends
  token ids and per-row lengths;
- baseline: the engine keeps the cache and every forward sends each worker its rows' cached
  keys/values and gets the new ones back (the path before; masked diffusion: bench_ep_window_cache).

Both sides run the same workers, interleaved, medians over ``--repeats`` runs of the whole prompt
set. Quality: both sides' answers are compared token for token with the single-process Engine's.
Bytes are the keys/values that crossed processes, counted at the stand-in's backbone call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench_block_diffusion import BLOCK, GEN, MASK, THRESHOLD, model, prompts
from common import ROOT, expert_parallel_model, write_result
from diffmoe.generation import DecodingConfig, Engine

SIDES = ("cache kept on the workers", "cache sent with every forward")


class _CountingBackbone:
    """The stand-in's backbone call, counting the keys/values that cross processes."""

    def __init__(self, inner):
        self.inner, self.bytes = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        past = kwargs.get("past_key_values") if len(args) < 4 else args[3]
        if past is not None:
            self.bytes += sum(k.numel() * k.element_size() * 2 for k, _ in past)
        out = self.inner(*args, **kwargs)
        if out.past_key_values is not None:
            self.bytes += sum(k.numel() * k.element_size() * 2 for k, _ in out.past_key_values)
        return out


def run(ep_model, ps, keep: bool):
    ep_model.keeps_block_cache = keep  # read when the engine's block stepper is built
    engine = Engine(ep_model, max_batch_size=32, mask_id=MASK, eos_id=2)
    cfg = DecodingConfig(gen_length=GEN, block_length=BLOCK, threshold=THRESHOLD, ignore_eos=True)
    before = ep_model.model.bytes
    t0 = time.perf_counter()
    outs = engine.run(ps, cfg)
    return (
        time.perf_counter() - t0,
        [o.token_ids for o in outs],
        engine.forwards,
        ep_model.model.bytes - before,
    )


def compare(ep, run, reference, tokens: int, repeats: int) -> list[dict]:
    """Both sides on the same workers, interleaved (drift on a shared machine hits both), medians
    over ``repeats`` runs; ``run(keep)`` -> (seconds, answers, forwards, kv bytes sent)."""
    ep.model = _CountingBackbone(ep.model)
    times = {s: [] for s in SIDES}
    results = {}
    for _ in range(repeats):
        for side in SIDES:
            seconds, answers, forwards, sent = run(side == SIDES[0])
            times[side].append(seconds)
            results[side] = (answers, forwards, sent)
    rows = []
    for side in SIDES:
        answers, forwards, sent = results[side]
        med = statistics.median(times[side])
        same = sum(a == r for a, r in zip(answers, reference))
        rows.append(
            {
                "method": side,
                "seconds_median": round(med, 3),
                "seconds_all": [round(t, 3) for t in times[side]],
                "tokens_per_s": round(tokens / med, 1),
                "forwards": forwards,
                "kv_bytes_across_processes_per_run": sent,
                "answers_equal_to_single_process": f"{same}/{len(reference)}",
            }
        )
    return rows


def on_two_workers(m, run, reference, tokens: int) -> list[dict]:
    """A 2-worker expert-parallel model of ``m``: ``compare`` both sides on it (``run(ep_model,
    keep)``, ``--repeats`` times: each row's ``seconds_all``), then stop everything."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    repeats = ap.parse_args().repeats
    with expert_parallel_model(m) as ep:
        return compare(ep, lambda keep: run(ep, keep), reference, tokens, repeats)


def main() -> None:
    m, ps = model(), prompts()
    reference = [
        o.token_ids
        for o in Engine(m, max_batch_size=32, mask_id=MASK, eos_id=2).run(
            ps, DecodingConfig(gen_length=GEN, block_length=BLOCK, threshold=THRESHOLD, ignore_eos=True)
        )
    ]
    rows = on_two_workers(m, lambda ep, keep: run(ep, ps, keep), reference, GEN * len(ps))
    report(
        "ep_block_cache",
        "expert-parallel Engine (2 workers) that sends each forward's cached keys/values to the workers "
        "and gets the new ones back",
        rows,
        {
            "model": "llada2-tiny (random, sharpened head), fp32, vocab 512, 8 experts over 2 workers",
            "prompts": len(ps),
            "gen_length": GEN,
            "block_length": BLOCK,
            "threshold": THRESHOLD,
        },
    )


def report(name: str, baseline: str, rows: list[dict], details: dict) -> None:
    """The result file of a kept-vs-sent comparison (``compare``'s rows, ours first)."""
    ours, base = rows
    n = ours["answers_equal_to_single_process"].split("/")[1]
    write_result(
        name,
        command=f"python benchmarks/bench_{name}.py",
        baseline=baseline,
        ratio=ours["tokens_per_s"] / base["tokens_per_s"],
        target="no key or value crosses processes, at least the baseline's tokens/s, answers identical "
        "to the single-process Engine",
        target_ratio=1.0,
        checks={
            "no_kv_bytes_sent": ours["kv_bytes_across_processes_per_run"] == 0,
            "answers_identical": all(r["answers_equal_to_single_process"] == f"{n}/{n}" for r in rows),
        },
        details={
            **details,
            "max_batch_size": 32,
            "workers": "2 Ray actors, 1 CPU each, gloo",
            "rows": rows,
            "kv_bytes_per_forward_baseline": round(
                base["kv_bytes_across_processes_per_run"] / base["forwards"]
            ),
        },
    )
    print({r["method"]: (r["tokens_per_s"], r["kv_bytes_across_processes_per_run"]) for r in rows})


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
