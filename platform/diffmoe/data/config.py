"""Configuration of the corpus pipeline (pretraining packs and SFT sets).

Every key has a default, so an empty YAML file builds a small-vocabulary BPE tokenizer and a packed
dataset from the Python standard library. Keys that cannot change the bytes written (actor counts,
batch sizes, the output location) are excluded from the output fingerprint, so changing them on a
re-run is still a no-op.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffmoe.config import StrictModel

STDLIB = "stdlib"  # the embedded default corpus: the standard library's .py sources on this machine


class TrainTokenizerConfig(StrictModel):
    """Byte-level BPE trained on the first ``sample_docs`` cleaned documents of the corpus."""

    vocab_size: int = Field(16384, ge=300, le=1_000_000)
    sample_docs: int = Field(2000, ge=1)
    min_frequency: int = Field(2, ge=1)


class TokenizerConfig(StrictModel):
    """Either an existing Hugging Face tokenizer directory (``path``) or a trained BPE (``train``)."""

    path: str | None = None
    train: TrainTokenizerConfig = TrainTokenizerConfig()


class CorpusConfig(StrictModel):
    kind: Literal["pretrain", "sft"] = "pretrain"
    # Local paths, directories, globs or URIs (s3://, gs://) pyarrow can open; "stdlib" = default.
    inputs: list[str] = Field(default_factory=lambda: [STDLIB], min_length=1)
    # auto: by extension (.jsonl/.json -> jsonl, .parquet -> parquet, anything else -> text).
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"  # JSONL key / Parquet column holding the document
    text_unit: Literal["file", "line"] = "file"  # a text file is one document, or one per line
    extensions: list[str] = Field(default_factory=list)  # filter when expanding directories; [] = all
    missing_inputs: Literal["error", "skip"] = "error"  # an input path that matches nothing
    max_documents: int | None = Field(None, ge=1)  # stop after this many documents (smoke runs, tests)

    # Cleaning. Every dropped document is counted by reason in the manifest.
    invalid_utf8: Literal["replace", "drop"] = "replace"
    max_doc_bytes: int = Field(1_000_000, ge=1024)
    oversize: Literal["split", "drop"] = "split"

    tokenizer: TokenizerConfig = TokenizerConfig()
    seq_len: int = Field(2048, ge=8)
    shard_max_bytes: int = Field(64 * 2**20, ge=4096)  # bound on a shard's uncompressed size
    validation_fraction: float = Field(0.01, ge=0.0, lt=1.0)  # by document hash, so stable

    # Execution only (not part of the fingerprint).
    num_tokenize_actors: int | None = Field(None, ge=1)  # None: one per CPU in the cluster
    actor_num_cpus: float = Field(0.75, gt=0)  # < 1 so read tasks still fit beside one actor per core
    read_num_cpus: float = Field(0.25, gt=0)
    batch_size: int = Field(64, ge=1)  # documents per tokenize call
    output_dir: str = "data/corpus"
    overwrite: bool = False  # replace an existing output made with a different config

    @model_validator(mode="after")
    def _check(self) -> CorpusConfig:
        if self.kind == "sft" and self.format not in ("auto", "jsonl"):
            raise ValueError("kind=sft reads JSONL (or the built-in 'stdlib' set); set format: jsonl")
        return self


EXECUTION_KEYS = (
    "num_tokenize_actors",
    "actor_num_cpus",
    "read_num_cpus",
    "batch_size",
    "output_dir",
    "overwrite",
)
