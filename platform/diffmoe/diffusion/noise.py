"""The forward (noising) process shared by the masked- and block-diffusion objectives."""

from __future__ import annotations

import torch


def sample_mask_prob(batch: int, eps: float = 1e-3, antithetic: bool = True, generator=None, device=None):
    """Per-sequence mask probability p [B] in [eps, 1]."""
    if antithetic:
        u = torch.rand(1, generator=generator, device=device)
        t = (u + torch.arange(batch, device=device) / batch) % 1.0
    else:
        t = torch.rand(batch, generator=generator, device=device)
    return (1.0 - eps) * t + eps


def forward_process(input_ids, mask_id: int, p, maskable=None, generator=None):
    """Mask each token with its row's probability p. ``maskable`` False positions (e.g. the SFT
    prompt, padding) are never masked. Returns (noisy_ids, masked bool [B, L])."""
    if p.shape != input_ids.shape[:1]:
        raise ValueError(f"p has shape {tuple(p.shape)}, expected ({input_ids.shape[0]},)")
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    masked = draw < p[:, None]
    if maskable is not None:
        if maskable.shape != input_ids.shape:
            raise ValueError(f"maskable has shape {tuple(maskable.shape)}, expected {tuple(input_ids.shape)}")
        masked &= maskable.bool()
    return torch.where(masked, torch.full_like(input_ids, mask_id), input_ids), masked
