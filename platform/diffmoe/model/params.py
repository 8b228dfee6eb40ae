"""Parameter counting that distinguishes total from per-token active parameters."""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters, and active ones: what one token touches in a forward pass.

    Active = total - the (E - k)/E share of routed-expert weights - the input embedding table
    (a lookup, not a matmul). This is the convention behind LLaDA-MoE's "7B total / 1.4B active".
    ``active_with_embedding`` keeps the table: the convention behind LLaDA2.0-mini's "16B total /
    1.4B active" (its base model, Ling-mini-2.0, states 789M non-embedding active).
    """
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    inactive = routed * (config.num_experts - config.num_experts_per_tok) // config.num_experts
    embedding = model.get_input_embeddings().weight.numel()
    return {
        "total": total,
        "active": total - inactive - embedding,
        "active_with_embedding": total - inactive,
        "routed_experts": routed,
        "embedding": embedding,
    }
