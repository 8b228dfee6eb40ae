"""Tokenizers: train a byte-level BPE, or load an existing Hugging Face tokenizer directory.

The pipeline itself only needs the ``tokenizers`` library (actors get the tokenizer.json text, so no
shared filesystem is required); ``load_tokenizer`` additionally returns the ``transformers`` wrapper
that training and serving code use.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EOS, MASK, PAD = "<|endoftext|>", "<|mask|>", "<|pad|>"
ROLE_OPEN, ROLE_CLOSE, ROLE_END = "<role>", "</role>", "<|role_end|>"
SPECIAL_TOKENS = [EOS, MASK, PAD, ROLE_OPEN, ROLE_CLOSE, ROLE_END]
# LLaDA-MoE ids (REFERENCE.md), used only when the tokenizer names no such token but has one there.
LLADA_MASK_ID, LLADA_EOS_ID = 156895, 156892
ROLE_NAMES = {"system": "SYSTEM", "user": "HUMAN", "human": "HUMAN", "assistant": "ASSISTANT"}

# LLaDA-MoE turn format: <role>HUMAN</role>{content}<|role_end|><role>ASSISTANT</role>{content}<|role_end|>
CHAT_TEMPLATE = (
    "{%- set names = {'system': 'SYSTEM', 'user': 'HUMAN', 'human': 'HUMAN', 'assistant': 'ASSISTANT'} -%}"
    "{%- for message in messages -%}"
    "<role>{{ names.get(message['role'], message['role'] | upper) }}</role>"
    "{{ message['content'] }}<|role_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<role>ASSISTANT</role>{%- endif -%}"
)
# Files that make up a tokenizer directory; anything else (weights) is never copied.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class TokenizerError(ValueError):
    """A tokenizer directory is missing, unreadable, or lacks a required special token."""


@dataclass(frozen=True)
class SpecialIds:
    mask_id: int
    eos_id: int
    pad_id: int


def tokenizer_hash(path: str | Path) -> str:
    """sha256 of ``tokenizer.json``: identifies the vocabulary and merges, not the directory layout."""
    return hashlib.sha256(_tokenizer_json(path).read_bytes()).hexdigest()


def _tokenizer_json(path: str | Path) -> Path:
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"no tokenizer.json in {path} (a fast Hugging Face tokenizer is required)")
    return file


def train_bpe(texts: Iterable[str], out_dir: str | Path, vocab_size: int, min_frequency: int = 2) -> Path:
    """Train a byte-level BPE with the platform's special tokens; save a standard HF directory.

    Digits are split one per token first (as LLaMA's tokenizer does): merged digit runs would give
    every number its own arbitrary split, which makes arithmetic and digit tasks needlessly hard."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"eos_token": EOS, "pad_token": PAD, "mask_token": MASK}
    extra = [ROLE_OPEN, ROLE_CLOSE, ROLE_END]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "bos_token": None,
        "unk_token": None,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", {**special, "additional_special_tokens": extra})
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(src: str | Path, dst: str | Path) -> Path:
    """Copy only the tokenizer files of ``src`` (which may be a whole model directory) to ``dst``."""
    src, dst = Path(src), Path(dst)
    _tokenizer_json(src)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst


def read_tokenizer_json(path: str | Path) -> str:
    return _tokenizer_json(path).read_text()


def raw_tokenizer(tokenizer_json: str, literal_specials: bool = True):
    """A ``tokenizers.Tokenizer``; with ``literal_specials`` text like "<|mask|>" stays plain text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = literal_specials
    tok.no_truncation()
    tok.no_padding()
    return tok


def _declared(path: Path) -> dict[str, str]:
    """Special-token names declared in tokenizer_config.json / special_tokens_map.json."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise TokenizerError(f"{file}: invalid JSON: {err}") from err
        for key in ("mask_token", "eos_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                out[key] = value
    return out


def special_ids(path: str | Path) -> SpecialIds:
    """Mask, EOS and pad ids of a tokenizer directory; pad falls back to EOS (LLaDA pads with EOS)."""
    path = Path(path)
    tok = raw_tokenizer(read_tokenizer_json(path))
    declared = _declared(path)
    added = set(tok.get_added_tokens_decoder())

    def find(key: str, default_name: str, llada_id: int | None) -> int | None:
        for name in (declared.get(key), default_name):
            if name is not None and tok.token_to_id(name) is not None:
                return tok.token_to_id(name)
        if llada_id is not None and llada_id in added:
            return llada_id
        return None

    mask = find("mask_token", MASK, LLADA_MASK_ID)
    eos = find("eos_token", EOS, LLADA_EOS_ID)
    if mask is None or eos is None:
        missing = [n for n, v in (("mask", mask), ("eos", eos)) if v is None]
        raise TokenizerError(
            f"tokenizer {path} has no {' or '.join(missing)} token: declare mask_token/eos_token in "
            f"tokenizer_config.json or add {MASK!r}/{EOS!r}"
        )
    pad = find("pad_token", PAD, None)
    return SpecialIds(mask_id=mask, eos_id=eos, pad_id=eos if pad is None else pad)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn besides EOS: the chat template's role-end marker, when the
    tokenizer has one (a stop token for decoding chat-templated prompts)."""
    role_end = tokenizer.convert_tokens_to_ids(ROLE_END)
    return [role_end] if isinstance(role_end, int) and role_end != tokenizer.unk_token_id else []


def load_tokenizer(path: str | Path):
    """``(PreTrainedTokenizerFast, SpecialIds)`` for a tokenizer directory (trained here or LLaDA-MoE)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    _tokenizer_json(path)
    ids = special_ids(path)
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    except Exception as err:  # transformers raises many types; name the directory
        raise TokenizerError(f"cannot load tokenizer from {path}: {err}") from err
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    return tok, ids


def own_chat_template(path: str | Path) -> str | None:
    """The chat template a tokenizer directory ships (chat_template.jinja, or tokenizer_config.json's
    ``chat_template``: a string or the "default" of a named list), or None."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as err:
        raise TokenizerError(f"{file}: invalid JSON object: {err}") from err
    if isinstance(value, list):
        value = next(
            (t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None
        )
    return value if isinstance(value, str) and value else None


def model_chat_template(path: str | Path) -> str | None:
    """The chat template a model directory ships when it is the model's own (LLaDA2's), or None
    when it ships none or the platform's turn format: what serving renders prompts with and SFT
    renders rows with."""
    template = own_chat_template(path)
    return None if template == CHAT_TEMPLATE else template


def template_renderer(tokenizer_json: str, template: str, special_tokens: dict[str, str]):
    """``render(messages, add_generation_prompt) -> text`` with ``template``, rendered as
    ``apply_chat_template`` renders it for the tokenizer directory (same special-token strings),
    from the tokenizer's JSON alone, so a data worker needs no access to the directory."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), **special_tokens)

    def render(messages, add_generation_prompt: bool) -> str:
        return tok.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    return render


class ChatEncoder:
    """Token ids of a chat with the prompt/response boundary, built piece by piece.

    Control markers are parsed as special tokens; message contents are encoded with special-token
    parsing off, so user text containing "<|endoftext|>" cannot inject a control token. For ordinary
    content the ids equal ``apply_chat_template(..., tokenize=True)``.
    """

    def __init__(self, tokenizer_json: str):
        self.plain = raw_tokenizer(tokenizer_json, literal_specials=True)
        self.control = raw_tokenizer(tokenizer_json, literal_specials=False)
        self._cache: dict[str, list[int]] = {}

    def marker(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.control.encode(text, add_special_tokens=False).ids
        return self._cache[text]

    def header(self, role: str) -> list[int]:
        name = ROLE_NAMES.get(role, role.upper())
        return self.marker(f"{ROLE_OPEN}{name}{ROLE_CLOSE}")

    def encode_batch(self, chats: list[tuple[list[dict[str, str]], str]]) -> list[tuple[list[int], int]]:
        """``[(prompt_messages, response)] -> [(ids, prompt_length)]``; response ends with role_end."""
        contents = [m["content"] for msgs, _ in chats for m in msgs] + [r for _, r in chats]
        encoded = iter(e.ids for e in self.plain.encode_batch(contents, add_special_tokens=False))
        prompts = []
        for msgs, _ in chats:
            ids: list[int] = []
            for m in msgs:
                ids += self.header(m["role"]) + next(encoded) + self.marker(ROLE_END)
            prompts.append(ids + self.header("assistant"))
        return [(p + next(encoded) + self.marker(ROLE_END), len(p)) for p in prompts]

    def encode_templated_chat(
        self, render, messages: list[dict[str, str]], response: str
    ) -> tuple[list[int], int]:
        """``(ids, prompt_length)`` of a chat and its answer under a model's own chat template
        (``render(messages, add_generation_prompt)`` -> text), as dFactory builds SFT rows: the whole
        conversation rendered, the prompt being its rendering up to the assistant's header."""
        prompt = self.encode_templated(lambda m: render(m, True), messages)
        whole = messages + [{"role": "assistant", "content": response}]
        ids = self.encode_templated(lambda m: render(m, False), whole)
        if ids[: len(prompt)] != prompt or len(ids) == len(prompt):
            raise TokenizerError(
                "the chat template does not render the prompt (with the generation prompt) as the start "
                "of the whole conversation, so the answer cannot be told from the prompt"
            )
        return ids, len(prompt)

    def encode_templated(self, render, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids of ``messages`` with a model's own chat template (``render``: messages -> text,
        generation prompt included). The template's text is parsed with special tokens; each message
        content is encoded with them off, exactly as ``encode_batch`` does, so no content can inject
        a control token whatever the template."""
        sentinels = [f"\ue000{i}\ue001" for i in range(len(messages))]
        text = render([{**m, "content": s} for m, s in zip(messages, sentinels)])
        ids: list[int] = []
        for m, sentinel in zip(messages, sentinels):
            head, found, text = text.partition(sentinel)
            if not found or sentinel in text:
                raise ValueError("the chat template must render every message content exactly once, in order")
            ids += self.control.encode(head, add_special_tokens=False).ids if head else []
            ids += self.plain.encode(m["content"], add_special_tokens=False).ids if m["content"] else []
        return ids + (self.control.encode(text, add_special_tokens=False).ids if text else [])
