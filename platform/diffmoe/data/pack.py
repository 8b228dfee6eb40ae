"""Packing token streams into fixed-length rows, and writing bounded, checksummed Parquet shards.

Packing is one ordered pass: documents are concatenated with an EOS after each, and the stream is
cut every ``seq_len`` tokens. A document may continue into the next row; ``segment_ids`` number the
documents inside each row from 0 (the EOS after a document belongs to it), so attention can be kept
within a document. Only the tail of the stream that does not fill a row is lost, and it is counted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class Packer:
    """Streams ``(flat token ids, per-document lengths)`` in, yields full ``[n, seq_len]`` rows.

    Document text never encodes to EOS (special tokens in text stay text), so the EOS tokens mark
    exactly the document ends, and segment ids are a running count of them within each row.
    """

    def __init__(self, seq_len: int, eos_id: int):
        self.seq_len, self.eos_id = seq_len, eos_id
        self.tokens = np.empty(0, np.int32)  # carried tail, shorter than seq_len
        self.next_doc = 0  # documents added so far
        self.tokens_in = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append documents; return the completed rows as (input_ids, segment_ids), int32."""
        if len(lengths) == 0:
            return _empty_rows(self.seq_len)
        ends = np.cumsum(lengths.astype(np.int64) + 1)
        is_eos = np.zeros(int(ends[-1]), bool)
        is_eos[ends - 1] = True
        stream = np.empty(len(is_eos), np.int32)
        stream[is_eos] = self.eos_id
        stream[~is_eos] = flat
        self.next_doc += len(lengths)
        self.tokens_in += len(stream)
        tokens = np.concatenate([self.tokens, stream])
        full = len(tokens) // self.seq_len * self.seq_len
        self.tokens = tokens[full:].copy()
        ids = tokens[:full].reshape(-1, self.seq_len)
        eos = ids == self.eos_id
        return ids, (np.cumsum(eos, axis=1, dtype=np.int32) - eos).astype(np.int32)

    @property
    def remainder(self) -> int:
        return len(self.tokens)


def _empty_rows(seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((0, seq_len), np.int32), np.empty((0, seq_len), np.int32)


def list_column(rows: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """A 2-D array as an Arrow ``list<dtype>`` column (zero-copy on the values)."""
    n, width = rows.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), dtype))


def ragged_column(values: list[list[int]], dtype: pa.DataType) -> pa.Array:
    """Python lists -> Arrow ``list<dtype>`` via one flat numpy buffer."""
    lengths = np.fromiter((len(v) for v in values), np.int64, len(values))
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(chain.from_iterable(values), dtype.to_pandas_dtype(), int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, dtype))


@dataclass
class ShardInfo:
    file: str  # relative to the split directory
    rows: int
    bytes: int
    sha256: str


@dataclass
class ShardWriter:
    """Buffers rows of one split and writes ``shard-NNNNN.parquet`` files of ``rows_per_shard`` rows.

    Files are written whole from an in-memory buffer, so the checksum is of exactly the bytes written.
    Options are fixed, so equal rows give byte-identical files.
    """

    directory: Path
    rows_per_shard: int
    shards: list[ShardInfo] = field(default_factory=list)
    _pending: list[pa.Table] = field(default_factory=list)
    _pending_rows: int = 0

    def add(self, table: pa.Table) -> None:
        while len(table):
            take = min(len(table), self.rows_per_shard - self._pending_rows)
            self._pending.append(table.slice(0, take))
            self._pending_rows += take
            table = table.slice(take)
            if self._pending_rows == self.rows_per_shard:
                self.flush()

    def flush(self) -> None:
        if not self._pending_rows:
            return
        table = pa.concat_tables(self._pending).combine_chunks()
        self._pending, self._pending_rows = [], 0
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", write_statistics=False)
        data = sink.getvalue().to_pybytes()
        name = f"shard-{len(self.shards):05d}.parquet"
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / name).write_bytes(data)
        self.shards.append(ShardInfo(name, len(table), len(data), hashlib.sha256(data).hexdigest()))

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards) + self._pending_rows


def rows_per_shard(max_bytes: int, row_bytes: int) -> int:
    """Rows that keep a shard's uncompressed size within ``max_bytes`` (at least one)."""
    return max(1, max_bytes // row_bytes)
