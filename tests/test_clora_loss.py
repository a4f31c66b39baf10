"""NT-Xent loss: equal to a literal transcription of pytorch-metric-learning's NTXentLoss."""

from __future__ import annotations

import torch

from lib_loraclr.clora.loss import clora_loss, group_embeddings, minmax, nt_xent


def pml_ntxent_literal(emb: torch.Tensor, labels: list[int], tau: float) -> torch.Tensor:
    """pytorch_metric_learning 2.4.1 NTXentLoss(temperature=tau)(emb, labels), written out."""
    e = torch.nn.functional.normalize(emb, p=2, dim=1)  # CosineSimilarity(normalize_embeddings=True)
    mat = e @ e.t()
    a1, p, a2, n = [], [], [], []  # lmu.get_all_pairs_indices
    for i in range(len(labels)):
        for j in range(len(labels)):
            if labels[i] == labels[j] and i != j:
                a1.append(i)
                p.append(j)
            if labels[i] != labels[j]:
                a2.append(i)
                n.append(j)
    if not a1 or not a2:
        return torch.zeros(())
    a1_t, a2_t = torch.tensor(a1), torch.tensor(a2)
    pos_pairs = mat[a1, p].unsqueeze(1) / tau
    neg_pairs = mat[a2, n] / tau
    n_per_p = (a2_t.unsqueeze(0) == a1_t.unsqueeze(1)).to(emb.dtype)
    neg_pairs = neg_pairs * n_per_p
    neg_pairs[n_per_p == 0] = float("-inf")
    max_val = torch.max(pos_pairs, torch.max(neg_pairs, dim=1, keepdim=True)[0]).detach()
    numerator = torch.exp(pos_pairs - max_val).squeeze(1)
    denominator = torch.sum(torch.exp(neg_pairs - max_val), dim=1) + numerator
    log_exp = torch.log((numerator / denominator) + torch.finfo(emb.dtype).tiny)
    return (-log_exp).mean()  # MeanReducer over positive pairs


def test_nt_xent_matches_pml_transcription_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    for labels in ([0, 0, 1, 1, 1, 2, 2], [0, 1, 0, 1], [0, 0, 0, 1], [1, 1, 0, 2]):
        emb = torch.rand(len(labels), 16, generator=g, dtype=torch.float64).requires_grad_()
        ours = nt_xent(emb, torch.tensor(labels), tau=0.5)
        ref = pml_ntxent_literal(emb, labels, 0.5)
        assert abs(ours.item() - ref.item()) < 1e-12
        (g1,) = torch.autograd.grad(ours, emb)
        (g2,) = torch.autograd.grad(ref, emb)
        assert (g1 - g2).abs().max().item() < 1e-12


def test_nt_xent_zero_without_positives_or_negatives():
    emb = torch.rand(3, 5)
    assert nt_xent(emb, torch.tensor([0, 0, 0])).item() == 0.0
    assert nt_xent(emb, torch.tensor([0, 1, 2])).item() == 0.0


def test_nt_xent_orders_separated_vs_mixed():
    sep = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1.0], [0, 0.1, 0.9]])
    mixed = torch.tensor([[1.0, 0, 1.0], [0.9, 0.1, 1.0], [1.0, 0, 0.9], [1.0, 0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    assert nt_xent(sep, labels) < nt_xent(mixed, labels)


def test_minmax_and_group_embeddings():
    x = torch.tensor([[2.0, 4.0, 3.0], [1.0, 1.0, 1.0]])
    assert torch.equal(minmax(x), torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]]))
    maps = torch.rand(3, 16, 77)
    groups = [[[2], [2, 3], [2]], [[5], [6], [5, 6, 7]]]
    emb, labels = group_embeddings(maps, groups)
    assert emb.shape == (9, 16) and labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert torch.allclose(emb[1], minmax(maps[1][:, 2][None])[0])
    assert emb.min().item() == 0.0 and emb.max().item() == 1.0
    # batch: sum of the per-image losses
    b = torch.rand(2, 3, 16, 77)
    total = clora_loss(b, groups)
    assert torch.allclose(total, clora_loss(b[:1], groups) + clora_loss(b[1:], groups))
