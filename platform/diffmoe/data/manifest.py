"""The dataset manifest, and the checks training jobs run before they read a single shard.

``manifest.json`` is written last, inside a directory that is renamed into place only when complete,
so a directory with a manifest whose checksums match is a finished dataset; anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from diffmoe.config import StrictModel

FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "validation")
PRETRAIN_SCHEMA = {"input_ids": "list<int32>", "segment_ids": "list<int32>"}
SFT_SCHEMA = {
    "input_ids": "list<int32>",
    "response_mask": "list<int8>",
    "prompt_length": "int32",
    "length": "int32",
}


class DatasetError(ValueError):
    """A dataset directory is incomplete, altered, or was made with a different tokenizer."""


class ShardEntry(StrictModel):
    file: str
    rows: int
    bytes: int
    sha256: str


class SplitEntry(StrictModel):
    documents: int = 0  # packed segments (pretrain) or examples (SFT) in this split
    tokens_produced: int = 0  # document tokens incl. one EOS each (pretrain) / real tokens (SFT)
    tokens_written: int = 0  # tokens in the shards (pretrain) / real tokens written (SFT)
    tokens_packing_remainder: int = 0  # tail of the stream shorter than seq_len, not written
    sequences: int = 0
    shards: list[ShardEntry] = []


class InputEntry(StrictModel):
    specs: list[str]
    format: str
    text_field: str
    text_unit: str
    files: int
    bytes: int
    missing: list[str] = []
    listing_sha256: str  # of the (uri, size, mtime) listing the output was made from


class TokenizerEntry(StrictModel):
    source: str  # the configured path, or "trained"
    sha256: str  # of tokenizer.json
    vocab_size: int
    mask_id: int
    eos_id: int
    pad_id: int


class Counts(StrictModel):
    documents_read: int = 0
    documents_kept: int = 0
    dropped: dict[str, int] = {}
    utf8_replaced: int = 0  # kept documents whose invalid bytes became U+FFFD
    documents_split: int = 0  # kept documents cut into pieces at max_doc_bytes
    tokens_produced: int = 0
    tokens_written: int = 0
    tokens_packing_remainder: int = 0
    sequences: int = 0


class Manifest(StrictModel):
    format_version: int = FORMAT_VERSION
    kind: Literal["pretrain", "sft"]
    package_version: str
    fingerprint: str  # of everything that determines the shard bytes
    seq_len: int
    columns: dict[str, str]  # shard schema
    input: InputEntry
    tokenizer: TokenizerEntry
    counts: Counts
    splits: dict[str, SplitEntry]
    config: dict

    def dump(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    file = path / "manifest.json"
    if not file.is_file():
        why = "does not exist" if not path.exists() else "has no manifest.json (incomplete or not a dataset)"
        raise DatasetError(f"dataset {path} {why}; run jobs/prepare_corpus.py to create it")
    try:
        manifest = Manifest.model_validate(json.loads(file.read_text()))
    except (json.JSONDecodeError, ValidationError) as err:
        raise DatasetError(f"{file}: unreadable manifest: {err}") from err
    if manifest.format_version != FORMAT_VERSION:
        raise DatasetError(f"{file}: format_version {manifest.format_version}, expected {FORMAT_VERSION}")
    return manifest


def verify_dataset(
    path: str | Path, expected_tokenizer_hash: str | None = None, checksums: bool = True
) -> Manifest:
    """Check that ``path`` is a complete dataset exactly as its manifest describes; return the manifest.

    Raises DatasetError on a missing manifest, a missing/extra/altered shard, or a tokenizer that is
    not the one the manifest (or the caller, via ``expected_tokenizer_hash``) names.
    """
    path = Path(path)
    manifest = read_manifest(path)
    tok_json = path / "tokenizer" / "tokenizer.json"
    if not tok_json.is_file():
        raise DatasetError(f"dataset {path}: tokenizer/tokenizer.json is missing")
    actual = sha256_file(tok_json)
    if actual != manifest.tokenizer.sha256:
        raise DatasetError(f"dataset {path}: tokenizer.json was altered (sha256 {actual[:12]}...)")
    if expected_tokenizer_hash and expected_tokenizer_hash != manifest.tokenizer.sha256:
        raise DatasetError(
            f"dataset {path} was tokenized with tokenizer {manifest.tokenizer.sha256[:12]}..., "
            f"expected {expected_tokenizer_hash[:12]}...; re-run prepare_corpus with the model's tokenizer"
        )
    for split in SPLIT_NAMES:
        entry = manifest.splits.get(split, SplitEntry())
        folder = path / split
        listed = {s.file for s in entry.shards}
        present = {p.name for p in folder.glob("*.parquet")} if folder.is_dir() else set()
        if listed - present:
            raise DatasetError(f"dataset {path}: {split} shard(s) missing: {sorted(listed - present)}")
        if present - listed:
            raise DatasetError(
                f"dataset {path}: {split} has shard(s) not in the manifest: {sorted(present - listed)}"
            )
        for shard in entry.shards:
            file = folder / shard.file
            size = file.stat().st_size
            if size != shard.bytes or (checksums and sha256_file(file) != shard.sha256):
                raise DatasetError(f"dataset {path}: checksum mismatch for {split}/{shard.file}")
    return manifest


def shard_paths(path: str | Path, manifest: Manifest, split: str) -> list[str]:
    if split not in SPLIT_NAMES:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLIT_NAMES}")
    entry = manifest.splits.get(split, SplitEntry())
    return [str(Path(path) / split / s.file) for s in entry.shards]


def read_split(
    path: str | Path,
    split: str = "train",
    expected_tokenizer_hash: str | None = None,
    verified: Manifest | None = None,
):
    """A ``ray.data.Dataset`` over the verified shards of one split, in shard order. ``verified``:
    the manifest a caller's own ``verify_dataset`` returned (checksums are read once per run)."""
    import ray.data

    manifest = verified or verify_dataset(path, expected_tokenizer_hash)
    files = shard_paths(path, manifest, split)
    if not files:
        raise DatasetError(f"dataset {path}: split {split!r} has no rows")
    return ray.data.read_parquet(files)
