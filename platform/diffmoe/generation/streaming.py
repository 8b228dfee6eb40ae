"""Incremental detokenisation for streaming answers, with stop strings.

A diffusion sampler finalises tokens out of order, so what is streamed is the answer's *final
prefix*: the tokens before the first still-masked position. ``TextStream`` turns that growing prefix
into text deltas and holds back the tail that could still become a stop string (or that ends inside
a multi-byte character), so streamed text never has to be taken back.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"  # what byte-level tokenizers decode an incomplete UTF-8 sequence to
CONTEXT = 4  # tokens decoded again before the new ones, so merges / leading spaces come out right


def encode_prompt(tokenizer, prompt) -> list[int]:
    """A prompt given as text (needs a tokenizer) or as token ids -> list of ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
        out = tokenizer.encode(prompt)
        return list(getattr(out, "ids", out))  # tokenizers.Tokenizer returns an Encoding
    return [int(t) for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]


class TextStream:
    """Feed the whole final answer so far (``update``); get back only what is new and safe to show."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the answer")
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.sent_tokens = 0
        self.sent_chars = 0
        self.text = ""  # everything released so far
        self.token_ids: list[int] = []  # tokens released so far
        self._anchor, self._anchor_text = 0, ""  # decode(ids[:anchor]), settled text

    def _decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None or not len(ids):
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _text_of(self, ids: Sequence[int], final: bool = False) -> str:
        """``decode(ids)`` for an answer that only grows between calls, decoding only its new tail
        (plus ``CONTEXT`` tokens before it) instead of the whole answer every step. The last call
        (``final``) settles nothing: no later call would use it."""
        if self.tokenizer is None:
            return ""
        if len(ids) < self._anchor:  # not a continuation: start over
            self._anchor, self._anchor_text = 0, ""
        start = max(0, self._anchor - CONTEXT)
        context = self._decode(ids[start : self._anchor])
        tail = self._decode(ids[start:])
        if not tail.startswith(context):
            return self._decode(ids)
        text = self._anchor_text + tail[len(context) :]
        anchor = len(ids) - CONTEXT  # settle all but the last few tokens, unless mid-character
        if anchor > self._anchor and not final:
            settled = self._decode(ids[start:anchor])
            if (
                settled.startswith(context)
                and not settled.endswith(REPLACEMENT)
                and text.startswith(self._anchor_text + settled[len(context) :])
            ):
                self._anchor_text += settled[len(context) :]
                self._anchor = anchor
        return text

    def _tokens_within(self, ids: Sequence[int], chars: int) -> int:
        """Largest t >= sent_tokens whose text fits in ``chars`` characters."""
        t = self.sent_tokens
        while t < len(ids) and len(self._decode(ids[: t + 1])) <= chars:
            t += 1
        return t

    def update(self, ids: Sequence[int], final: bool) -> tuple[list[int], str, bool]:
        """``ids``: all final answer tokens (already cut at EOS / max_tokens). ``final``: no more will
        come. Returns (new token ids, new text, hit a stop string)."""
        text = self._text_of(ids, final)
        stopped = False
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, stopped, final = text[:cut], True, True
        safe = len(text)
        if not final:
            hold = 0
            for k in range(min(len(text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
                if any(s.startswith(text[-k:]) for s in self.stop):
                    hold = k
                    break
            safe -= hold
            if text[:safe].endswith(REPLACEMENT):
                safe = len(text[:safe].rstrip(REPLACEMENT))
        if stopped:
            n_tok = self._tokens_within(ids, safe)
            if n_tok < len(ids) and len(self._decode(ids[:n_tok])) < safe:
                n_tok += 1  # the token that straddles the stop string
        elif final or safe == len(text):
            n_tok = len(ids)
        else:
            n_tok = self._tokens_within(ids, safe)
        new_ids = list(ids[self.sent_tokens : n_tok])
        new_text = text[self.sent_chars : safe] if safe > self.sent_chars else ""
        self.sent_tokens = max(self.sent_tokens, n_tok)
        self.sent_chars = max(self.sent_chars, safe)
        self.text += new_text
        self.token_ids += new_ids
        return new_ids, new_text, stopped
