"""Corpus-pipeline stages both dataset kinds use: read + clean into Ray Datasets, tokenize on an
actor pool, stream the batches back in input order, and describe the tokenizer for the manifest.

``pipeline`` (pretraining, and the build life cycle) and ``sft`` both build on these; keeping them
here lets ``pipeline`` dispatch to ``sft`` without the two modules importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa

from diffmoe.cluster import connect
from diffmoe.data.clean import CleanSpec, clean_batch
from diffmoe.data.config import CorpusConfig
from diffmoe.data.manifest import TokenizerEntry
from diffmoe.data.sources import InputFile, read_groups
from diffmoe.data.tokenizer import raw_tokenizer, read_tokenizer_json, special_ids, tokenizer_hash

Log = Callable[[str], None]


def documents(files: list[InputFile], cfg: CorpusConfig, fn=clean_batch) -> list:
    """Datasets (one per reader group) of cleaned rows; by default ``text, reason, piece, replaced,
    split``, or whatever ``fn`` (raw Arrow batch, spec) -> Arrow batch makes of them."""
    spec = CleanSpec.of(cfg)
    connect()  # before Ray Data's reads would start Ray without the job's worker code path
    return [
        ds.map_batches(fn, batch_format="pyarrow", fn_kwargs={"spec": spec}, num_cpus=cfg.read_num_cpus)
        for ds in read_groups(files, cfg)
    ]


def ordered_batches(datasets: list) -> Iterator[pa.Table]:
    """The Arrow batches of each dataset in turn, each in its input order."""
    for ds in datasets:
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def tokenize(ds, cfg: CorpusConfig, actor, **constructor_kwargs):
    """``map_batches`` over an ActorPoolStrategy pool of ``actor(**constructor_kwargs)``."""
    import ray
    from ray.data import ActorPoolStrategy

    connect()  # as Ray Data would, but the pool size below needs the cluster first
    n = cfg.num_tokenize_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    return ds.map_batches(
        actor,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=n),
        num_cpus=cfg.actor_num_cpus,
    )


def tokenizer_entry(source: str, path: Path) -> TokenizerEntry:
    ids = special_ids(path)
    vocab = raw_tokenizer(read_tokenizer_json(path)).get_vocab_size(with_added_tokens=True)
    return TokenizerEntry(
        source=source,
        sha256=tokenizer_hash(path),
        vocab_size=vocab,
        mask_id=ids.mask_id,
        eos_id=ids.eos_id,
        pad_id=ids.pad_id,
    )
