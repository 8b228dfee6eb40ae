"""The checkable task: examples, SFT layout, tokenizers, and the evaluator (with an oracle model)."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace

import torch

from diffmoe.generation import DecodingConfig, Engine
from diffmoe.generation.tasks import (
    TASKS,
    AdditionTask,
    CharTokenizer,
    Example,
    LookupTask,
    ReverseTask,
    evaluate,
    make_examples,
    score,
    sft_tensors,
    write_char_tokenizer,
    write_jsonl,
)

TOK = CharTokenizer()


def test_tasks_produce_checkable_examples():
    rng = random.Random(0)
    for _ in range(50):
        ex = ReverseTask(3, 9).sample(rng)
        digits = ex.prompt[:-1]
        assert ex.prompt.endswith(">") and 3 <= len(digits) <= 9 and ex.answer == digits[::-1]
        add = AdditionTask(3).sample(rng)
        a, b = add.prompt[:-1].split("+")
        assert int(add.answer) == int(a) + int(b)
        look = LookupTask(2, 12).sample(rng)
        keys = look.prompt[:-1]
        assert look.prompt.endswith("=") and len(keys) % 2 == 0 and 2 <= len(keys) <= 12
        assert len(look.answer) == len(keys) and look.answer.isalpha()
    # the table is knowledge, fixed across samples: a key always has the same value, keys differ
    pairs = [(ex.prompt[:2], ex.answer[:2]) for ex in make_examples(LookupTask(2, 2), 2000, seed=3)]
    assert len(set(pairs)) == len({k for k, _ in pairs}) == 100 and len({v for _, v in pairs}) > 50
    assert make_examples(ReverseTask(), 5, seed=1) == make_examples(ReverseTask(), 5, seed=1)
    assert make_examples(ReverseTask(), 5, seed=1) != make_examples(ReverseTask(), 5, seed=2)


def test_sft_tensors_layout():
    batch = sft_tensors([Example("123>", "321"), Example("45>", "54")], TOK, seq_len=10)
    ids, mask = batch["input_ids"], batch["response_mask"]
    assert TOK.decode(ids[0].tolist(), skip_special_tokens=False) == "123>321" + "<eos>" * 3
    assert mask[0].tolist() == [False] * 4 + [True] * 6  # response and its EOS padding are scored
    assert batch["prompt_length"].tolist() == [4, 3]


def test_score_is_exact_match():
    exs = [Example("12>", "21"), Example("34>", "43")]
    assert score(exs, ["21", " 43\n"])["accuracy"] == 1.0
    assert score(exs, ["21", "4"])["accuracy"] == 0.5


def test_char_tokenizer_directory_works_with_the_data_package(tmp_path):
    from diffmoe.data import load_tokenizer
    from diffmoe.data.tokenizer import ChatEncoder, read_tokenizer_json

    path = write_char_tokenizer(tmp_path / "tok")
    tok, special = load_tokenizer(path)
    assert (special.mask_id, special.eos_id) == (1, 0)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "907>"}], add_generation_prompt=True, tokenize=True
    )
    ids = list(ids["input_ids"])
    enc, plen = ChatEncoder(read_tokenizer_json(path)).encode_batch(
        [([{"role": "user", "content": "907>"}], "709")]
    )[0]
    assert enc[:plen] == ids and len(ids) == 4 + 7  # content + role markers (role names are single tokens)
    assert tok.decode(enc[plen:], skip_special_tokens=True) == "709"


class ReverseOracle(torch.nn.Module):
    """Reads the digits before '>' and predicts their reversal then EOS; ``wrong`` corrupts answers
    that start with a given digit, so accuracy below 1 is visible."""

    def __init__(self, wrong: str | None = None):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=128, mask_token_id=1, eos_token_id=2)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.wrong = wrong

    def forward(self, ids, attention_mask=None, **kwargs):
        b, n = ids.shape
        logits = torch.zeros(b, n, TOK.vocab_size)
        sep = TOK.encode(">")[0]
        for r in range(b):
            row = ids[r].tolist()
            cut = row.index(sep)
            answer = TOK.decode(row[:cut])[::-1]
            if self.wrong and answer.startswith(self.wrong):
                answer = "0" + answer[1:]
            target = TOK.encode(answer) + [TOK.eos_token_id] * n
            for j in range(cut + 1, n):
                logits[r, j, target[j - cut - 1]] = 20.0
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_evaluate_reports_accuracy_with_variable_length_answers():
    examples = make_examples(ReverseTask(2, 9), 24, seed=3)
    cfg = DecodingConfig(gen_length=12, block_length=4, threshold=0.9)
    perfect = evaluate(Engine(ReverseOracle(), TOK, max_batch_size=8), examples, cfg)
    assert perfect["accuracy"] == 1.0 and perfect["total"] == 24
    assert perfect["steps_per_answer"] <= 3  # whole blocks per step, early stop after the EOS block
    wrong = next(ex.answer[0] for ex in examples if ex.answer[0] != "0")
    flawed = evaluate(Engine(ReverseOracle(wrong=wrong), TOK, max_batch_size=8), examples, cfg)
    expected = sum(not ex.answer.startswith(wrong) for ex in examples) / 24
    assert flawed["accuracy"] == expected < 1.0


def test_rewriting_the_same_task_file_keeps_the_data_fingerprint(tmp_path):
    """A rerun of the dLLM-vs-AR benchmark over the same work dir regenerates the task JSONL; the
    same records must leave the file (size, mtime: part of the data fingerprint) untouched."""
    from diffmoe.data.output import listing_hash
    from diffmoe.data.sources import InputFile

    examples = make_examples(TASKS["reverse"](min_digits=2, max_digits=4), 20, seed=1)
    path = write_jsonl(examples, tmp_path / "task.jsonl")

    def listing():
        st = path.stat()
        return listing_hash([InputFile(str(path), st.st_size, st.st_mtime_ns, "jsonl")])

    before = listing()
    time.sleep(0.01)
    write_jsonl(make_examples(TASKS["reverse"](min_digits=2, max_digits=4), 20, seed=1), path)
    assert listing() == before
    write_jsonl(make_examples(TASKS["reverse"](min_digits=2, max_digits=4), 20, seed=2), path)
    assert listing() != before and len(path.read_text().splitlines()) == 20
