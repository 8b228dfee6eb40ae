"""The pretraining pipeline on a real local Ray cluster: conservation, determinism, round trip,
no-op re-runs, refusal of altered datasets, and shards feeding a Ray Train worker."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffmoe.data import CorpusConfig, DatasetError, prepare_corpus, read_split, verify_dataset
from diffmoe.data.sources import resolve_inputs
from diffmoe.data.tokenizer import raw_tokenizer, read_tokenizer_json

# Same settings as the session fixture ``tiny_corpus`` in conftest.py.
TINY = dict(
    max_documents=60,
    seq_len=64,
    validation_fraction=0.1,
    tokenizer={"train": {"vocab_size": 512, "sample_docs": 60}},
)


def _rows(path: Path, split: str, column: str = "input_ids") -> np.ndarray:
    files = sorted((path / split).glob("*.parquet"))
    return np.concatenate(
        [np.stack(pq.read_table(f).column(column).to_numpy(zero_copy_only=False)) for f in files]
    )


def _source_docs(fraction: float) -> dict[str, list[str]]:
    """The first 60 stdlib modules, read and split independently of the pipeline code."""
    docs: dict[str, list[str]] = {"train": [], "validation": []}
    for f in resolve_inputs(CorpusConfig())[0][:60]:
        text = Path(f.uri).read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
            docs["validation" if h < fraction * 2**64 else "train"].append(text)
    return docs


@pytest.fixture(scope="module")
def rerun(ray_cluster, tiny_corpus, tmp_path_factory):
    """The tiny corpus built again with other execution settings (1 actor, batches of 5)."""
    out = tmp_path_factory.mktemp("rerun") / "data"
    cfg = CorpusConfig.model_validate(
        {**TINY, "output_dir": str(out), "num_tokenize_actors": 1, "batch_size": 5}
    )
    prepare_corpus(cfg, log=lambda *a: None)
    return cfg


def test_manifest_counts_match_an_independent_recount(tiny_corpus):
    m = verify_dataset(tiny_corpus)
    c = m.counts
    assert c.documents_read == 60 == c.documents_kept + sum(c.dropped.values())
    assert set(c.dropped) <= {"empty"}
    tok = raw_tokenizer(read_tokenizer_json(tiny_corpus / "tokenizer"))
    eos = m.tokenizer.eos_id
    for split, texts in _source_docs(0.1).items():
        entry = m.splits[split]
        stream = np.concatenate([np.append(np.array(e.ids, np.int32), eos) for e in tok.encode_batch(texts)])
        rows = _rows(tiny_corpus, split)
        assert rows.shape == (entry.sequences, m.seq_len)
        assert entry.tokens_produced == len(stream) == entry.tokens_written + entry.tokens_packing_remainder
        assert entry.tokens_written == rows.size and entry.tokens_packing_remainder < m.seq_len
        assert (rows.reshape(-1) == stream[: rows.size]).all()  # same tokens, same order
        assert sum(s.rows for s in entry.shards) == entry.sequences and entry.documents == len(texts)
    assert c.tokens_produced == c.tokens_written + c.tokens_packing_remainder
    assert c.sequences == sum(s.sequences for s in m.splits.values())


def test_decoding_packed_rows_reproduces_the_source_documents(tiny_corpus):
    m = verify_dataset(tiny_corpus)
    tok = raw_tokenizer(read_tokenizer_json(tiny_corpus / "tokenizer"))
    texts = _source_docs(0.1)["train"]
    ids, seg = _rows(tiny_corpus, "train"), _rows(tiny_corpus, "train", "segment_ids")
    # segment ids follow the documents: a new one starts right after each EOS inside a row
    assert ((np.diff(seg, axis=1) == 1) == (ids[:, :-1] == m.tokenizer.eos_id)).all()
    # the concatenated rows, cut at EOS, give back the documents in order
    stream = ids.reshape(-1)
    ends = np.flatnonzero(stream == m.tokenizer.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    decoded = [tok.decode(stream[a:b].tolist(), skip_special_tokens=False) for a, b in zip(starts, ends)]
    assert decoded == texts[: len(decoded)] and len(decoded) >= len(texts) - 1


def test_two_runs_give_byte_identical_shards(tiny_corpus, rerun):
    a, b = verify_dataset(tiny_corpus), verify_dataset(rerun.output_dir)
    assert a.tokenizer.sha256 == b.tokenizer.sha256
    for split in ("train", "validation"):
        assert [s.sha256 for s in a.splits[split].shards] == [s.sha256 for s in b.splits[split].shards]
        for s in a.splits[split].shards:
            assert (tiny_corpus / split / s.file).read_bytes() == (
                Path(rerun.output_dir) / split / s.file
            ).read_bytes()
    assert a.fingerprint == b.fingerprint and a.counts == b.counts


def test_rerun_with_same_config_is_a_noop_and_a_different_config_is_refused(rerun):
    out = Path(rerun.output_dir)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    messages: list[str] = []
    prepare_corpus(rerun, log=messages.append)
    assert any("nothing to do" in m for m in messages)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(DatasetError, match="different config"):
        prepare_corpus(rerun.model_copy(update={"seq_len": 32}), log=lambda *a: None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_verify_refuses_missing_altered_or_extra_shards(tiny_corpus, tmp_path):
    good = verify_dataset(tiny_corpus)
    with pytest.raises(DatasetError, match="tokenized with tokenizer"):
        verify_dataset(tiny_corpus, expected_tokenizer_hash="0" * 64)
    assert verify_dataset(tiny_corpus, expected_tokenizer_hash=good.tokenizer.sha256) == good

    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_corpus, tmp_path / name))

    with pytest.raises(DatasetError, match="manifest"):
        d = copy("no_manifest")
        (d / "manifest.json").unlink()
        verify_dataset(d)
    with pytest.raises(DatasetError, match="checksum mismatch"):
        d = copy("flipped")
        shard = d / "train" / "shard-00000.parquet"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
        verify_dataset(d)
    with pytest.raises(DatasetError, match="missing"):
        d = copy("missing")
        (d / "train" / "shard-00000.parquet").unlink()
        verify_dataset(d)
    with pytest.raises(DatasetError, match="not in the manifest"):
        d = copy("extra")
        shutil.copy(d / "train" / "shard-00000.parquet", d / "train" / "shard-09999.parquet")
        verify_dataset(d)
    with pytest.raises(DatasetError, match="tokenizer.json was altered"):
        d = copy("tokenizer")
        with open(d / "tokenizer" / "tokenizer.json", "a") as f:
            f.write(" ")
        verify_dataset(d)
    with pytest.raises(DatasetError, match="does not exist"):
        verify_dataset(tmp_path / "nowhere")


def test_shards_feed_a_ray_train_worker(ray_cluster, tiny_corpus, tmp_path):
    from ray import train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    seq_len = verify_dataset(tiny_corpus).seq_len

    def loop(config):
        rows, ok = 0, True
        for batch in train.get_dataset_shard("train").iter_torch_batches(batch_size=16):
            ok &= tuple(batch["input_ids"].shape[1:]) == (config["seq_len"],)
            ok &= bool((batch["segment_ids"][:, 0] == 0).all())
            rows += batch["input_ids"].shape[0]
        Path(config["out"]).write_text(json.dumps({"rows": rows, "ok": ok}))

    trainer = TorchTrainer(
        loop,
        train_loop_config={"seq_len": seq_len, "out": str(tmp_path / "seen.json")},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path), name="feed"),
        datasets={"train": read_split(tiny_corpus, "train")},
    )
    trainer.fit()
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["ok"] and seen["rows"] == verify_dataset(tiny_corpus).splits["train"].sequences
