"""lm-eval's ``diffmoe`` model: any platform model source, evaluated the way it is served.

- ``generate_until``: every request goes through the serving ``Engine`` with the family's decoding
  (``decoding``: threshold / block settings as served; temperature from the task), stop strings as
  ``DecodingConfig.stop`` and the tokenizer's end markers as stop tokens.
- ``loglikelihood``: minus the platform's one validation loss (``diffusion.validation_loss_sum``)
  of the continuation given the context: for a diffusion model a Monte-Carlo estimate of the ELBO
  (mask ratio p per draw, continuation tokens masked with p, sum of CE / p; ``mc_num`` draws), a
  lower bound on the log-likelihood as LLaDA's evaluation uses it; for a block-diffusion model the
  block bound; for the causal AR twin the exact log-likelihood. ``is_greedy`` is exact for the AR
  twin and, for diffusion models, whether one forward with the whole continuation masked predicts
  it (an approximation of greedy decoding).
- ``loglikelihood_rolling``: the same over the whole text (after one end token as context).
"""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval.models  # noqa: F401 - lm-eval's own models first: its registry loads them only while empty
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from diffmoe.config import AUTOREGRESSIVE, BLOCK_DIFFUSION, model_family
from diffmoe.diffusion import validation_loss_sum
from diffmoe.generation import DecodingConfig, Engine
from diffmoe.rng import device_generator


@register_model("diffmoe")
class DiffmoeLM(LM):
    def __init__(
        self,
        pretrained: str,
        tracking_uri: str | None = None,
        mc_num: int = 8,
        batch_size: int | str = 16,
        decoding: DecodingConfig | dict | str | None = None,
        seed: int = 0,
        device: str | None = None,
        **_ignored,
    ):
        super().__init__()
        from diffmoe.data import load_tokenizer
        from diffmoe.data.tokenizer import end_of_turn_ids
        from diffmoe.model.source import load_model, resolve

        path = resolve(pretrained, tracking_uri)
        self.model = load_model(Path(path), device=device)
        self.tokenizer, self.special = load_tokenizer(path)
        self.mc_num, self.seed = int(mc_num), int(seed)
        if isinstance(decoding, str):  # lm_eval --model_args decoding='{"threshold": 0.9}'
            decoding = json.loads(decoding)
        base = decoding if isinstance(decoding, DecodingConfig) else DecodingConfig(**(decoding or {}))
        self.base = base
        self.family = model_family(self.model.config)
        self.engine = Engine(
            self.model,
            self.tokenizer,
            max_batch_size=16 if str(batch_size).startswith("auto") else int(batch_size),
            mask_id=self.special.mask_id,
            eos_id=self.special.eos_id,
        )
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        self.pretrained = pretrained

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return str(self.pretrained).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(  # as lm-eval's HF model: a gen_prefix is continued
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- generation --------------------------------------------------------------------------
    def decoding_for(self, gen_kwargs: dict) -> DecodingConfig:
        """The served decoding settings with the task's length cap, stops and sampling, read as
        lm-eval's HF model reads them (``max_gen_toks`` or its aliases; ``do_sample`` implied by a
        temperature above 0)."""
        base = self.base
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        names = ("max_gen_toks", "max_new_tokens", "max_tokens")
        max_new = int(next((gen_kwargs[k] for k in names if gen_kwargs.get(k)), base.gen_length))
        # a block-diffusion model decodes in the block it was trained with; others shrink to the cap
        block = base.block_length if self.family == BLOCK_DIFFUSION else min(base.block_length, max_new)
        gen = -(-max_new // block) * block  # a canvas of whole blocks, the answer cut at max_new
        steps = None
        if base.steps is not None:  # the configured steps per token, per block of this canvas
            steps = max(1, round(block * base.total_steps / base.gen_length)) * (gen // block)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        sample = gen_kwargs.get("do_sample")
        sample = temperature > 0 if sample is None else bool(sample)
        top_k, top_p = gen_kwargs.get("top_k"), gen_kwargs.get("top_p")
        return base.model_copy(
            update={
                "gen_length": gen,
                "block_length": block,
                "steps": steps,
                "max_tokens": max_new,
                "stop": until,
                "stop_token_ids": self.stop_ids,
                "temperature": (temperature or 1.0) if sample else 0.0,
                "top_k": int(top_k) if sample and top_k and int(top_k) > 0 else None,
                "top_p": float(top_p) if sample and top_p and float(top_p) < 1 else None,
                "seed": self.seed,
            }
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts = [self.tok_encode(r.args[0]) for r in requests]
        configs = [self.decoding_for(dict(r.args[1] or {})) for r in requests]
        return [out.text for out in self.engine.run(prompts, configs)]

    # ---- likelihoods -------------------------------------------------------------------------
    @torch.inference_mode()
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        if not context:  # nothing to condition on: one end token, as lm-eval's HF models do
            context = [self.special.eos_id]
        ids = torch.tensor([context + continuation], device=self.device)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        scored[:, len(context) :] = True
        gen = device_generator(self.device, self.seed)
        nats, _ = validation_loss_sum(
            self.model,
            ids,
            mask_id=self.model.config.mask_token_id,
            response_mask=scored,
            generator=gen,
            draws=self.mc_num,
        )
        return -float(nats), self._greedy(ids, len(context))

    def _greedy(self, ids: torch.Tensor, start: int) -> bool:
        target = ids[0, start:]
        if self.family == AUTOREGRESSIVE:
            logits = self.model(ids).logits[0, start - 1 : -1]
        else:
            masked = ids.clone()
            masked[0, start:] = self.model.config.mask_token_id
            logits = self.model(masked).logits[0, start:]
        return bool((logits.argmax(-1) == target).all())

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As lm-eval's HF model splits them: the context's trailing spaces go to the continuation,
        and the continuation's ids are what the whole text adds after the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self.tok_encode(context + continuation), self.tok_encode(context)
        return head, whole[len(head) :]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [self._score(*self._encode_pair(c, x)) for c, x in (r.args for r in requests)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [self._score([], self.tok_encode(r.args[0]))[0] for r in requests]
