"""The pretraining corpus pipeline on Ray Data.

read -> clean (tasks) -> tokenize (actor pool, tokenizer loaded once per actor) -> ordered stream
to the driver -> pack -> Parquet shards. Only tokenization is expensive, so it is the distributed
stage; packing and writing are one ordered numpy pass on the driver, which is what makes two runs
byte-identical regardless of how Ray scheduled the work.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

import diffmoe
from diffmoe.data.clean import SPLITS
from diffmoe.data.config import CorpusConfig
from diffmoe.data.manifest import (
    PRETRAIN_SCHEMA,
    SFT_SCHEMA,
    Counts,
    InputEntry,
    Manifest,
    SplitEntry,
)
from diffmoe.data.output import commit, existing_output, fingerprint, listing_hash, start_partial
from diffmoe.data.pack import Packer, ShardWriter, list_column, ragged_column, rows_per_shard
from diffmoe.data.sft import build_sft
from diffmoe.data.sources import InputFile, resolve_inputs
from diffmoe.data.stages import Log, documents, ordered_batches, tokenize, tokenizer_entry
from diffmoe.data.tokenizer import (
    copy_tokenizer,
    raw_tokenizer,
    read_tokenizer_json,
    tokenizer_hash,
    train_bpe,
)

SAMPLE_MAX_BYTES = 256 * 2**20  # cap on the text the BPE trainer holds in driver memory


class TokenizeActor:
    """Ray Data actor: loads the tokenizer once, then ``encode_batch`` per batch of documents."""

    def __init__(self, tokenizer_json: str):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one actor per core; no nested thread pools
        self.tok = raw_tokenizer(tokenizer_json)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        keep = [i for i, r in enumerate(batch.column("reason").to_pylist()) if not r]
        ids: list[list[int]] = [[] for _ in texts]
        encoded = self.tok.encode_batch_fast([texts[i] for i in keep], add_special_tokens=False)
        for i, enc in zip(keep, encoded):
            ids[i] = enc.ids
        return batch.drop_columns(["text"]).append_column("ids", ragged_column(ids, pa.int32()))


@contextmanager
def ordered_execution() -> Iterator[None]:
    """Datasets created inside keep input order end to end and show Ray Data's progress bars."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def limited_files(files: list[InputFile], cfg: CorpusConfig) -> list[InputFile]:
    """With max_documents and one document per file, read only the files that can be used."""
    whole_files = cfg.text_unit == "file" and all(f.format == "text" for f in files)
    return files[: cfg.max_documents] if cfg.max_documents and whole_files else files


def sample_texts(files: list[InputFile], cfg: CorpusConfig, log: Log) -> list[str]:
    """The BPE training sample: the first ``sample_docs`` kept documents of an even stride of files."""
    want = cfg.tokenizer.train.sample_docs
    picked = files[:: max(1, len(files) // want)]
    with closing(ordered_batches(documents(picked, cfg))) as batches:
        texts, size = _sample(batches, want)
    log(f"tokenizer sample: {len(texts)} documents, {size / 1e6:.1f} MB")
    return texts


def _sample(batches, want: int) -> tuple[list[str], int]:
    texts, size = [], 0
    for batch in batches:
        for text, reason in zip(batch.column("text").to_pylist(), batch.column("reason").to_pylist()):
            if not reason:
                texts.append(text)
                size += len(text)
            if len(texts) >= want or size >= SAMPLE_MAX_BYTES:
                return texts, size
    return texts, size


def build_tokenizer(files: list[InputFile], cfg: CorpusConfig, dest: Path, log: Log) -> str:
    """Copy the configured tokenizer, or train one, into ``dest``; returns its source label."""
    if cfg.tokenizer.path:
        copy_tokenizer(cfg.tokenizer.path, dest)
        return cfg.tokenizer.path
    train = cfg.tokenizer.train
    log(f"training byte-level BPE, vocab {train.vocab_size}")
    train_bpe(sample_texts(files, cfg, log), dest, train.vocab_size, train.min_frequency)
    return "trained"


def _flat_ids(batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    ids = batch.column("ids").combine_chunks()
    return ids.flatten().to_numpy(), ids.value_lengths().to_numpy()


def pack_stream(batches, cfg: CorpusConfig, eos_id: int, out: Path) -> tuple[Counts, dict[str, SplitEntry]]:
    """Consume ordered tokenized batches: count, pack per split and write shards."""
    counts, dropped = Counts(), Counter()
    per_row = rows_per_shard(cfg.shard_max_bytes, cfg.seq_len * 4 * 2)
    packers = {s: Packer(cfg.seq_len, eos_id) for s in SPLITS}
    writers = {s: ShardWriter(out / name, per_row) for s, name in SPLITS.items()}
    for batch in batches:
        piece = batch.column("piece").to_numpy()
        if cfg.max_documents:
            room = cfg.max_documents - counts.documents_read
            batch = batch.slice(0, int(np.searchsorted(np.cumsum(piece == 0), room, side="right")))
            piece = piece[: len(batch)]
            if not len(batch):
                break
        reasons = batch.column("reason").to_pylist()
        kept = np.array([not r for r in reasons], bool)
        dropped.update(r for r in reasons if r)
        first = piece == 0
        counts.documents_read += int(first.sum())
        counts.documents_kept += int((first & kept).sum())
        counts.documents_split += int((piece == 1).sum())
        counts.utf8_replaced += int((first & kept & batch.column("replaced").to_numpy(False)).sum())
        flat, lengths = _flat_ids(batch)
        split = batch.column("split").to_numpy()
        for s, packer in packers.items():
            rows = kept & (split == s)
            if not rows.any():
                continue
            part = flat if rows.all() else flat[np.repeat(rows, lengths)]
            ids, seg = packer.add(part, lengths[rows])
            if len(ids):
                table = pa.table(
                    {"input_ids": list_column(ids, pa.int32()), "segment_ids": list_column(seg, pa.int32())}
                )
                writers[s].add(table)
    splits = {}
    for s, name in SPLITS.items():
        writers[s].flush()
        p, w = packers[s], writers[s]
        splits[name] = SplitEntry(
            documents=p.next_doc,
            tokens_produced=p.tokens_in,
            tokens_written=w.rows * cfg.seq_len,
            tokens_packing_remainder=p.remainder,
            sequences=w.rows,
            shards=[vars(x) for x in w.shards],
        )
    counts.dropped = dict(sorted(dropped.items()))
    for key in ("tokens_produced", "tokens_written", "tokens_packing_remainder", "sequences"):
        setattr(counts, key, sum(getattr(e, key) for e in splits.values()))
    return counts, splits


def input_entry(cfg: CorpusConfig, files: list[InputFile], missing: list[str]) -> InputEntry:
    return InputEntry(
        specs=cfg.inputs,
        format=cfg.format,
        text_field=cfg.text_field,
        text_unit=cfg.text_unit,
        files=len(files),
        bytes=sum(f.size for f in files),
        missing=missing,
        listing_sha256=listing_hash(files),
    )


def prepare_corpus(cfg: CorpusConfig, log: Log = print) -> Manifest:
    """Build the dataset ``cfg`` describes (``kind`` pretrain or sft), or return the existing one."""
    if cfg.kind == "sft":
        return build(cfg, build_sft, SFT_SCHEMA, log)
    return build(cfg, build_pretrain, PRETRAIN_SCHEMA, log)


prepare = prepare_corpus


def build_pretrain(files: list[InputFile], cfg: CorpusConfig, partial: Path, log: Log):
    used = limited_files(files, cfg)
    tok = tokenizer_entry(build_tokenizer(used, cfg, partial / "tokenizer", log), partial / "tokenizer")
    tok_json = read_tokenizer_json(partial / "tokenizer")
    datasets = [tokenize(ds, cfg, TokenizeActor, tokenizer_json=tok_json) for ds in documents(used, cfg)]
    with closing(ordered_batches(datasets)) as batches:  # stops the executors if we stop early
        counts, splits = pack_stream(batches, cfg, tok.eos_id, partial)
    return tok, counts, splits


def build(cfg: CorpusConfig, body, columns: dict[str, str], log: Log) -> Manifest:
    """The output life cycle around ``body(files, cfg, partial, log) -> (tokenizer, counts, splits)``:
    no-op if already complete, build in a temporary directory, manifest last, atomic rename."""
    out = Path(cfg.output_dir).resolve()
    files, missing = resolve_inputs(cfg)
    if missing:
        log(f"skipping inputs that matched no files: {missing}")
    tok_sha = tokenizer_hash(cfg.tokenizer.path) if cfg.tokenizer.path else None
    fp = fingerprint(cfg, files, tok_sha)
    done = existing_output(out, fp, cfg.overwrite, log)
    if done is not None:
        log(f"{out} is complete and matches this config (fingerprint {fp[:12]}); nothing to do")
        return done
    log(f"{cfg.kind}: {len(files)} input files, {sum(f.size for f in files) / 1e6:.1f} MB -> {out}")
    partial = start_partial(out, log)
    try:
        with ordered_execution():
            tok, counts, splits = body(files, cfg, partial, log)
        manifest = Manifest(
            kind=cfg.kind,
            package_version=diffmoe.__version__,
            fingerprint=fp,
            seq_len=cfg.seq_len,
            columns=columns,
            input=input_entry(cfg, files, missing),
            tokenizer=tok,
            counts=counts,
            splits=splits,
            config=cfg.model_dump(mode="json"),
        )
        commit(partial, out, manifest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # incomplete; never left looking like a dataset
        raise
    return manifest


def summary(manifest: Manifest) -> str:
    """A few human-readable lines: what was read, kept, dropped (by reason) and written."""
    c = manifest.counts
    unit = "examples" if manifest.kind == "sft" else "documents"
    lines = [
        f"{manifest.kind} dataset, seq_len {manifest.seq_len}, tokenizer {manifest.tokenizer.sha256[:12]} "
        f"(vocab {manifest.tokenizer.vocab_size})",
        f"{unit}: read {c.documents_read}, kept {c.documents_kept}, dropped {c.dropped or 'none'}",
    ]
    if manifest.kind == "sft":
        lines.append(f"tokens: {c.tokens_written} real tokens in {c.sequences} rows padded with EOS")
    else:
        lines.append(
            f"split at max_doc_bytes: {c.documents_split}, invalid UTF-8 replaced: {c.utf8_replaced}"
        )
        lines.append(
            f"tokens: produced {c.tokens_produced}, written {c.tokens_written}, "
            f"packing remainder {c.tokens_packing_remainder}; sequences {c.sequences}"
        )
    for name, s in manifest.splits.items():
        lines.append(f"  {name}: {s.sequences} rows in {len(s.shards)} shard(s)")
    return "\n".join(lines)
