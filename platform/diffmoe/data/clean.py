"""Cleaning: raw file bytes -> documents, each kept or dropped with a reason.

Dropped documents are not filtered out here: they travel on as rows with an empty text and a
``reason``, so the driver counts every drop exactly, whichever worker saw it. Oversized documents
are split into pieces (``piece`` 0, 1, ...) whose concatenation is the original text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

from diffmoe.data.sources import file_format

REASONS = ("empty", "binary", "invalid_utf8", "oversize", "bad_json", "missing_field", "not_text")
TRAIN, VALIDATION = 0, 1
SPLITS = {TRAIN: "train", VALIDATION: "validation"}


@dataclass(frozen=True)
class CleanSpec:
    """The subset of CorpusConfig the clean stage needs (small, picklable)."""

    format: str = "auto"
    text_field: str = "text"
    text_unit: str = "file"
    invalid_utf8: str = "replace"
    max_doc_bytes: int = 1_000_000
    oversize: str = "split"
    validation_fraction: float = 0.0

    @classmethod
    def of(cls, cfg) -> CleanSpec:
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


@dataclass
class Doc:
    text: str = ""
    reason: str = ""  # "" = kept
    replaced: bool = False  # invalid UTF-8 was replaced with U+FFFD


def decode(data: bytes, policy: str) -> Doc:
    try:
        return Doc(data.decode("utf-8"))
    except UnicodeDecodeError:
        if policy == "drop":
            return Doc(reason="invalid_utf8")
        return Doc(data.decode("utf-8", errors="replace"), replaced=True)


def raw_documents(path: str, data: bytes | None, spec: CleanSpec) -> Iterator[Doc]:
    """The documents of one raw row: a whole text/JSONL file, or one Parquet record."""
    fmt = file_format(path, spec.format)
    if data is None:
        yield Doc(reason="missing_field")
        return
    if fmt == "parquet":
        yield decode(data, spec.invalid_utf8)
        return
    if b"\x00" in data:
        yield Doc(reason="binary")  # a NUL byte never occurs in text; the whole file is one drop
        return
    if fmt == "text" and spec.text_unit == "file":
        yield decode(data, spec.invalid_utf8)
        return
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last line does not start another document
    for line in lines:
        if fmt == "jsonl":
            if line.strip():  # blank JSONL lines are separators, not documents
                yield json_document(line, spec)
        else:
            yield decode(line.rstrip(b"\r"), spec.invalid_utf8)


def json_document(line: bytes, spec: CleanSpec) -> Doc:
    doc = decode(line, spec.invalid_utf8)
    if doc.reason:
        return doc
    try:
        record = json.loads(doc.text)
    except json.JSONDecodeError:
        return Doc(reason="bad_json")
    if not isinstance(record, dict):
        return Doc(reason="bad_json")
    value = record.get(spec.text_field)
    if value is None:
        return Doc(reason="missing_field")
    if not isinstance(value, str):
        return Doc(reason="not_text")
    return Doc(value, replaced=doc.replaced)


def split_pieces(data: bytes, cap: int) -> list[bytes]:
    """Cut UTF-8 ``data`` into pieces of at most ``cap`` bytes, at a newline when one is near."""
    pieces, start = [], 0
    while len(data) - start > cap:
        end = data.rfind(b"\n", start + cap // 2, start + cap) + 1
        if end <= 0:
            end = start + cap
            while data[end] & 0xC0 == 0x80:  # never cut inside a multi-byte character
                end -= 1
        pieces.append(data[start:end])
        start = end
    pieces.append(data[start:])
    return pieces


def split_of(data: bytes, fraction: float) -> int:
    """Validation iff the document's hash falls below ``fraction``: stable across runs and machines."""
    if fraction <= 0:
        return TRAIN
    h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
    return VALIDATION if h < fraction * 2**64 else TRAIN


def clean_rows(paths: list[str], blobs: list[bytes | None], spec: CleanSpec) -> dict[str, list]:
    """Columns ``text, reason, piece, replaced, split``: one row per piece or per dropped document."""
    out: dict[str, list] = {k: [] for k in ("text", "reason", "piece", "replaced", "split")}

    def emit(text: str, reason: str, piece: int = 0, replaced: bool = False, split: int = TRAIN) -> None:
        out["text"].append(text)
        out["reason"].append(reason)
        out["piece"].append(piece)
        out["replaced"].append(replaced)
        out["split"].append(split)

    for path, data in zip(paths, blobs):
        for doc in raw_documents(path, data, spec):
            if doc.reason:
                emit("", doc.reason)
                continue
            if not doc.text or doc.text.isspace():
                emit("", "empty")
                continue
            encoded = doc.text.encode("utf-8")
            if len(encoded) > spec.max_doc_bytes and spec.oversize == "drop":
                emit("", "oversize")
                continue
            split = split_of(encoded, spec.validation_fraction)
            if len(encoded) <= spec.max_doc_bytes:
                emit(doc.text, "", 0, doc.replaced, split)
                continue
            for i, piece in enumerate(split_pieces(encoded, spec.max_doc_bytes)):
                emit(piece.decode("utf-8"), "", i, doc.replaced, split)
    return out


def clean_batch(batch, spec: CleanSpec):
    """Ray Data ``map_batches`` function over ``{"bytes", "path"}`` Arrow batches."""
    import pyarrow as pa

    cols = clean_rows(batch.column("path").to_pylist(), batch.column("bytes").to_pylist(), spec)
    return pa.table(
        {
            "text": pa.array(cols["text"], pa.large_string()),
            "reason": pa.array(cols["reason"], pa.string()),
            "piece": pa.array(cols["piece"], pa.int32()),
            "replaced": pa.array(cols["replaced"], pa.bool_()),
            "split": pa.array(cols["split"], pa.int8()),
        }
    )
