"""A tiny, randomly initialised but complete model directory (weights + tokenizer with chat template)
for serving tests and benchmarks: it exercises every code path without a trained checkpoint."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def _texts(limit: int = 40) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:limit]
    return [f.read_text(errors="ignore")[:20000] for f in files]


def make_tiny_model_dir(
    out: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 384,
    max_positions: int = 256,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write ``out`` with config.json, model.safetensors and the tokenizer files; return it."""
    import torch

    from diffmoe.data.tokenizer import copy_tokenizer, load_tokenizer, train_bpe
    from diffmoe.model import LLaDAMoEModelLM, named_config

    out = Path(out)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, out)
    else:
        train_bpe(_texts(), out, vocab_size=vocab_size)
    tok, ids = load_tokenizer(out)
    torch.manual_seed(seed)
    cfg = named_config(
        "tiny",
        vocab_size=len(tok),
        max_position_embeddings=max_positions,
        mask_token_id=ids.mask_id,
        eos_token_id=ids.eos_id,
        pad_token_id=ids.pad_id,
    )
    model = LLaDAMoEModelLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)  # decisive predictions: ties would make equality flaky
        model.lm_head.weight[ids.eos_id].mul_(0.2)  # answers run to their length rather than stop at once
    model.save_pretrained(out)
    return out
