"""CLoRA's contrastive loss on attention maps: NT-Xent with cosine similarity, τ = 0.5.

Exactly ``pytorch_metric_learning.losses.NTXentLoss(temperature=τ)`` (2.4.1) with labels = concept
group ids: for every positive pair (a, p) (same label, a ≠ p, both orders)::

    ℓ(a, p) = −log( e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{n: label_n ≠ label_a} e^{s_an/τ}) + tiny )

with s = cosine similarity, and the loss is the mean over positive pairs (0 when there is no positive
or no negative pair). pml subtracts max(s_ap, max_n s_an)/τ before exponentiating and adds
``finfo.tiny`` inside the log; both are reproduced.

Embeddings (official CLoRA): one per (group g, branch b, token t ∈ groups[g][b]): the branch's map
``A_b[:, t]`` (``N = h·w`` values), min–max normalised to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def minmax(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min–max normalise each row of ``[M, D]`` to [0, 1] (a constant row becomes 0)."""
    lo = x.min(dim=-1, keepdim=True).values
    hi = x.max(dim=-1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(eps)


def nt_xent(embeddings: torch.Tensor, labels: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """NT-Xent of ``[M, D]`` embeddings with integer ``[M]`` labels (see the module docstring)."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return _nt_xent(embeddings, labels, tau)


def _nt_xent(embeddings: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    labels = labels.to(embeddings.device)
    if embeddings.dtype not in (torch.float32, torch.float64):
        embeddings = embeddings.float()
    e = F.normalize(embeddings, p=2, dim=1)
    sim = e @ e.t() / tau
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=e.device)
    pos = same & ~eye
    neg = ~same
    if not bool(pos.any()) or not bool(neg.any()):
        return sim.sum() * 0.0
    a, p = torch.nonzero(pos, as_tuple=True)
    s_ap = sim[a, p]
    neg_sim = sim.masked_fill(~neg, float("-inf"))
    neg_max = neg_sim.max(dim=1).values[a]  # -inf for an anchor without negatives
    m = torch.maximum(s_ap, neg_max).detach()
    num = torch.exp(s_ap - m)
    den = num + torch.exp(neg_sim[a] - m[:, None]).sum(dim=1)
    tiny = torch.finfo(sim.dtype).tiny
    return (-torch.log(num / den + tiny)).mean()


def group_embeddings(
    maps: torch.Tensor, groups: Sequence[Sequence[Sequence[int]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and labels for one image: ``maps`` ``[K, N, T]`` (K branches), ``groups[g][b]`` =
    token positions → (``[M, N]`` min–max normalised maps, ``[M]`` group labels)."""
    rows: list[torch.Tensor] = []
    labels: list[int] = []
    for g, per_branch in enumerate(groups):
        for b, tokens in enumerate(per_branch):
            if tokens:
                rows.append(maps[b][:, list(tokens)].t())
                labels.extend([g] * len(tokens))
    if not rows:
        raise ValueError("no token positions in any group")
    emb = torch.cat(rows, dim=0)
    return minmax(emb), torch.tensor(labels, dtype=torch.long)


def clora_loss(
    maps: torch.Tensor, groups: Sequence[Sequence[Sequence[int]]], tau: float = 0.5
) -> torch.Tensor:
    """Sum over images of the NT-Xent loss: ``maps`` ``[B, K, N, T]`` (B images, K branches).

    The per-image losses are summed, so the gradient w.r.t. image i's latent is that of its own loss.
    """
    total = maps.new_zeros(())
    for i in range(maps.shape[0]):
        emb, labels = group_embeddings(maps[i], groups)
        total = total + nt_xent(emb, labels, tau)
    return total
