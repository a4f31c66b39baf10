"""A faithful re-implementation of the official LoRACLR per-layer solver, on raw stacked tensors.

Transcribed from the behaviour of ``update_contrastive`` in the official ``weight_fusion.py``
(enisimsar/LoRACLR @ 93e34e0; described in docs: /work/shared/reference/methods.md §1.4): Δ starts at 0,
AdamW (lr 1e-4, weight decay 1e-4), ``iters`` steps, the loss is evaluated before each step and the
iterate with the lowest loss is kept. Differences, on purpose: everything in float32 (the official code
runs under CUDA autocast/GradScaler, which on CPU is a no-op), and the function returns ``Δ_best`` (the
official one returns ``W0 + Δ_best``) plus the loss history.

This module is the yardstick of tests and of ``bench/merge_speed.py``; the library's solvers live in
``solvers.py`` and work from sufficient statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pairwise_dist(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Official distance matrix ``D[i, j] = ‖vec(pred_i) − vec(target_j)‖`` via the expanded form.

    pred, target: ``[N, ...]``; returns ``[N, N]``; ``sqrt(clamp(‖a‖² + ‖b‖² − 2⟨a, b⟩, 1e-12))``.
    """
    b = pred.shape[0]
    a = pred.reshape(b, -1)
    v = target.reshape(b, -1)
    a_sq = a.pow(2).sum(dim=1, keepdim=True)
    v_sq = v.pow(2).sum(dim=1, keepdim=True).T
    dist_sq = a_sq + v_sq - 2 * a @ v.T
    return torch.sqrt(torch.clamp(dist_sq, min=1e-12))


def official_contrastive_term(pred: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """``(1/N) Σ_i [D_ii² + max(0, m − min_{j≠i} D_ij)²]`` exactly as the official ``contrastive_loss``."""
    dist = _pairwise_dist(pred, target)
    b = dist.shape[0]
    pos = torch.diagonal(dist)
    mask = torch.eye(b, dtype=torch.bool, device=dist.device)
    neg = dist.masked_fill(mask, float("inf")).min(dim=1)[0]
    return (pos.pow(2) + torch.clamp(margin - neg, min=0.0).pow(2)).mean()


def official_loss(
    W0: torch.Tensor,
    delta: torch.Tensor,
    X: torch.Tensor,
    Y: torch.Tensor,
    margin: float = 0.5,
    lambda_con: float = 1.0,
    lambda_mse: float = 0.1,
    lambda_reg: float = 1e-3,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The official per-layer loss, a direct transcription (float32; ``dtype=torch.float64`` to score results
    without the cancellation of the expanded distance formula).

    W0, delta: ``[d_out, d_in]``; X: ``[N, n, d_in]`` inputs; Y: ``[N, n, d_out]`` targets
    ``Y_i = X_i (W0 + ΔW_i)ᵀ``. Returns the scalar
    ``λ_con·(1/N)Σ_i[pos_i² + max(0, m − neg_i)²] + λ_mse·mean((Ŷ − Y)²) + λ_reg·‖Δ‖_F``
    (a term whose λ is 0 is skipped, as in the official code).
    """
    pred = F.linear(X.to(dtype), W0.to(dtype) + delta.to(dtype))
    Y = Y.to(dtype)
    total = pred.new_zeros(())
    if lambda_con:
        total = total + official_contrastive_term(pred, Y, margin) * lambda_con
    if lambda_mse:
        total = total + F.mse_loss(pred, Y) * lambda_mse
    if lambda_reg:
        total = total + torch.norm(delta.to(dtype), p=2) * lambda_reg
    return total


def official_update_contrastive(
    W0: torch.Tensor,
    X: torch.Tensor,
    Y: torch.Tensor,
    iters: int = 50,
    lr: float = 1e-4,
    margin: float = 0.5,
    lambda_con: float = 1.0,
    lambda_mse: float = 0.1,
    lambda_reg: float = 1e-3,
    weight_decay: float = 1e-4,
) -> tuple[torch.Tensor, list[float]]:
    """The official per-layer loop. Returns ``(Δ_best [d_out, d_in] float32, losses [iters])``.

    ``losses[t]`` is the loss of the iterate before step t; ``Δ_best`` the iterate with the lowest of them.
    X: ``[N, n, d_in]``, Y: ``[N, n, d_out]`` (equal row counts, as ``torch.stack`` in the official code).
    """
    W = W0.detach().float()
    X = X.detach().float()
    Y = Y.detach().float()
    offset = torch.nn.Parameter(torch.zeros_like(W))
    opt = torch.optim.AdamW([offset], lr=lr, weight_decay=weight_decay)
    best_loss = float("inf")
    best = torch.zeros_like(W)
    losses: list[float] = []
    for _ in range(iters):
        opt.zero_grad()
        loss = official_loss(W, offset, X, Y, margin, lambda_con, lambda_mse, lambda_reg)
        val = float(loss.item())
        losses.append(val)
        if val < best_loss:
            best_loss = val
            best = offset.detach().clone()
        loss.backward()
        opt.step()
    return best, losses
