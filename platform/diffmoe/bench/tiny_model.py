"""A tiny, randomly initialised but complete model directory (weights + tokenizer with chat template)
for serving tests and benchmarks: it exercises every code path without a trained checkpoint."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def _texts(limit: int = 40) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:limit]
    return [f.read_text(errors="ignore")[:20000] for f in files]


# The shape of LLaDA2's own template: a system turn always comes first.
LLADA2_STYLE_TEMPLATE = (
    "{%- set names = {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT'} -%}"
    "{%- if messages[0]['role'] != 'system' -%}<role>SYSTEM</role>detailed thinking off<|role_end|>{%- endif -%}"
    "{%- for message in messages -%}"
    "<role>{{ names.get(message['role'], message['role'] | upper) }}</role>{{ message['content'] }}<|role_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<role>ASSISTANT</role>{%- endif -%}"
)


def _write_chat_template(out: Path, template: str) -> None:
    import json

    path = out / "tokenizer_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["chat_template"] = template
    path.write_text(json.dumps(data, indent=2))


def make_tiny_model_dir(
    out: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 384,
    max_positions: int = 256,
    tokenizer: str | Path | None = None,
    family: str = "llada-moe",
) -> Path:
    """Write ``out`` with config.json, model.safetensors and the tokenizer files; return it.
    ``family="llada2"``: a ``llada2-tiny`` block-diffusion model whose tokenizer_config.json carries
    its own chat template (a system turn first, as LLaDA2's does)."""
    import torch

    from diffmoe.data.tokenizer import copy_tokenizer, load_tokenizer, train_bpe
    from diffmoe.model import LLaDA2MoeModelLM, LLaDAMoEModelLM, llada2_named_config, named_config

    out = Path(out)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, out)
    else:
        train_bpe(_texts(), out, vocab_size=vocab_size)
    tok, ids = load_tokenizer(out)
    torch.manual_seed(seed)
    sizes = dict(
        vocab_size=len(tok),
        max_position_embeddings=max_positions,
        mask_token_id=ids.mask_id,
        eos_token_id=ids.eos_id,
        pad_token_id=ids.pad_id,
    )
    if family == "llada2":
        model = LLaDA2MoeModelLM(llada2_named_config("llada2-tiny", **sizes)).eval()
        _write_chat_template(out, LLADA2_STYLE_TEMPLATE)
    elif family == "llada-moe":
        model = LLaDAMoEModelLM(named_config("tiny", **sizes)).eval()
    else:
        raise ValueError(f"family={family!r}: use 'llada-moe' or 'llada2'")
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)  # decisive predictions: ties would make equality flaky
        model.lm_head.weight[ids.eos_id].mul_(0.2)  # answers run to their length rather than stop at once
    model.save_pretrained(out)
    return out
