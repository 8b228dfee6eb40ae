"""Checkable tasks: answers that can be verified exactly, so decoding speed-ups are weighed against
accuracy, not perplexity.

``ReverseTask`` (reverse a digit string of varying length) is the benchmark task: its answers are long
enough for parallel decoding to matter and vary in length, so EOS handling is exercised. ``SortTask``
and ``AdditionTask`` are skills; ``LookupTask`` is knowledge (a fixed table learnt from data). The
``CharTokenizer`` gives every character one id with LLaDA's special layout ([MASK] = 1, EOS = pad = 2)
so ``named_config("tiny", vocab_size=CharTokenizer().vocab_size)`` fits it unchanged.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

SPECIALS = ("<unk>", "<mask>", "<eos>")
CHARS = "0123456789+=>|, abcdefghijklmnopqrstuvwxyz"


class CharTokenizer:
    """One id per character; ids 0-2 are <unk>, [MASK], EOS (also pad). Duck-types the parts of a
    Hugging Face tokenizer the engine uses (``encode``, ``decode``, special-token ids)."""

    def __init__(self, chars: str = CHARS):
        self.itos = list(SPECIALS) + list(chars)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.unk_token_id, self.mask_token_id, self.eos_token_id = 0, 1, 2
        self.pad_token_id = self.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.stoi.get(c, self.unk_token_id) for c in text]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < len(SPECIALS):
                if not skip_special_tokens:
                    out.append(self.itos[i])
            else:
                out.append(self.itos[i])
        return "".join(out)


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class DigitStringTask:
    """A digit string of varying length and an end character in; an answer of the same length out."""

    min_digits: int = 4
    max_digits: int = 16
    end: ClassVar[str] = ">"

    def answer(self, digits: str) -> str:
        raise NotImplementedError

    def sample(self, rng: random.Random) -> Example:
        digits = "".join(
            rng.choice("0123456789") for _ in range(rng.randint(self.min_digits, self.max_digits))
        )
        return Example(prompt=digits + self.end, answer=self.answer(digits))

    @property
    def max_prompt_chars(self) -> int:
        return self.max_digits + 1

    @property
    def max_answer_chars(self) -> int:
        return self.max_digits


@dataclass(frozen=True)
class ReverseTask(DigitStringTask):
    """``"31415>"`` -> ``"51413"``: copy with position arithmetic, one answer token per input digit."""

    name: str = "reverse"

    def answer(self, digits: str) -> str:
        return digits[::-1]


@dataclass(frozen=True)
class AdditionTask:
    """``"123+45="`` -> ``"168"``: short answers with carries; a harder task for tiny models."""

    max_digits: int = 3
    name: str = "addition"

    def sample(self, rng: random.Random) -> Example:
        a, b = (rng.randint(0, 10**self.max_digits - 1) for _ in range(2))
        return Example(prompt=f"{a}+{b}=", answer=str(a + b))

    @property
    def max_prompt_chars(self) -> int:
        return 2 * self.max_digits + 2

    @property
    def max_answer_chars(self) -> int:
        return self.max_digits + 1


@dataclass(frozen=True)
class SortTask(DigitStringTask):
    """``"31415|"`` -> ``"11345"``: sort a digit string of varying length. Every answer token depends
    on the whole prompt (a count over it), not on one source position as in reversal."""

    max_digits: int = 12
    name: str = "sort"
    end: ClassVar[str] = "|"

    def answer(self, digits: str) -> str:
        return "".join(sorted(digits))


@functools.cache
def _lookup_table(seed: int, keys: int) -> tuple[str, ...]:
    """The fixed secret table of ``LookupTask``: two letters for each of ``keys`` keys."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return tuple(rng.choice(letters) + rng.choice(letters) for _ in range(keys))


@dataclass(frozen=True)
class LookupTask(DigitStringTask):
    """``"0429="`` -> ``"qhza"``: every 2-digit key has a fixed two-letter value from a secret table
    (100 entries, seeded). The only way to answer is to have memorised the table from training data:
    knowledge held in the weights, which a model converted from a trained AR twin inherits and one
    trained from scratch must learn again. Held-out prompts are unseen key sequences."""

    max_digits: int = 12
    name: str = "lookup"
    end: ClassVar[str] = "="
    key_digits: ClassVar[int] = 2
    table_seed: ClassVar[int] = 0

    def sample(self, rng: random.Random) -> Example:
        k = self.key_digits
        keys = rng.randint(max(1, -(-self.min_digits // k)), max(1, self.max_digits // k))
        digits = "".join(rng.choice("0123456789") for _ in range(k * keys))
        return Example(prompt=digits + self.end, answer=self.answer(digits))

    def answer(self, digits: str) -> str:
        k = self.key_digits
        table = _lookup_table(self.table_seed, 10**k)
        return "".join(table[int(digits[i : i + k])] for i in range(0, len(digits) - k + 1, k))

    @property
    def max_answer_chars(self) -> int:
        return 2 * (self.max_digits // self.key_digits)


TASKS = {"reverse": ReverseTask, "addition": AdditionTask, "sort": SortTask, "lookup": LookupTask}


def make_examples(task, n: int, seed: int) -> list[Example]:
    """``n`` examples from a seeded stream (train and eval use different seeds)."""
    rng = random.Random(seed)
    return [task.sample(rng) for _ in range(n)]


def write_jsonl(examples: Sequence[Example], path: str | Path) -> Path:
    """SFT records ``{"prompt", "response"}``: the input format of the SFT data pipeline.

    An existing file with the same records is left untouched: its size and mtime are part of the
    data fingerprint, so a rerun over the same work directory reuses the prepared shards."""
    path = Path(path)
    text = "".join(json.dumps({"prompt": ex.prompt, "response": ex.answer}) + "\n" for ex in examples)
    if path.is_file() and path.read_text() == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def sft_tensors(examples: Sequence[Example], tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    """The SFT layout the data pipeline writes: prompt + response + EOS, padded with EOS to
    ``seq_len``; ``response_mask`` covers response and padding (so the model learns to end)."""
    eos = tokenizer.eos_token_id
    ids = torch.full((len(examples), seq_len), eos, dtype=torch.long)
    response_mask = torch.zeros(len(examples), seq_len, dtype=torch.bool)
    prompt_length = torch.zeros(len(examples), dtype=torch.long)
    for i, ex in enumerate(examples):
        p, a = tokenizer.encode(ex.prompt), tokenizer.encode(ex.answer)
        if len(p) + len(a) + 1 > seq_len:
            raise ValueError(f"example {i} needs {len(p) + len(a) + 1} tokens, seq_len={seq_len}")
        ids[i, : len(p)] = torch.tensor(p)
        ids[i, len(p) : len(p) + len(a)] = torch.tensor(a, dtype=torch.long)
        response_mask[i, len(p) :] = True
        prompt_length[i] = len(p)
    return {"input_ids": ids, "response_mask": response_mask, "prompt_length": prompt_length}


def evaluate(engine, examples: Sequence[Example], config=None, encode=None) -> dict[str, float]:
    """Decode every prompt with ``engine`` (an ``Engine``) and score the answers. ``encode`` turns a
    prompt string into token ids (e.g. through a chat template); by default the engine's tokenizer
    encodes the raw prompt."""
    prompts = [encode(ex.prompt) if encode else ex.prompt for ex in examples]
    outputs = engine.run(prompts, config)
    result = score(examples, [o.text for o in outputs])
    result["steps_per_answer"] = sum(o.steps for o in outputs) / max(len(outputs), 1)
    return result


def score(examples: Sequence[Example], outputs: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy of decoded answers (surrounding whitespace ignored)."""
    if len(examples) != len(outputs):
        raise ValueError(f"{len(examples)} examples but {len(outputs)} outputs")
    correct = sum(ex.answer == out.strip() for ex, out in zip(examples, outputs))
    return {"accuracy": correct / max(len(examples), 1), "correct": correct, "total": len(examples)}


def write_char_tokenizer(out_dir: str | Path, chars: str = CHARS) -> Path:
    """Save a character-level Hugging Face tokenizer with the platform's special tokens and chat
    template, so a task's JSONL can go through the SFT data pipeline (``diffmoe.data``) and the
    result loads with ``diffmoe.data.load_tokenizer``. Role names are single tokens to keep the chat
    markers short; everything else is one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from diffmoe.data.tokenizer import CHAT_TEMPLATE, EOS, MASK, PAD, ROLE_CLOSE, ROLE_END, ROLE_OPEN

    specials = [EOS, MASK, PAD, ROLE_OPEN, ROLE_CLOSE, ROLE_END]
    words = ["<unk>", "HUMAN", "ASSISTANT", "SYSTEM", *chars]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("HUMAN|ASSISTANT|SYSTEM|[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": PAD,
        "mask_token": MASK,
        "unk_token": "<unk>",
        "additional_special_tokens": [ROLE_OPEN, ROLE_CLOSE, ROLE_END],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
