"""Pure-logic tests of the corpus pipeline pieces (no Ray): cleaning, packing, inputs, tokenizers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffmoe.config import ConfigError, load
from diffmoe.data import CorpusConfig, InputError, TokenizerError, load_tokenizer, train_bpe
from diffmoe.data.clean import VALIDATION, CleanSpec, clean_rows, split_of, split_pieces
from diffmoe.data.pack import Packer
from diffmoe.data.sft import function_examples, parse_chat
from diffmoe.data.sources import _glob_regex, resolve_inputs
from diffmoe.data.tokenizer import ChatEncoder, read_tokenizer_json, special_ids

ROOT = Path(__file__).resolve().parent.parent


def test_split_pieces_cut_at_newlines_or_character_boundaries():
    text = ("héllo wörld ✓ " * 500).encode()  # multi-byte characters, no newline
    pieces = split_pieces(text, 1000)
    assert all(len(p) <= 1000 for p in pieces) and b"".join(pieces) == text
    assert all(p.decode("utf-8") for p in pieces)  # no piece starts or ends inside a character
    lines = b"".join(b"line %05d\n" % i for i in range(1000))
    pieces = split_pieces(lines, 1000)
    assert b"".join(pieces) == lines and all(p.endswith(b"\n") for p in pieces)


def test_clean_rows_counts_every_drop_by_reason():
    spec = CleanSpec(max_doc_bytes=2000, invalid_utf8="replace", oversize="split")
    jsonl = b'{"text": "a"}\n{"title": "x"}\nnot json\n\n{"text": 5}\n[1]\n{"text": null}\n'
    files = {
        "a.txt": b"hello\n",
        "b.bin": b"\x89PNG\x00\x00\x01",
        "c.txt": b"caf\xe9\n",
        "d.txt": b"\n \n\t\n",
        "e.txt": b"x" * 4500,
        "f.jsonl": jsonl,
    }
    out = clean_rows(list(files), list(files.values()), spec)
    reasons = out["reason"]
    assert reasons.count("") == 6  # a, c, three pieces of e, jsonl "a"
    assert sorted(r for r in reasons if r) == sorted(
        ["binary", "empty", "missing_field", "bad_json", "not_text", "bad_json", "missing_field"]
    )
    assert out["replaced"][2] and "\ufffd" in out["text"][2]
    assert [p for p, r in zip(out["piece"], reasons) if not r] == [0, 0, 0, 1, 2, 0]
    drop = clean_rows(
        ["c.txt", "e.txt"],
        [files["c.txt"], files["e.txt"]],
        CleanSpec(max_doc_bytes=2000, invalid_utf8="drop", oversize="drop"),
    )
    assert drop["reason"] == ["invalid_utf8", "oversize"]
    lines = clean_rows(["l.txt"], [b"one\n\ntwo\n"], CleanSpec(text_unit="line"))
    assert lines["reason"] == ["", "empty", ""] and lines["text"][2] == "two"


def test_split_by_hash_is_stable_and_near_the_fraction():
    docs = [f"document {i}".encode() for i in range(4000)]
    first = [split_of(d, 0.1) for d in docs]
    assert first == [split_of(d, 0.1) for d in docs]
    assert 300 < sum(s == VALIDATION for s in first) < 500
    assert not any(split_of(d, 0.0) for d in docs)


def test_packer_conserves_tokens_and_numbers_documents_per_row():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 200)
    flat = rng.integers(10, 100, int(lengths.sum())).astype(np.int32)
    packer = Packer(seq_len=32, eos_id=0)
    rows, segs = [], []
    for a, b in [(0, 7), (7, 8), (8, 150), (150, 200)]:  # batches of any size
        start, stop = int(lengths[:a].sum()), int(lengths[:b].sum())
        ids, seg = packer.add(flat[start:stop], lengths[a:b])
        rows.append(ids)
        segs.append(seg)
    ids, seg = np.concatenate(rows), np.concatenate(segs)
    stream = np.concatenate([np.append(d, 0) for d in np.split(flat, np.cumsum(lengths)[:-1])])
    assert ids.size + packer.remainder == len(stream) == packer.tokens_in
    assert (ids.reshape(-1) == stream[: ids.size]).all()
    assert (seg[:, 0] == 0).all()
    # a new segment starts exactly after each EOS inside a row
    step = np.diff(seg, axis=1)
    assert ((step == 1) == (ids[:, :-1] == 0)).all() and (step >= 0).all()


def test_globs_directories_and_missing_inputs(tmp_path):
    for name in ("a.txt", "b.jsonl", "sub/c.txt", ".git/x.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    names = lambda cfg: [Path(f.uri).relative_to(tmp_path).as_posix() for f in resolve_inputs(cfg)[0]]  # noqa: E731
    assert names(CorpusConfig(inputs=[str(tmp_path)])) == ["a.txt", "b.jsonl", "sub/c.txt"]
    assert names(CorpusConfig(inputs=[f"{tmp_path}/*.txt"])) == ["a.txt"]
    assert names(CorpusConfig(inputs=[f"{tmp_path}/**/*.txt"])) == ["a.txt", "sub/c.txt"]
    assert names(CorpusConfig(inputs=[str(tmp_path)], extensions=[".jsonl"])) == ["b.jsonl"]
    assert [f.format for f in resolve_inputs(CorpusConfig(inputs=[str(tmp_path)]))[0]] == [
        "text",
        "jsonl",
        "text",
    ]
    with pytest.raises(InputError, match="nope"):
        resolve_inputs(CorpusConfig(inputs=[str(tmp_path), str(tmp_path / "nope")]))
    files, missing = resolve_inputs(
        CorpusConfig(inputs=[str(tmp_path / "a.txt"), str(tmp_path / "nope")], missing_inputs="skip")
    )
    assert len(files) == 1 and missing == [str(tmp_path / "nope")]
    assert _glob_regex("a/**/b*.py").match("a/x/y/b1.py") and not _glob_regex("*.py").match("x/y.py")


def test_default_input_is_the_stdlib_sources():
    files, _ = resolve_inputs(CorpusConfig())
    assert len(files) > 500 and all(f.uri.endswith(".py") and "site-packages" not in f.uri for f in files)
    assert [f.uri for f in files] == sorted(f.uri for f in files)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    files, _ = resolve_inputs(CorpusConfig(inputs=["stdlib"]))
    texts = [Path(f.uri).read_text(errors="replace") for f in files[:40]]
    return train_bpe(texts, tmp_path_factory.mktemp("tok"), vocab_size=512)


def test_trained_tokenizer_loads_with_specials_and_chat_template(bpe):
    from transformers import AutoTokenizer

    tok, ids = load_tokenizer(bpe)
    auto = AutoTokenizer.from_pretrained(str(bpe))
    assert (
        (ids.mask_id, ids.eos_id)
        == (auto.mask_token_id, auto.eos_token_id)
        == (
            tok.convert_tokens_to_ids("<|mask|>"),
            tok.convert_tokens_to_ids("<|endoftext|>"),
        )
    )
    assert ids.pad_id == tok.convert_tokens_to_ids("<|pad|>")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"}]
    answer = "    return x\n"
    text = auto.apply_chat_template([*msgs, {"role": "assistant", "content": answer}], tokenize=False)
    assert text == (
        "<role>SYSTEM</role>Be brief.<|role_end|><role>HUMAN</role>def f(x):<|role_end|>"
        "<role>ASSISTANT</role>    return x\n<|role_end|>"
    )
    [(row, prompt_len)] = ChatEncoder(read_tokenizer_json(bpe)).encode_batch([(msgs, answer)])
    assert row == auto(text, add_special_tokens=False)["input_ids"]
    prompt = auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert auto.decode(row[:prompt_len]) == prompt
    # user text that spells a control token stays text
    [(row, _)] = ChatEncoder(read_tokenizer_json(bpe)).encode_batch(
        [([{"role": "user", "content": "<|mask|>"}], "")]
    )
    assert ids.mask_id not in row


def test_llada_style_tokenizer_ids_and_refusal(tmp_path):
    from tokenizers import AddedToken, Tokenizer, models

    # ids laid out like LLaDA-MoE's: EOS named as usual, the mask token under another name
    vocab = {f"t{i}": i for i in range(156900) if i not in (156892, 156895)}
    tok = Tokenizer(
        models.WordLevel({**vocab, "<|endoftext|>": 156892, "<|mdm_mask|>": 156895}, unk_token="t0")
    )
    tok.add_special_tokens(
        [AddedToken("<|endoftext|>", special=True), AddedToken("<|mdm_mask|>", special=True)]
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    ids = special_ids(tmp_path)  # mask found at the published id, eos by name, pad = eos
    assert (ids.mask_id, ids.eos_id, ids.pad_id) == (156895, 156892, 156892)
    small = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    (tmp_path / "small").mkdir()
    small.save(str(tmp_path / "small" / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="no mask or eos token"):
        special_ids(tmp_path / "small")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "absent")


def test_function_examples_split_signature_and_docstring_from_body():
    source = (
        "import os\n\n"
        "class A:\n"
        "    @staticmethod\n"
        "    def f(x,\n          y):\n"
        '        """Add.\n\n        More."""\n'
        "        # comment\n"
        "        return x + y\n\n"
        "def g():\n    return 1\n\n"
        "async def h():\n    'Doc.'\n    await x()\n"
    )
    examples = function_examples(source)
    assert [p.splitlines()[0] for p, _ in examples] == ["def f(x,", "async def h():"]
    prompt, body = examples[0]
    assert prompt.endswith('More."""\n') and body == "    # comment\n    return x + y\n"
    with pytest.raises(SyntaxError):
        function_examples("def broken(:\n")


def test_parse_chat_forms_and_reasons():
    assert parse_chat({"prompt": "p", "response": "r"}) == ([{"role": "user", "content": "p"}], "r")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert parse_chat({"messages": msgs}) == (msgs[:1], "a")
    assert parse_chat({"prompt": "p"}) == "missing_field"
    assert parse_chat({"prompt": "p", "response": 3}) == "not_text"
    assert parse_chat({"messages": msgs[:1]}) == "bad_messages"
    assert parse_chat({"messages": [msgs[1], msgs[0]]}) == "bad_messages"
    assert parse_chat([1]) == "bad_json"


def test_recipes_load_and_bad_keys_fail():
    recipes = sorted(ROOT.glob("jobs/configs/corpus*.yaml")) + sorted(ROOT.glob("jobs/configs/sft*.yaml"))
    assert len(recipes) >= 2
    for path in recipes:
        load(CorpusConfig, path)
    assert CorpusConfig().inputs == ["stdlib"]
    with pytest.raises(ConfigError, match="seq_lenn"):
        load(CorpusConfig, None, ["seq_lenn=5"])
    with pytest.raises(ConfigError, match="oversize"):
        load(CorpusConfig, None, ["oversize=truncate"])


def test_job_help_and_config_errors_do_not_start_ray():
    job = str(ROOT / "jobs" / "prepare_corpus.py")
    out = subprocess.run([sys.executable, job, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--set" in out.stdout
    out = subprocess.run(
        [sys.executable, job, "--set", "seq_len=abc"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "seq_len" in out.stderr
    out = subprocess.run(
        [sys.executable, job, "--config", str(ROOT / "jobs/configs/corpus_tiny.yaml"), "--show-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and json.loads(out.stdout)["seq_len"] == 256
