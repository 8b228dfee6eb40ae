"""Grouped matmul for MoE experts: rows sorted by expert, each expert's weight applied once.

``grouped_mm(x, w, counts)[rows of group g] = x[rows of g] @ w[g].T``. On CUDA with bf16 this is
``torch._grouped_mm`` (one kernel for all experts); elsewhere a loop over the non-empty groups
that writes into preallocated buffers, with a hand-written backward so autograd never builds
full-size zero tensors per expert slice.
"""

from __future__ import annotations

import torch


def _use_fused_kernel(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16 == w.dtype):
        return False
    major, _ = torch.cuda.get_device_capability(x.device)
    # The fused kernel needs Hopper+ and 16-byte aligned strides.
    return major >= 9 and x.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out = x.new_empty(x.shape[0], w.shape[1])
        start = 0
        for g, n in enumerate(counts):
            if n:
                torch.mm(x[start : start + n], w[g].t(), out=out[start : start + n])
                start += n
        ctx.save_for_backward(x, w)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        start = 0
        for g, n in enumerate(ctx.counts):
            if n:
                rows = slice(start, start + n)
                if grad_x is not None:
                    torch.mm(grad_out[rows], w[g], out=grad_x[rows])
                if grad_w is not None:
                    torch.mm(grad_out[rows].t(), x[rows], out=grad_w[g])
                start += n
            elif grad_w is not None:
                grad_w[g].zero_()  # an expert that saw no tokens gets a zero gradient
        return grad_x, grad_w, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x: [T, K] rows grouped by expert; w: [G, N, K]; counts: [G] rows per group -> [T, N]."""
    if _use_fused_kernel(x, w):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    return _GroupedMM.apply(x.contiguous(), w, counts.tolist())


class _Dispatch(torch.autograd.Function):
    """x [N, H] -> x[order // k] [N*k, H]: each token copied once per chosen expert, expert-sorted.

    The backward is a gather plus a sum over the k copies; autograd's default for indexing is an
    accumulating scatter, several times slower on CPU.
    """

    @staticmethod
    def forward(ctx, x, order, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad_x = grad.index_select(0, inverse).view(-1, ctx.k, grad.shape[-1]).sum(1)
        return grad_x, None, None, None


class _Unsort(torch.autograd.Function):
    """y_sorted -> y_sorted[inverse]: back to (token, choice) order; the backward is the reverse gather."""

    @staticmethod
    def forward(ctx, y_sorted, order, inverse):
        ctx.save_for_backward(order)
        return y_sorted.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order), None, None


class _WeightedSwiGLU(torch.autograd.Function):
    """h = [gate | up], routing weight w [T] -> silu(gate) * up * w, fused so the weight is applied
    on the narrow [T, I] activation and the gradient lands in one [T, 2I] buffer."""

    @staticmethod
    def forward(ctx, h, w):
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h, w)
        return torch.nn.functional.silu(gate).mul_(up).mul_(w[:, None])

    @staticmethod
    def backward(ctx, grad):
        h, w = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_w = (grad * silu * up).sum(-1) if ctx.needs_input_grad[1] else None
        grad = grad * w[:, None]
        grad_h = torch.empty_like(h)
        g_gate, g_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, silu, out=g_up)
        torch.mul(grad * up, sig * (1 + gate * (1 - sig)), out=g_gate)
        return grad_h, grad_w


def dispatch(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    return _Dispatch.apply(x, order, inverse, k)


def unsort(y_sorted: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return _Unsort.apply(y_sorted, order, inverse)


def weighted_swiglu(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _WeightedSwiGLU.apply(h, w)
