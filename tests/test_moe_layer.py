"""The grouped-expert fast path equals a plain per-token loop, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffmoe.model import LLaDAMoEConfig
from diffmoe.model.grouped_mm import grouped_mm
from diffmoe.model.modeling import MoE


def _plain_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every token, every chosen expert, one at a time."""
    logits, idx, weights = moe.route(x)
    w = moe.experts
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=x.dtype)
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gate, up = w.gate_up_proj[e, : w.width], w.gate_up_proj[e, w.width :]
            acc = acc + weights[t, j] * (w.down_proj[e] @ (F.silu(gate @ x[t]) * (up @ x[t])))
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("top_k,norm", [(1, False), (3, False), (3, True)])
def test_grouped_experts_equal_plain_loop_forward_and_backward(top_k, norm):
    torch.manual_seed(0)
    cfg = LLaDAMoEConfig(
        vocab_size=16,
        hidden_size=24,
        expert_intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_experts=7,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm,
        mask_token_id=1,
    )
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 37, 24, requires_grad=True)
    fast, _ = moe(x)
    fast.square().sum().backward()
    grads_fast = [x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    x.grad = None
    moe.zero_grad()
    plain = _plain_moe(moe, x[0])
    plain.square().sum().backward()
    grads_plain = [x.grad] + [p.grad for p in moe.parameters()]
    torch.testing.assert_close(fast[0], plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_fast, grads_plain):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_grouped_mm_handles_empty_groups():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([2, 0, 3, 0])
    expected = torch.cat([x[:2] @ w[0].T, x[2:] @ w[2].T])
    torch.testing.assert_close(grouped_mm(x, w, counts), expected)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, counts), (x, w))
