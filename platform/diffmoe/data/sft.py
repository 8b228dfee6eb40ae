"""SFT data: chats -> chat-template token ids + response mask -> Parquet.

Inputs are JSONL (``{"prompt", "response"}`` or ``{"messages": [...]}`` ending with an assistant
turn) or Python sources, from which the built-in set is made: a function's signature and docstring
are the prompt, its body the response. Rows are padded to seq_len with EOS, and the padding is part
of the response (LLaDA scores it so the model learns to stop).
"""

from __future__ import annotations

import ast
import json
from collections import Counter
from contextlib import closing
from pathlib import Path

import numpy as np
import pyarrow as pa

from diffmoe.data.clean import SPLITS, TRAIN, CleanSpec, decode, split_of
from diffmoe.data.config import CorpusConfig
from diffmoe.data.manifest import Counts, SplitEntry
from diffmoe.data.pack import ShardWriter, list_column, ragged_column, rows_per_shard
from diffmoe.data.sources import InputError, InputFile
from diffmoe.data.stages import Log, documents, ordered_batches, tokenize, tokenizer_entry
from diffmoe.data.tokenizer import (
    ChatEncoder,
    copy_tokenizer,
    load_tokenizer,
    model_chat_template,
    read_tokenizer_json,
    template_renderer,
    train_bpe,
)

ROLES = ("system", "user", "human", "assistant")


def function_examples(source: str) -> list[tuple[str, str]]:
    """(signature + docstring, body) of every documented function, in source order, dedented.

    ``prompt + response`` is the function's source text. Raises SyntaxError for unparsable files.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    out = []
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in sorted(funcs, key=lambda n: (n.lineno, n.col_offset)):
        if ast.get_docstring(node) is None or len(node.body) < 2:
            continue
        doc_end = node.body[0].end_lineno
        if node.body[1].lineno <= doc_end or doc_end is None:
            continue  # body shares a line with the docstring: no clean cut
        indent = lines[node.lineno - 1][: node.col_offset]
        block = [
            ln[len(indent) :] if ln.startswith(indent) else ln
            for ln in lines[node.lineno - 1 : node.end_lineno]
        ]
        cut = doc_end - node.lineno + 1
        out.append(("".join(block[:cut]), "".join(block[cut:])))
    return out


def parse_chat(record) -> tuple[list[dict[str, str]], str] | str:
    """A JSONL record -> (prompt messages, response), or a drop reason."""
    if not isinstance(record, dict):
        return "bad_json"
    if "messages" in record:
        msgs = record["messages"]
        ok = (
            isinstance(msgs, list)
            and len(msgs) >= 2
            and all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                for m in msgs
            )
        )
        if not ok or msgs[-1]["role"] != "assistant":
            return "bad_messages"
        return [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]], msgs[-1]["content"]
    prompt, response = record.get("prompt"), record.get("response")
    if prompt is None or response is None:
        return "missing_field"
    if not isinstance(prompt, str) or not isinstance(response, str):
        return "not_text"
    return [{"role": "user", "content": prompt}], response


def sft_examples(path: str, data: bytes, spec: CleanSpec):
    """Yield (prompt messages, response) or a drop reason for each example of one file."""
    if path.endswith(".py"):
        doc = decode(data, spec.invalid_utf8)
        if doc.reason:
            yield doc.reason
            return
        try:
            pairs = function_examples(doc.text)
        except (SyntaxError, ValueError):
            yield "syntax_error"  # one drop per unparsable file
            return
        for prompt, body in pairs:
            yield [{"role": "user", "content": prompt}], body
        return
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        doc = decode(line, spec.invalid_utf8)
        if doc.reason:
            yield doc.reason
            continue
        try:
            yield parse_chat(json.loads(doc.text))
        except json.JSONDecodeError:
            yield "bad_json"


def sft_clean_batch(batch: pa.Table, spec: CleanSpec) -> pa.Table:
    """Raw files -> rows ``chat`` (JSON of [messages, response]), ``reason``, ``split``."""
    chats, reasons, splits = [], [], []
    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist()):
        for ex in sft_examples(path, data, spec):
            if isinstance(ex, tuple) and not ex[1].strip():
                ex = "empty"
            if isinstance(ex, str):
                chats.append("")
                reasons.append(ex)
                splits.append(TRAIN)
                continue
            text = json.dumps(ex, ensure_ascii=False)
            chats.append(text)
            reasons.append("")
            splits.append(split_of(text.encode("utf-8"), spec.validation_fraction))
    return pa.table(
        {
            "chat": pa.array(chats, pa.large_string()),
            "reason": pa.array(reasons, pa.string()),
            "split": pa.array(splits, pa.int8()),
        }
    )


class SftTokenizeActor:
    """Chat template + boundaries per example; rows over ``seq_len`` become ``too_long`` drops.
    With ``chat_template`` (the tokenizer directory's own, e.g. LLaDA2's) rows are rendered with
    it, as serving renders prompts for that model; otherwise in the platform's turn format."""

    def __init__(
        self,
        tokenizer_json: str,
        seq_len: int,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ):
        import os

        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.enc, self.seq_len = ChatEncoder(tokenizer_json), seq_len
        self.render = None
        if chat_template is not None:
            self.render = template_renderer(tokenizer_json, chat_template, special_tokens or {})

    def _encode(self, chats: list[tuple[list[dict[str, str]], str]]) -> list[tuple[list[int], int]]:
        if self.render is None:
            return self.enc.encode_batch(chats)
        return [self.enc.encode_templated_chat(self.render, msgs, response) for msgs, response in chats]

    def __call__(self, batch: pa.Table) -> pa.Table:
        reasons = batch.column("reason").to_pylist()
        keep = [i for i, r in enumerate(reasons) if not r]
        chats = batch.column("chat").to_pylist()
        encoded = self._encode([tuple(json.loads(chats[i])) for i in keep])
        ids: list[list[int]] = [[] for _ in reasons]
        prompt_len = [0] * len(reasons)
        for i, (row, plen) in zip(keep, encoded):
            if len(row) > self.seq_len:
                reasons[i] = "too_long"
            else:
                ids[i], prompt_len[i] = row, plen
        return pa.table(
            {
                "ids": ragged_column(ids, pa.int32()),
                "prompt_length": pa.array(prompt_len, pa.int32()),
                "reason": pa.array(reasons, pa.string()),
                "split": batch.column("split"),
            }
        )


def pad_rows(batch: pa.Table, seq_len: int, eos_id: int) -> pa.Table:
    """Kept rows -> the SFT shard schema: EOS padding, response mask 1 from prompt_length on."""
    ids = batch.column("ids").combine_chunks()
    lengths = ids.value_lengths().to_numpy()
    flat = ids.flatten().to_numpy()
    n = len(lengths)
    out = np.full((n, seq_len), eos_id, np.int32)
    out[np.arange(seq_len) < lengths[:, None]] = flat
    plen = batch.column("prompt_length").to_numpy()
    mask = (np.arange(seq_len)[None, :] >= plen[:, None]).astype(np.int8)
    return pa.table(
        {
            "input_ids": list_column(out, pa.int32()),
            "response_mask": list_column(mask, pa.int8()),
            "prompt_length": pa.array(plen, pa.int32()),
            "length": pa.array(lengths.astype(np.int32), pa.int32()),
        }
    )


def sample_chats(batches, want: int) -> list[str]:
    """BPE training text for a standalone SFT set: prompt and response text of the first examples."""
    texts: list[str] = []
    for batch in batches:
        for chat, reason in zip(batch.column("chat").to_pylist(), batch.column("reason").to_pylist()):
            if not reason:
                msgs, response = json.loads(chat)
                texts.append("".join(m["content"] for m in msgs) + response)
                if len(texts) >= want:
                    return texts
    return texts


def write_sft(batches, cfg: CorpusConfig, eos_id: int, out: Path) -> tuple[Counts, dict[str, SplitEntry]]:
    """Consume ordered tokenized examples: count drops, pad kept rows, write shards per split."""
    counts, dropped = Counts(), Counter()
    per_row = rows_per_shard(cfg.shard_max_bytes, cfg.seq_len * 5 + 8)
    writers = {s: ShardWriter(out / name, per_row) for s, name in SPLITS.items()}
    stats = {s: Counter() for s in SPLITS}
    for batch in batches:
        if cfg.max_documents:
            batch = batch.slice(0, cfg.max_documents - counts.documents_read)
            if not len(batch):
                break
        reasons = batch.column("reason").to_pylist()
        dropped.update(r for r in reasons if r)
        counts.documents_read += len(batch)
        kept = np.array([not r for r in reasons], bool)
        split = batch.column("split").to_numpy()
        for s in SPLITS:
            rows = np.flatnonzero(kept & (split == s))
            if len(rows):
                table = pad_rows(batch.take(pa.array(rows)), cfg.seq_len, eos_id)
                writers[s].add(table)
                stats[s]["tokens"] += int(table.column("length").to_numpy().sum())
    splits = {}
    for s, name in SPLITS.items():
        writers[s].flush()
        t, n = stats[s]["tokens"], writers[s].rows
        shards = [vars(x) for x in writers[s].shards]
        splits[name] = SplitEntry(
            documents=n, tokens_produced=t, tokens_written=t, sequences=n, shards=shards
        )
    counts.dropped = dict(sorted(dropped.items()))
    counts.documents_kept = counts.sequences = sum(e.sequences for e in splits.values())
    counts.tokens_produced = counts.tokens_written = sum(e.tokens_written for e in splits.values())
    return counts, splits


def own_template_args(tokenizer_dir: Path) -> dict:
    """The directory's own chat template and its special-token strings, for ``SftTokenizeActor``;
    {} when it ships none or the platform's (then the turn format applies, as in serving)."""
    template = model_chat_template(tokenizer_dir)
    if template is None:
        return {}
    tok, _ = load_tokenizer(tokenizer_dir)
    specials = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    return {"chat_template": template, "special_tokens": specials}


def build_sft(files: list[InputFile], cfg: CorpusConfig, partial: Path, log: Log):
    """Body of ``pipeline.build`` for kind=sft: -> (tokenizer entry, counts, splits)."""
    bad = [f.uri for f in files if f.format != "jsonl" and not f.uri.endswith(".py")]
    if bad:
        raise InputError(f"kind=sft reads JSONL chats or .py sources; cannot use {bad[:5]}")
    cleaned = documents(files, cfg, fn=sft_clean_batch)
    if cfg.tokenizer.path:
        copy_tokenizer(cfg.tokenizer.path, partial / "tokenizer")
        source = cfg.tokenizer.path
    else:
        train = cfg.tokenizer.train
        log(f"training byte-level BPE, vocab {train.vocab_size}")
        with closing(ordered_batches(cleaned)) as batches:
            texts = sample_chats(batches, train.sample_docs)
        train_bpe(texts, partial / "tokenizer", train.vocab_size, train.min_frequency)
        source = "trained"
    tok = tokenizer_entry(source, partial / "tokenizer")
    tok_json = read_tokenizer_json(partial / "tokenizer")
    actor_args = {
        "tokenizer_json": tok_json,
        "seq_len": cfg.seq_len,
        **own_template_args(partial / "tokenizer"),
    }
    datasets = [tokenize(ds, cfg, SftTokenizeActor, **actor_args) for ds in cleaned]
    with closing(ordered_batches(datasets)) as batches:
        counts, splits = write_sft(batches, cfg, tok.eos_id, partial)
    return tok, counts, splits
