"""SFT data: chat template, prompt unmasked / response (and EOS padding) masked, drops counted."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffmoe.data import CorpusConfig, prepare_corpus, verify_dataset


def _table(path: Path, split: str) -> dict:
    files = sorted((path / split).glob("*.parquet"))
    rows: dict = {}
    for f in files:
        for k, v in pq.read_table(f).to_pydict().items():
            rows.setdefault(k, []).extend(v)
    return rows


def _check_rows(rows: dict, seq_len: int, eos: int) -> None:
    for ids, mask, plen, length in zip(
        rows["input_ids"], rows["response_mask"], rows["prompt_length"], rows["length"]
    ):
        ids, mask = np.array(ids), np.array(mask)
        assert len(ids) == len(mask) == seq_len and 0 < plen < length <= seq_len
        assert not mask[:plen].any() and mask[plen:].all()  # response + EOS padding are scored
        assert (ids[length:] == eos).all()


def test_builtin_sft_set_from_function_sources(tiny_sft):
    from transformers import AutoTokenizer

    m = verify_dataset(tiny_sft)
    assert m.kind == "sft" and m.columns["response_mask"] == "list<int8>"
    c = m.counts
    assert c.documents_read == 40 == c.documents_kept + sum(c.dropped.values())
    assert set(c.dropped) <= {"too_long", "syntax_error", "empty"}
    tok = AutoTokenizer.from_pretrained(str(tiny_sft / "tokenizer"))
    rows = _table(tiny_sft, "train")
    assert len(rows["input_ids"]) == m.splits["train"].sequences > 0
    _check_rows(rows, m.seq_len, m.tokenizer.eos_id)
    head, tail = "<role>HUMAN</role>", "<|role_end|><role>ASSISTANT</role>"
    for ids, plen, length in zip(rows["input_ids"], rows["prompt_length"], rows["length"]):
        prompt, response = tok.decode(ids[:plen]), tok.decode(ids[plen:length])
        assert prompt.startswith(head) and prompt.endswith(tail) and response.endswith("<|role_end|>")
        code = prompt[len(head) : -len(tail)] + response[: -len("<|role_end|>")]
        fn = ast.parse(code).body[0]  # signature + docstring + body is one whole function again
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(fn)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    d = tmp_path_factory.mktemp("chats")
    good = [{"prompt": f"What is {i} + {i}?", "response": f"It is {2 * i}."} for i in range(6)]
    good.append(
        {
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"},
            ]
        }
    )
    good.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
    bad = [
        '{"prompt": "no response"}',
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "unanswered"}]}),
        json.dumps({"prompt": "empty answer", "response": "   "}),
        json.dumps({"prompt": "long", "response": "word " * 400}),
    ]
    (d / "chats.jsonl").write_text("\n".join([json.dumps(g) for g in good] + bad) + "\n")
    return d, good


def test_jsonl_chats_masks_and_drops(ray_cluster, tiny_corpus, chats, tmp_path):
    from transformers import AutoTokenizer

    d, good = chats
    cfg = CorpusConfig(
        kind="sft",
        inputs=[str(d / "chats.jsonl")],
        tokenizer={"path": str(tiny_corpus / "tokenizer")},
        seq_len=96,
        validation_fraction=0.5,
        num_tokenize_actors=1,
        output_dir=str(tmp_path / "sft"),
    )
    m = prepare_corpus(cfg, log=lambda *a: None)
    c = m.counts
    assert c.documents_read == 13 and c.documents_kept == 8
    assert c.dropped == {"bad_json": 1, "bad_messages": 1, "empty": 1, "missing_field": 1, "too_long": 1}
    assert m.splits["train"].sequences > 0 and m.splits["validation"].sequences > 0
    tok = AutoTokenizer.from_pretrained(str(tiny_corpus / "tokenizer"))
    chats_by_text = {}
    for g in good:
        msgs = g.get("messages") or [
            {"role": "user", "content": g["prompt"]},
            {"role": "assistant", "content": g["response"]},
        ]
        chats_by_text[tok.apply_chat_template(msgs, tokenize=False)] = msgs
    seen = 0
    for split in ("train", "validation"):
        rows = _table(Path(cfg.output_dir), split)
        _check_rows(rows, cfg.seq_len, m.tokenizer.eos_id)
        for ids, plen, length in zip(rows["input_ids"], rows["prompt_length"], rows["length"]):
            msgs = chats_by_text[tok.decode(ids[:length])]
            assert ids[:length] == tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
            assert tok.decode(ids[:plen]) == tok.apply_chat_template(
                msgs[:-1], tokenize=False, add_generation_prompt=True
            )
            seen += 1
    assert seen == 8 and m.counts.tokens_written == sum(
        sum(_table(Path(cfg.output_dir), s)["length"]) for s in ("train", "validation")
    )


def test_a_tokenizer_with_its_own_chat_template_trains_what_serving_sends(
    ray_cluster, tiny_corpus, chats, tmp_path
):
    """LLaDA2 downloads ship their chat template (a system turn first): SFT rows are rendered with
    it, as dFactory does, so the prompt a model learns from is the one the server sends it."""
    from diffmoe.bench.tiny_model import LLADA2_STYLE_TEMPLATE, _write_chat_template
    from diffmoe.data.tokenizer import ChatEncoder, copy_tokenizer, load_tokenizer, read_tokenizer_json
    from diffmoe.serve.host import own_template_renderer

    tokdir = tmp_path / "tok"
    copy_tokenizer(tiny_corpus / "tokenizer", tokdir)
    _write_chat_template(tokdir, LLADA2_STYLE_TEMPLATE)
    d, good = chats
    cfg = CorpusConfig(
        kind="sft",
        inputs=[str(d / "chats.jsonl")],
        tokenizer={"path": str(tokdir)},
        seq_len=96,
        validation_fraction=0.0,
        num_tokenize_actors=1,
        output_dir=str(tmp_path / "sft"),
    )
    m = prepare_corpus(cfg, log=lambda *a: None)
    tok, _ = load_tokenizer(tokdir)
    render = own_template_renderer(tok, tokdir)
    encoder = ChatEncoder(read_tokenizer_json(tokdir))
    rows = _table(Path(cfg.output_dir), "train")
    _check_rows(rows, cfg.seq_len, m.tokenizer.eos_id)
    want = {}
    for g in good:
        msgs = g.get("messages") or [
            {"role": "user", "content": g["prompt"]},
            {"role": "assistant", "content": g["response"]},
        ]
        whole = tok.apply_chat_template(
            msgs, chat_template=LLADA2_STYLE_TEMPLATE, tokenize=True, return_dict=True
        )
        want[tuple(whole["input_ids"])] = encoder.encode_templated(render, msgs[:-1])  # what serving sends
    assert len(rows["input_ids"]) == len(want) == 8
    for ids, plen, length in zip(rows["input_ids"], rows["prompt_length"], rows["length"]):
        served = want[tuple(ids[:length])]  # the whole row is the template's rendering ...
        assert ids[:plen] == served  # ... and its prompt is exactly the served prompt
        assert tok.decode(ids[:plen]).startswith("<role>SYSTEM</role>")  # the template's system turn
