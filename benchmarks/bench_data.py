"""Corpus pipeline throughput vs the tokenizer's own limit on this machine.

Ours: the full ``prepare_corpus`` pipeline on the default corpus (every standard-library .py file):
Ray Data read -> clean -> tokenize in an actor pool -> pack -> Parquet shards + manifest, timed from
the call to the renamed, complete output directory (Ray already started, tokenizer already trained).
Baseline: plain ``tokenizers`` ``encode_batch`` over the same documents in one process on all cores
(the text already in memory), i.e. the ceiling for any pipeline built on this tokenizer.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

VOCAB = 16384
SEQ_LEN = 2048
REPEATS = 3


def corpus_texts() -> list[str]:
    """The documents the pipeline keeps, read directly: each .py file, decoded, non-blank."""
    from diffmoe.data import CorpusConfig
    from diffmoe.data.sources import resolve_inputs

    files, _ = resolve_inputs(CorpusConfig())
    texts = []
    for f in files:
        text = Path(f.uri).read_bytes().decode("utf-8", errors="replace")
        if text and not text.isspace():
            texts.append(text)
    return texts


def baseline(tokenizer_dir: Path, texts: list[str]) -> tuple[int, float, float]:
    """(tokens, seconds, CPU seconds) of the faster of encode_batch and encode_batch_fast over the
    texts, on all cores in this process."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.encode_special_tokens = True  # as the pipeline does; no effect on this corpus's token count
    best, cpu, tokens = float("inf"), 0.0, 0
    for fn in (tok.encode_batch, tok.encode_batch_fast):
        start, cpu0 = time.perf_counter(), time.process_time()
        out = fn(texts, add_special_tokens=False)
        if time.perf_counter() - start < best:
            best, cpu = time.perf_counter() - start, time.process_time() - cpu0
        tokens = sum(len(e.ids) for e in out)
    return tokens, best, cpu


def load() -> float:
    return round(os.getloadavg()[0], 2)


def tree_cpu_seconds() -> float:
    """CPU time of this process and every process under it: Ray's raylet, workers and actors are
    descendants of a driver that started Ray, and exited workers count via their parent."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def main() -> int:
    os.environ.pop("TOKENIZERS_PARALLELISM", None)  # baseline uses every core
    import ray

    from diffmoe.data import CorpusConfig, prepare_corpus
    from diffmoe.data.tokenizer import train_bpe

    texts = corpus_texts()
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    tok_dir = work / "tokenizer"
    start = time.perf_counter()
    train_bpe(texts[:: max(1, len(texts) // 2000)], tok_dir, VOCAB)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - start
    # Interleave baseline and pipeline runs so both see the same background load on a shared machine.
    base_runs, runs, loads = [], [], [load()]
    base_cpu, pipe_cpu = [], []
    for i in range(REPEATS):
        base_tokens, base_s, cpu = baseline(tok_dir, texts)
        base_cpu.append(cpu)
        base_runs.append(base_s)
        print(f"baseline: {base_tokens} tokens in {base_s:.2f}s", flush=True)
        cfg = CorpusConfig(
            tokenizer={"path": str(tok_dir)}, seq_len=SEQ_LEN, output_dir=str(work / f"out{i}")
        )
        start, cpu0 = time.perf_counter(), tree_cpu_seconds()
        m = prepare_corpus(cfg, log=lambda s: print(s, flush=True))
        runs.append(time.perf_counter() - start)
        pipe_cpu.append(tree_cpu_seconds() - cpu0)
        print(f"pipeline: {runs[-1]:.2f}s", flush=True)
        loads.append(load())
    ray.shutdown()
    base_s = min(base_runs)
    base_tps = base_tokens / base_s
    c = m.counts
    doc_tokens = c.tokens_produced - sum(s.documents for s in m.splits.values())  # minus one EOS each
    ours_s = min(runs)
    ours_tps = doc_tokens / ours_s
    wall_ratio = ours_tps / base_tps
    # Tokens per CPU-second, ours vs baseline: immune to other load on a shared machine, and an upper
    # bound on the wall-clock ratio a quiet machine would show (idle cores only lower ours).
    cpu_ratio = min(base_cpu) / min(pipe_cpu) * doc_tokens / base_tokens
    ratio = min(wall_ratio, cpu_ratio)  # conservative: contention inflates ours' share of the CPU
    details = {
        "corpus": f"standard library .py sources: {m.input.files} files, {m.input.bytes / 1e6:.1f} MB",
        "documents_kept": c.documents_kept,
        "dropped": c.dropped,
        "tokenizer": f"byte-level BPE, vocab {VOCAB}, trained in {train_s:.1f}s (not timed below)",
        "seq_len": SEQ_LEN,
        "sequences": c.sequences,
        "shards": {k: len(s.shards) for k, s in m.splits.items()},
        "baseline_tokens": base_tokens,
        "pipeline_document_tokens": doc_tokens,
        "same_tokens": base_tokens == doc_tokens,
        "baseline_seconds_runs": [round(r, 3) for r in base_runs],
        "baseline_tokens_per_s": round(base_tps),
        "pipeline_seconds_runs": [round(r, 3) for r in runs],
        "pipeline_tokens_per_s": round(ours_tps),
        "ratio_per_round": [round(b / r * doc_tokens / base_tokens, 3) for b, r in zip(base_runs, runs)],
        "wall_ratio_best_vs_best": round(wall_ratio, 3),
        "baseline_cpu_seconds_runs": [round(c, 2) for c in base_cpu],
        "pipeline_cpu_seconds_runs": [round(c, 2) for c in pipe_cpu],
        "cpu_efficiency_ratio": round(cpu_ratio, 3),
        "ray_start_seconds_not_counted": round(ray_start_s, 2),
        "load_average_1min_between_runs": loads,
        "note": (
            "baseline = best of encode_batch / encode_batch_fast, all cores, one process, text in memory; "
            "pipeline = best of the runs, end to end (read, clean, tokenize, pack, write, checksum, "
            "manifest), Ray already up; round 1 also starts Ray's worker processes. Rounds alternate "
            "baseline and pipeline because the machine is shared with other jobs (see load averages); "
            "under contention the many-process pipeline gets a larger CPU share than the baseline, so "
            "ratio = min(wall-clock ratio, CPU-efficiency ratio)."
        ),
    }
    write_result(
        "data",
        command="python benchmarks/bench_data.py",
        baseline="tokenizers encode_batch on all cores in one process over the same documents",
        ratio=ratio,
        target=">= 0.7",
        target_ratio=0.7,
        details=details,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
