"""Fusion masks: threshold, union, morphology, background, exact coverage."""

from __future__ import annotations

import torch

from lib_loraclr.clora.masks import concept_masks, fuse, fusion_weights


def _maps(h: int = 4, w: int = 4) -> torch.Tensor:
    """[1, 3, h·w, 8]: branch 1 token 2 peaks in the left half, branch 2 token 5 in the top half."""
    m = torch.full((1, 3, h, w, 8), 0.01)
    m[0, 1, :, : w // 2, 2] = 1.0
    m[0, 2, : h // 2, :, 5] = 1.0
    m[0, 2, 0, 0, 6] = 0.5  # a second token of branch 2: union
    return m.reshape(1, 3, h * w, 8)


def test_concept_masks_threshold_union_and_background():
    masks = concept_masks(_maps(), [[], [2], [5, 6]], (4, 4), threshold=0.3)
    assert masks.shape == (1, 3, 4, 4)
    left = torch.zeros(4, 4)
    left[:, :2] = 1
    top = torch.zeros(4, 4)
    top[:2] = 1
    assert torch.equal(masks[0, 1], left)
    assert torch.equal(masks[0, 2], top)
    assert torch.equal(masks[0, 0], ((left + top) == 0).float())


def test_fusion_weights_cover_every_pixel_once():
    masks = concept_masks(_maps(), [[], [2], [5, 6]], (4, 4), threshold=0.3)
    w = fusion_weights(masks, (16, 16))
    assert w.shape == (1, 3, 1, 16, 16)
    total = w.sum(dim=1)
    assert (total - 1).abs().max().item() <= 1e-6
    # overlap (top-left) averaged, background pixel fully branch 0, left-only pixel fully branch 1
    assert w[0, 1, 0, 0, 0].item() == 0.5 and w[0, 2, 0, 0, 0].item() == 0.5
    assert w[0, 0, 0, 15, 15].item() == 1.0
    assert w[0, 1, 0, 15, 0].item() == 1.0
    # nearest upsampling: 4×4 → 16×16 blocks of 4
    assert torch.equal(w[0, 1, 0, :, :8], torch.ones(16, 8) * w[0, 1, 0, :, :8])
    # random maps, many branches
    rnd = concept_masks(torch.rand(2, 5, 36, 77), [[], [1], [2, 3], [4], [9]], (6, 6), threshold=0.4)
    wr = fusion_weights(rnd, (12, 12))
    assert (wr.sum(dim=1) - 1).abs().max().item() <= 1e-6
    assert bool((wr >= 0).all())


def test_dilate_erode():
    m = torch.full((1, 2, 49, 4), 0.01)
    m[0, 1, 24, 1] = 1.0  # a single pixel at the centre of 7×7
    one = concept_masks(m, [[], [1]], (7, 7))[0, 1]
    grown = concept_masks(m, [[], [1]], (7, 7), dilate=1)[0, 1]
    closed = concept_masks(m, [[], [1]], (7, 7), dilate=1, erode=1)[0, 1]
    assert one.sum().item() == 1 and grown.sum().item() == 9 and torch.equal(closed, one)
    gone = concept_masks(m, [[], [1]], (7, 7), erode=1)[0, 1]
    assert gone.sum().item() == 0


def test_fuse_single_branch_is_identity_and_weighted_sum():
    out = torch.randn(2, 1, 4, 8, 8)
    assert torch.equal(fuse(out, torch.ones(2, 1, 1, 8, 8)), out[:, 0])
    outs = torch.randn(2, 3, 4, 8, 8)
    w = torch.softmax(torch.randn(2, 3, 1, 8, 8), dim=1)
    assert torch.allclose(fuse(outs, w), (outs * w).sum(1))
