"""Exactly-once training data: the sample order is a function of (seed, epoch) over global indices.

The train split is one sequence of N rows (its shards in manifest order: global index = shard
start + row). Epoch e visits all N in an order drawn from (seed, e): a permutation of the shards,
then of the rows within each shard, so a worker holds only the shard or two it is reading. Training
reads one endless stream, epoch after epoch; each micro-step the W workers take the next W * B
stream positions, worker r the r-th B of them. Checkpoints record the stream position, so a run
restarted with any worker count goes on with the next unseen sample: within an epoch no sample is
trained twice or left out. Every worker reads the shards directly (``data.path`` must be visible to
all workers, as Ray Train's storage is).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

COLUMNS = ("input_ids", "response_mask", "segment_ids")  # what the objective reads


class SampleOrder:
    """Where stream position p lives: (epoch, shard, row) and its global sample index."""

    def __init__(self, shard_rows: list[int], seed: int):
        if sum(shard_rows) < 1 or min(shard_rows) < 0:
            raise ValueError(f"the train split has no rows (rows per shard: {shard_rows})")
        self.shard_rows, self.seed = list(shard_rows), seed
        self.starts = np.concatenate([[0], np.cumsum(self.shard_rows)[:-1]])
        self.total = int(sum(self.shard_rows))
        self._plans: OrderedDict = OrderedDict()

    def _cached(self, key, make):
        if key not in self._plans:
            self._plans[key] = make()
            if len(self._plans) > 8:
                self._plans.popitem(last=False)
        return self._plans[key]

    def _shards(self, epoch: int):
        def make():
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.shard_rows))
            return order, np.cumsum([self.shard_rows[s] for s in order])

        return self._cached(("shards", epoch), make)

    def _rows(self, epoch: int, shard: int) -> np.ndarray:
        return self._cached(
            ("rows", epoch, shard),
            lambda: np.random.default_rng([self.seed, epoch, 1, shard]).permutation(self.shard_rows[shard]),
        )

    def locate(self, position: int) -> tuple[int, int, int]:
        """Stream position -> (epoch, shard, row within the shard)."""
        epoch, k = divmod(int(position), self.total)
        order, ends = self._shards(epoch)
        i = int(np.searchsorted(ends, k, side="right"))
        shard = int(order[i])
        offset = k - (int(ends[i]) - self.shard_rows[shard])
        return epoch, shard, int(self._rows(epoch, shard)[offset])

    def global_index(self, shard: int, row: int) -> int:
        return int(self.starts[shard]) + row


class ShardReader:
    """Decoded shards (numpy [rows, L] per column), all of them when ``keep_all`` (the split fits
    ``data.cache_in_memory_mb``), else the two read last."""

    def __init__(self, paths: list[str], keep_all: bool):
        self.paths, self.keep_all = paths, keep_all
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def shard(self, i: int) -> dict[str, np.ndarray]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        import pyarrow.parquet as pq

        table = pq.read_table(self.paths[i], columns=None)
        out = {}
        for name in COLUMNS:
            if name in table.column_names:
                col = table.column(name).combine_chunks()
                out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
        self._cache[i] = out
        if not self.keep_all and len(self._cache) > 2:
            self._cache.popitem(last=False)
        return out


def micro_batch(order: SampleOrder, reader: ShardReader, position: int, rank: int, batch: int):
    """This rank's rows at stream positions [position + rank * batch, ... + batch): the batch as
    CPU tensors and the rows' global sample indices."""
    found = [order.locate(p) for p in range(position + rank * batch, position + (rank + 1) * batch)]
    columns = {}
    for name in reader.shard(found[0][1]):
        columns[name] = torch.from_numpy(np.stack([reader.shard(s)[name][r] for _, s, r in found]))
    return columns, [order.global_index(s, r) for _, s, r in found]


def record_samples(directory: str, rank: int, entry: dict) -> None:
    """``train.sample_log``: append one JSON line (step, position, global indices) per micro-batch."""
    os.makedirs(directory, exist_ok=True)
    with open(Path(directory) / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def resume_position(state: dict, total: int, batch: int) -> int:
    """The stream position a checkpoint's trainer state continues from (0 for a fresh run).
    States written before positions were recorded give the start of their epoch plus the batches
    each of their workers had consumed."""
    if "position" in state:
        return int(state["position"])
    done = state.get("batches_in_epoch", 0) * batch * state.get("world_size", 1)
    return state.get("epoch", 0) * total + done


class TrainStream:
    """This rank's endless micro-batches from ``position`` on; ``position`` is where the next global
    micro-step starts (what a checkpoint records)."""

    def __init__(
        self,
        order: SampleOrder,
        reader: ShardReader,
        position: int,
        rank: int,
        world: int,
        batch: int,
        device,
    ):
        self.order, self.reader, self.position = order, reader, position
        self.rank, self.world, self.batch, self.device = rank, world, batch, device

    def __iter__(self):
        while True:
            start = self.position
            columns, indices = micro_batch(self.order, self.reader, start, self.rank, self.batch)
            self.position = start + self.world * self.batch
            epoch, k = divmod(start, self.order.total)
            batch = {name: t.to(self.device, non_blocking=True) for name, t in columns.items()}
            # epoch, and the micro-step's number within it (1-based): seeds for the mask draws
            yield batch, epoch, k // (self.world * self.batch) + 1, indices
