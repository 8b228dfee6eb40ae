"""A messy corpus made here (binary file, invalid UTF-8, blank lines, a 5 MB single line, JSONL with
missing fields, Parquet with nulls, a missing path) is processed or rejected exactly as configured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffmoe.data import CorpusConfig, InputError, prepare_corpus, verify_dataset
from diffmoe.data import pack as pack_module
from diffmoe.data.sources import stdlib_root
from diffmoe.data.tokenizer import raw_tokenizer, read_tokenizer_json

BIG = ("long line é ✓ " * 400_000)[:5_000_000]  # 5 MB+ of multi-byte text, no newline


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    d = root / "corpus"
    d.mkdir()
    (d / "a_good.txt").write_text("def hello():\n    return 'world'\n")
    (d / "b_image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (d / "c_latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (d / "d_blank.txt").write_text("\n\n   \n\t\n")
    (d / "e_big.txt").write_text(BIG)
    (d / "f_docs.jsonl").write_text(
        '{"text": "first json doc"}\n{"title": "no text field"}\nnot json at all\n\n'
        '{"text": 42}\n{"text": "second json doc"}\n'
    )
    table = pa.table({"text": ["parquet one", None, "", "parquet two"], "id": [1, 2, 3, 4]})
    pq.write_table(table, d / "g_rows.parquet")
    return root


def _cfg(messy: Path, tiny_corpus: Path, name: str, **kw) -> CorpusConfig:
    return CorpusConfig.model_validate(
        {
            "inputs": [str(messy / "corpus"), str(messy / "missing.txt")],
            "tokenizer": {"path": str(tiny_corpus / "tokenizer")},
            "seq_len": 64,
            "validation_fraction": 0.0,
            "num_tokenize_actors": 1,
            "output_dir": str(messy / name),
            **kw,
        }
    )


def test_missing_path_is_rejected_before_any_work(messy, tiny_corpus):
    with pytest.raises(InputError, match="missing.txt"):
        prepare_corpus(_cfg(messy, tiny_corpus, "error"), log=lambda *a: None)
    assert not (messy / "error").exists()


def test_replace_and_split_policy_counts(ray_cluster, messy, tiny_corpus):
    messages: list[str] = []
    cfg = _cfg(messy, tiny_corpus, "lenient", missing_inputs="skip", invalid_utf8="replace", oversize="split")
    m = prepare_corpus(cfg, log=messages.append)
    assert any("missing.txt" in msg for msg in messages) and m.input.missing == [str(messy / "missing.txt")]
    c = m.counts
    # 5 whole text files + 5 JSONL records (blank line skipped) + 4 Parquet rows
    assert c.documents_read == 14
    assert c.dropped == {"binary": 1, "empty": 2, "missing_field": 2, "bad_json": 1, "not_text": 1}
    assert c.documents_kept == 7 and c.utf8_replaced == 1 and c.documents_split == 1
    pieces = -(-len(BIG.encode()) // 1_000_000)  # the 6 MB line becomes pieces of <= 1 MB
    assert m.splits["train"].documents == 7 - 1 + pieces
    verify_dataset(cfg.output_dir)

    tok = raw_tokenizer(read_tokenizer_json(Path(cfg.output_dir) / "tokenizer"))
    rows = [
        (
            np.stack(t.column("input_ids").to_numpy(zero_copy_only=False)),
            np.stack(t.column("segment_ids").to_numpy(zero_copy_only=False)),
        )
        for t in (pq.read_table(f) for f in sorted((Path(cfg.output_dir) / "train").glob("*.parquet")))
    ]
    ids = np.concatenate([r[0] for r in rows])
    seg = np.concatenate([r[1] for r in rows])
    eos = m.tokenizer.eos_id
    # the first row holds whole small documents: each segment decodes to its source text
    first = [tok.decode(ids[0][seg[0] == k][:-1].tolist()) for k in range(seg[0].max())]
    assert first[:2] == ["def hello():\n    return 'world'\n", "café au lait\n".replace("é", "\ufffd")]
    stream = ids.reshape(-1)
    ends = np.flatnonzero(stream == eos)
    docs = [tok.decode(stream[a:b].tolist()) for a, b in zip(np.r_[0, ends[:-1] + 1], ends)]
    assert "".join(docs[2 : 2 + pieces]) == BIG  # the pieces, in order, are the original line
    rest = docs[2 + pieces :]
    assert rest == ["first json doc", "second json doc", "parquet one", "parquet two"][: len(rest)]
    assert c.tokens_written + c.tokens_packing_remainder == c.tokens_produced


def test_drop_policies_counts(ray_cluster, messy, tiny_corpus):
    cfg = _cfg(messy, tiny_corpus, "strict", missing_inputs="skip", invalid_utf8="drop", oversize="drop")
    c = prepare_corpus(cfg, log=lambda *a: None).counts
    assert c.documents_read == 14 and c.documents_kept == 5 and c.documents_split == 0
    assert c.dropped == {
        "binary": 1,
        "empty": 2,
        "missing_field": 2,
        "bad_json": 1,
        "not_text": 1,
        "invalid_utf8": 1,
        "oversize": 1,
    }


def test_parquet_without_the_text_column_is_rejected(messy, tiny_corpus, tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    cfg = _cfg(messy, tiny_corpus, "nocol").model_copy(update={"inputs": [str(tmp_path / "x.parquet")]})
    with pytest.raises(InputError, match="no column 'text'.*body"):
        prepare_corpus(cfg, log=lambda *a: None)


def test_a_crash_leaves_no_dataset_and_a_rerun_recovers(ray_cluster, messy, tiny_corpus, monkeypatch):
    json_pkg = str(Path(stdlib_root()) / "json")  # ~40 KB of real code: many 8-row shards
    cfg = _cfg(messy, tiny_corpus, "crash", shard_max_bytes=4096).model_copy(update={"inputs": [json_pkg]})
    calls = {"n": 0}
    real = pack_module.ShardWriter.flush

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        real(self)

    monkeypatch.setattr(pack_module.ShardWriter, "flush", flaky)
    with pytest.raises(OSError, match="simulated"):
        prepare_corpus(cfg, log=lambda *a: None)
    out = Path(cfg.output_dir)
    assert calls["n"] == 3 and not out.exists() and not list(out.parent.glob(".crash*"))
    monkeypatch.undo()
    # a hard kill would leave the hidden build directory behind: the next run discards it
    (out.parent / ".crash.partial").mkdir()
    (out.parent / ".crash.partial" / "junk").write_text("half")
    messages: list[str] = []
    m = prepare_corpus(cfg, log=messages.append)
    assert any("discarding incomplete output" in msg for msg in messages)
    assert len(m.splits["train"].shards) > 3 and verify_dataset(out) == m
    assert not (out.parent / ".crash.partial").exists()
