"""Decoding settings: one validated model shared by ``generate``, the ``Engine`` and the server.

Invalid combinations fail here, before any forward pass, with a message naming the setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffmoe.config import StrictModel, model_family


class DecodingConfig(StrictModel):
    """How one answer is decoded.

    The answer is a canvas of ``gen_length`` [MASK] tokens decoded in blocks of ``block_length``
    from left to right (semi-autoregressive). Without ``threshold`` / ``factor`` every block gets
    ``steps / num_blocks`` steps and each step commits a fixed share of the block (LLaDA). With one
    of them a step commits every masked token of the block that is confident enough, at least one,
    and a block takes as many steps as it needs (``steps`` is then unused).
    """

    gen_length: int = Field(128, ge=1)  # canvas length (answer positions), a multiple of block_length
    block_length: int = Field(32, ge=1)
    steps: int | None = Field(None, ge=1)  # total steps of the fixed schedule; None = gen_length
    temperature: float = Field(0.0, ge=0.0)  # 0 = argmax; > 0 = Gumbel-max sampling in float64
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    threshold: float | None = Field(None, gt=0.0, le=1.0)  # Fast-dLLM confidence-threshold decoding
    factor: float | None = Field(None, gt=0.0)  # Fast-dLLM factor rule: n-th best needs conf >= 1 - f/(n+1)
    cfg_scale: float = Field(0.0, ge=0.0)  # classifier-free guidance (second pass with the prompt masked)
    # KV cache: "prefix" caches everything before the block, "dual" also the masked suffix.
    cache: Literal["none", "prefix", "dual"] = "none"
    refresh_every: int | None = Field(
        None, ge=1
    )  # full pass every N steps inside a block (always at its start)
    vicinity: int = Field(0, ge=0)  # dual cache: also recompute this many tokens after the block each step
    max_tokens: int | None = Field(None, ge=1)  # return at most this many answer tokens (stops early)
    stop: list[str] = Field(default_factory=list)  # stop strings: the answer ends before the first one
    stop_token_ids: list[int] = Field(default_factory=list)  # extra ids that end the answer like EOS
    ignore_eos: bool = False  # keep decoding the whole canvas past EOS
    seed: int | None = None  # for temperature > 0 or random remasking; None = nondeterministic
    top_k: int | None = Field(None, ge=1)  # sampling (temperature > 0): keep the k most likely tokens
    top_p: float | None = Field(None, gt=0.0, le=1.0)  # sampling: keep the smallest set with this mass
    # Block diffusion (LLaDA2.x) only: LLaDA2.1 token editing rewrites decoded tokens of the current
    # block whose new prediction differs with probability above this; a block without masks left
    # gets at most ``max_post_steps`` editing steps. 0 rewrites every token whose prediction changed.
    editing_threshold: float | None = Field(None, ge=0.0, le=1.0)
    max_post_steps: int = Field(16, ge=0)

    @model_validator(mode="after")
    def _check(self) -> DecodingConfig:
        problems = []
        if self.gen_length % self.block_length:
            problems.append(f"block_length={self.block_length} does not divide gen_length={self.gen_length}")
        elif not self.parallel:
            blocks, steps = self.num_blocks, self.total_steps
            if steps < blocks:
                problems.append(
                    f"steps={steps} is fewer than the number of blocks ({blocks}): need >= 1 per block"
                )
            elif steps % blocks:
                problems.append(f"steps={steps} is not a multiple of the number of blocks ({blocks})")
        if self.threshold is not None and self.factor is not None:
            problems.append("set threshold or factor, not both")
        if self.vicinity and self.cache != "dual":
            problems.append(f"vicinity={self.vicinity} needs cache='dual' (cache={self.cache!r})")
        if self.refresh_every is not None and self.cache == "none":
            problems.append("refresh_every needs cache='prefix' or 'dual'")
        if any(not s for s in self.stop):
            problems.append("stop strings must be non-empty")
        if problems:
            raise ValueError("invalid decoding settings: " + "; ".join(problems))
        return self

    @property
    def parallel(self) -> bool:
        """Dynamic (threshold / factor) rather than fixed-schedule decoding."""
        return self.threshold is not None or self.factor is not None

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else self.gen_length

    @property
    def steps_per_block(self) -> int:
        return self.total_steps // self.num_blocks


def decoding_family(model_config) -> str:
    """How a model decodes: "autoregressive" (the causal twin), "block_diffusion" (LLaDA2.x: aligned
    blocks, block-causal attention, exact KV cache) or "masked_diffusion" (LLaDA-MoE); the model's
    config says which (``diffmoe.config.model_family``)."""
    return model_family(model_config)


def check_prompt(model_config, prompt_length: int, gen_length: int) -> None:
    """The prompt plus the answer canvas must fit the model's positions."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and prompt_length + gen_length > limit:
        raise ValueError(
            f"prompt ({prompt_length} tokens) + gen_length ({gen_length}) = {prompt_length + gen_length} "
            f"exceeds the model's context (max_position_embeddings={limit})"
        )
