"""Fusion masks from attention maps (official CLoRA rule, made exact).

For each LoRA branch k ≥ 1: its own concept-token maps (on branch k's attention) thresholded at
``A > α·max(A)`` per token, union over the tokens; optional 3×3 dilation / erosion (max-pool based);
branch 0 (no LoRA) takes every position no LoRA mask covers; nearest-upsampled to the latent size;
overlaps averaged, so the weights of the branches sum to 1 at every latent pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _dilate(m: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        m = F.max_pool2d(m, 3, stride=1, padding=1)
    return m


def _erode(m: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        m = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return m


def concept_masks(
    maps: torch.Tensor,
    mask_tokens: Sequence[Sequence[int]],
    hw: tuple[int, int],
    threshold: float = 0.3,
    dilate: int = 0,
    erode: int = 0,
) -> torch.Tensor:
    """Binary masks ``[B, K, h, w]`` (float 0/1) at map resolution; column 0 = background (branch 0).

    ``maps``: ``[B, K, N, T]`` (N = h·w); ``mask_tokens[k]``: token positions of branch k's concept
    (empty for branch 0). ``dilate``/``erode``: number of 3×3 max-pool passes (dilation first).
    """
    b, k, n, _ = maps.shape
    h, w = hw
    if h * w != n:
        raise ValueError(f"maps have {n} positions, not {h}×{w}")
    out = torch.zeros(b, k, h, w, dtype=torch.float32, device=maps.device)
    for br in range(1, k):
        tokens = list(mask_tokens[br]) if br < len(mask_tokens) else []
        if not tokens:
            continue
        a = maps[:, br][:, :, tokens].detach().float()  # [B, N, nt]
        thr = threshold * a.amax(dim=1, keepdim=True)
        m = (a > thr).any(dim=2).float().reshape(b, 1, h, w)
        if dilate:
            m = _dilate(m, dilate)
        if erode:
            m = _erode(m, erode)
        out[:, br] = m[:, 0]
    out[:, 0] = (out[:, 1:].sum(dim=1) == 0).float() if k > 1 else 1.0
    return out


def fusion_weights(masks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Nearest-upsample ``[B, K, h, w]`` masks to the latent size and average overlaps →
    ``[B, K, 1, H, W]`` weights summing to 1 at every pixel (a pixel with no mask goes to branch 0)."""
    m = F.interpolate(masks, size=tuple(latent_hw), mode="nearest")
    none = m.sum(dim=1, keepdim=True) == 0
    if bool(none.any()):
        m = m.clone()
        m[:, :1] = torch.where(none, torch.ones_like(m[:, :1]), m[:, :1])
    return (m / m.sum(dim=1, keepdim=True)).unsqueeze(2)


def fuse(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k weights[:, k]·outputs[:, k]: ``outputs`` ``[B, K, C, H, W]``, ``weights`` ``[B, K, 1, H, W]``.
    With one branch (weight exactly 1) this returns ``outputs[:, 0]`` bit for bit."""
    if outputs.shape[1] == 1:
        return outputs[:, 0]
    return (outputs * weights.to(outputs.dtype)).sum(dim=1)
