"""``generate`` for any model family: LLaDA-MoE's sampler or LLaDA2.x block diffusion.

The caller passes LLaDA ``generate``'s keyword arguments plus the block-diffusion ones
(``editing_threshold``, ``max_post_steps``); the model's ``decoding_family`` picks the sampler.
"""

from __future__ import annotations

import torch

from . import block_diffusion, sampler
from .config import DecodingConfig, check_prompt, decoding_family

_LLADA_ONLY = {
    "remasking": "low_confidence",
    "cfg_scale": 0.0,
    "factor": None,
    "cache": "none",
    "attention_mask": None,
}


def generate(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Decode ``gen_length`` tokens after the prompts [B, P]; returns [B, P + gen_length].

    For a block-diffusion model ``steps`` (total, as for LLaDA) is split evenly over the blocks,
    and the LLaDA-only settings (remasking, cfg_scale, factor, cache, left padding) are refused:
    its KV cache is always exact.
    """
    editing = kwargs.pop("editing_threshold", None)
    max_post = kwargs.pop("max_post_steps", 16)
    if decoding_family(getattr(model, "config", None)) != "block_diffusion":
        if editing is not None:
            raise ValueError("editing_threshold is for block-diffusion (LLaDA2.x) models only")
        return sampler.generate(model, input_ids, **kwargs)
    bad = [k for k, default in _LLADA_ONLY.items() if kwargs.get(k, default) != default]
    if bad:
        raise ValueError(f"{', '.join(bad)}: not used by block-diffusion (LLaDA2.x) decoding")
    cfg = DecodingConfig(
        gen_length=kwargs["gen_length"],
        block_length=kwargs.get("block_length", 32),
        steps=kwargs.get("steps"),
        temperature=kwargs.get("temperature", 0.0),
        threshold=kwargs.get("threshold"),
        top_k=kwargs.get("top_k"),
        top_p=kwargs.get("top_p"),
        editing_threshold=editing,
        max_post_steps=max_post,
    )
    check_prompt(getattr(model, "config", None), input_ids.shape[-1], cfg.gen_length)
    return block_diffusion.generate_blocks(
        model,
        input_ids,
        gen_length=cfg.gen_length,
        block_length=cfg.block_length,
        steps=None if cfg.steps is None else cfg.steps_per_block,
        threshold=cfg.threshold,
        editing_threshold=cfg.editing_threshold,
        max_post_steps=cfg.max_post_steps,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        mask_id=kwargs["mask_id"],
        eos_id=kwargs.get("eos_id"),
        generator=kwargs.get("generator"),
        stats=kwargs.get("stats"),
    )
