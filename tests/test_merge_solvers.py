"""Per-layer merge solvers (issue 3): statistics, LoRACLR presets, lsq / linear / svd, fidelity numbers."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lib_loraclr.errors import LoraclrError, ShapeMismatchError
from lib_loraclr.merge import (
    ConceptStats,
    FeatureStats,
    LoraclrParams,
    layer_fidelity,
    merge_layer,
    objective_from_stats,
    official_loss,
    official_update_contrastive,
    rows_from_conv_input,
    solve_linear,
    solve_loraclr,
    solve_lsq,
    solve_svd,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def literal_official_loss(W0, delta, X, Y, margin=0.5, lambda_con=1.0, lambda_mse=0.1, lambda_reg=1e-3):
    """The official formula written out with explicit loops (no shared code with lib_loraclr)."""
    n_c = X.shape[0]
    pred = [X[i] @ (W0 + delta).T for i in range(n_c)]
    dist = [
        [torch.linalg.vector_norm(pred[i].flatten() - Y[j].flatten()) for j in range(n_c)] for i in range(n_c)
    ]
    con = 0.0
    for i in range(n_c):
        neg = min(float(dist[i][j]) for j in range(n_c) if j != i)
        con += float(dist[i][i]) ** 2 + max(0.0, margin - neg) ** 2
    mse = sum(float((pred[i] - Y[i]).pow(2).sum()) for i in range(n_c)) / Y.numel()
    return lambda_con * con / n_c + lambda_mse * mse + lambda_reg * float(torch.linalg.matrix_norm(delta))


def random_layer(n_c=4, n=40, d_in=24, d_out=16, seed=0, delta_scale=0.05):
    g = gen(seed)
    W0 = torch.randn(d_out, d_in, generator=g) * 0.3
    X = torch.randn(n_c, n, d_in, generator=g)
    dW = [torch.randn(d_out, d_in, generator=g) * delta_scale for _ in range(n_c)]
    Y = torch.stack([X[i] @ (W0 + dW[i]).T for i in range(n_c)])
    return W0, X, dW, Y


def orthogonal_layer(mode_kwargs, n_c=4, n=60, d_in=32, d_out=20, seed=1):
    """Concept i only sees input features [8i, 8i+8): its LoRA can be reproduced exactly."""
    g = gen(seed)
    W0 = torch.randn(d_out, d_in, generator=g) * 0.3
    stats, dW, xs = [], [], []
    for i in range(n_c):
        x = torch.zeros(n, d_in)
        x[:, 8 * i : 8 * i + 8] = torch.randn(n, 8, generator=g)
        d = torch.randn(d_out, d_in, generator=g) * 0.05
        stats.append(ConceptStats.from_rows(x, d, **mode_kwargs))
        dW.append(d)
        xs.append(x)
    return W0, stats, dW, xs


RAW = {}
GRAM = {"max_raw_rows": 0}


# ------------------------------------------------------------------------------------------ statistics
def test_stats_memory_is_independent_of_rows_added():
    g = gen(2)
    small, large = FeatureStats(64, sketch_rows=128), FeatureStats(64, sketch_rows=128)
    for _ in range(10):
        small.add(torch.randn(3, 100, 64, generator=g))  # [..., d_in] with leading dims
    for _ in range(50):  # 5x more rows
        large.add(torch.randn(3, 100, 64, generator=g))
    assert small.n == 3000 and large.n == 15000
    assert not small.is_raw and not large.is_raw
    assert small.memory_bytes() == large.memory_bytes()
    assert small.memory_bytes() <= 8 * 64 * 64 + 128 * (4 * 64 + 16)
    # while few rows were seen they are kept raw (and exact), never more than the Gram's size
    few = FeatureStats(64)
    few.add(torch.randn(10, 64, generator=g))
    assert few.is_raw and few.memory_bytes() == 10 * 64 * 4


def test_gram_accumulates_exactly_and_sketch_is_aligned_across_concepts():
    g = gen(3)
    rows = torch.randn(2000, 16, generator=g, dtype=torch.float64)
    a = FeatureStats(16, sketch_rows=50, seed=7, product_dtype=torch.float64)
    b = FeatureStats(16, sketch_rows=50, seed=7)  # default: float32 batch products, float64 accumulation
    for k in range(0, 2000, 137):  # uneven batches
        a.add(rows[k : k + 137])
    for k in range(0, 2000, 400):
        b.add(2 * rows[k : k + 400])  # another concept, same (step, position) sequence
    r32 = rows.float().double()  # rows are stored as float32; the accumulation is float64
    assert torch.allclose(a.gram(), r32.T @ r32, rtol=1e-12, atol=1e-9)
    scale = float(r32.pow(2).sum(0).max())
    assert float((b.gram() - 4 * r32.T @ r32).abs().max()) < 1e-6 * 4 * scale
    ia, xa = a.sketch()
    ib, xb = b.sketch()
    assert ia.numel() == 50 and torch.equal(ia, ib)  # same rows chosen for both concepts
    assert torch.allclose(xa.double(), rows[ia], atol=1e-6)
    assert torch.allclose(xb.double(), 2 * rows[ib], atol=1e-5)
    c = FeatureStats(16, sketch_rows=50, seed=8)
    c.add(rows)
    assert not torch.equal(c.sketch()[0], ia)  # the seed matters


def test_factor_reproduces_the_gram():
    g = gen(4)
    fs = FeatureStats(12, max_raw_rows=0)
    fs.add(torch.randn(500, 12, generator=g))
    L = fs.factor()
    assert torch.allclose(L.T @ L, fs.gram(), rtol=1e-9, atol=1e-8)


# ------------------------------------------------------------------------------------------ official objective
@pytest.mark.parametrize("mode", [RAW, GRAM], ids=["raw-rows", "gram+sketch"])
@pytest.mark.parametrize("margin", [0.5, 60.0], ids=["hinge-off", "hinge-on"])  # negatives are ~50
def test_official_loss_from_stats_equals_raw_and_literal(mode, margin):
    W0, X, dW, Y = random_layer()
    stats = [ConceptStats.from_rows(X[i], dW[i], **mode) for i in range(X.shape[0])]
    delta = torch.randn(W0.shape, generator=gen(5)) * 0.02
    params = replace(LoraclrParams.official(), margin=margin)
    raw = float(official_loss(W0, delta, X, Y, margin=margin))
    lit = literal_official_loss(W0.double(), delta.double(), X.double(), Y.double(), margin=margin)
    ours = objective_from_stats(W0, delta, stats, params)["loss"]
    assert raw == pytest.approx(lit, rel=1e-5)
    assert ours == pytest.approx(lit, rel=1e-5)
    if margin > 1:  # the hinge term really contributes in this case
        no_hinge = literal_official_loss(W0.double(), delta.double(), X.double(), Y.double(), margin=0.0)
        assert lit - no_hinge > 0.01 * lit


def test_official_preset_reproduces_the_official_loop():
    W0, X, dW, Y = random_layer(seed=6)
    stats = [ConceptStats.from_rows(X[i], dW[i]) for i in range(X.shape[0])]
    for margin in (0.5, 60.0):
        d_off, losses = official_update_contrastive(W0, X, Y, margin=margin)
        d_ours, info = solve_loraclr(W0, stats, replace(LoraclrParams.official(), margin=margin))
        assert len(info.history) == len(losses) == 50
        for a, b in zip(info.history, losses):
            assert a == pytest.approx(b, rel=1e-5)
        assert torch.allclose(d_ours, d_off, atol=1e-6)
        assert info.hinge_ever_active == (margin > 1)
    # the official loop barely moves: 50 AdamW steps at lr 1e-4 bound every entry by ~5e-3
    assert float(d_off.abs().max()) <= 50 * 1e-4 * 1.1


@pytest.mark.parametrize("n_rows", [40, 4], ids=["gram-path", "row-path"])
def test_official_objective_preset_minimises_the_official_loss(n_rows):
    W0, X, dW, Y = random_layer(n=n_rows, seed=3)
    stats = [ConceptStats.from_rows(X[i], dW[i], max_raw_rows=0 if n_rows > 10 else None) for i in range(4)]
    delta, info = solve_loraclr(W0, stats, LoraclrParams.official_objective())
    assert info.iterations == 0 and not info.hinge_ever_active  # closed form (lsq shrunk for λ_reg‖Δ‖_F)

    def loss(d):
        return literal_official_loss(W0.double(), d.double(), X.double(), Y.double())

    ours = loss(delta)
    d_off, _ = official_update_contrastive(W0, X, Y)
    assert ours < 0.8 * loss(d_off)
    assert ours == pytest.approx(info.final_loss, rel=1e-4, abs=1e-8)
    g = gen(1)
    for _ in range(10):  # a minimum: no small perturbation lowers the (float64) official loss
        assert loss(delta + 1e-4 * torch.randn(delta.shape, generator=g)) >= ours - 1e-9


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("mode", [RAW, GRAM], ids=["raw-rows", "gram+sketch"])
def test_orthogonal_concepts_are_reproduced(mode):
    W0, stats, dW, _ = orthogonal_layer(mode)
    for name, delta in [
        ("lsq", solve_lsq(W0, stats)),
        ("loraclr", solve_loraclr(W0, stats, LoraclrParams.recommended())[0]),
    ]:
        fid = layer_fidelity(delta, stats, W0)
        assert max(fid["rel_err"]) < 1e-4, name
    # the linear sum does not: every other LoRA acts on each concept's inputs
    assert min(layer_fidelity(solve_linear(dW), stats, W0)["rel_err"]) > 0.5


def test_low_rank_factors_give_the_same_merge_as_dense():
    g = gen(8)
    W0 = torch.randn(20, 30, generator=g)
    shared = torch.randn(9, 30, generator=g)
    xs = [shared, shared, shared]  # same inputs (conflicting LoRAs); 27 rows < 30 features: the row path
    fac = [(torch.randn(20, 4, generator=g) * 0.1, torch.randn(4, 30, generator=g)) for _ in xs]
    dense = [ConceptStats.from_rows(x, u @ d) for x, (u, d) in zip(xs, fac)]
    low = [ConceptStats.from_rows(x, (u, d)) for x, (u, d) in zip(xs, fac)]
    p = replace(LoraclrParams.recommended(), margin=0.9)  # make the hinge act
    a, ia = solve_loraclr(W0, dense, p)
    b, ib = solve_loraclr(W0, low, p)
    assert ia.hinge_active_initial and ib.hinge_active_initial
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(solve_lsq(W0, dense), solve_lsq(W0, low), atol=1e-6)


# ------------------------------------------------------------------------------------------ contrastive term
def overlapping_layer():
    """Three concepts sharing one input distribution; concepts 1 and 2 have nearly the same LoRA.

    Least squares then averages the three LoRAs, so concept 0's output on its own inputs ends up closer to
    the majority's target than to its own ("swallowed"): the case the contrastive hinge is for.
    """
    g = gen(3)
    d_in, d_out, n = 16, 8, 400
    W0 = torch.randn(d_out, d_in, generator=g) * 0.3
    xs = [torch.randn(n, d_in, generator=g) for _ in range(3)]
    dW = [torch.randn(d_out, d_in, generator=g) * 0.05 for _ in range(3)]
    dW[2] = 0.9 * dW[1] + 0.1 * dW[2]
    return W0, [ConceptStats.from_rows(x, d) for x, d in zip(xs, dW)]


def worst_leak(fid) -> float:
    """Interference: max over ordered pairs (i, j≠i) of |leak[i][j]|, the share of concept j's effect that the
    merged layer adds on concept i's inputs (1 = as much as stacking both LoRAs, 0 = none)."""
    return max(abs(v) for row in fid["leak"] for v in row if math.isfinite(v))


def test_contrastive_term_lowers_interference_vs_lsq():
    W0, stats = overlapping_layer()
    f_lsq = layer_fidelity(solve_lsq(W0, stats), stats, W0)
    rec = LoraclrParams.recommended()
    d_rec, info = solve_loraclr(W0, stats, rec)
    f_rec = layer_fidelity(d_rec, stats, W0)
    f_nohinge = layer_fidelity(solve_loraclr(W0, stats, replace(rec, margin=0.0))[0], stats, W0)
    assert info.hinge_active_initial and info.iterations > 0
    assert info.final_loss < info.initial_loss
    # measured: lsq 0.678, loraclr 0.558 (-18 %); without the hinge 0.733
    assert worst_leak(f_rec) <= 0.9 * worst_leak(f_lsq)
    assert worst_leak(f_rec) <= 0.9 * worst_leak(f_nohinge)
    # fidelity bound: the worst concept gets better, the average may lose at most 0.1 relative error
    # (measured: worst 0.886 -> 0.739, mean 0.634 -> 0.697)
    assert max(f_rec["rel_err"]) <= max(f_lsq["rel_err"])
    assert sum(f_rec["rel_err"]) / 3 <= sum(f_lsq["rel_err"]) / 3 + 0.1
    # the swallowed concept now sits on its own side of the midpoint (axis position >= margin - tolerance)
    assert info.neg_initial[0] < 0.3 and info.neg[0] > 0.4


def test_inactive_hinge_returns_the_closed_form_solution():
    W0, stats, _, _ = orthogonal_layer(RAW)
    _, info = solve_loraclr(W0, stats)
    assert not info.hinge_ever_active and info.iterations == 0
    assert all(v > 0.99 for v in info.neg)  # every concept sits on its own target


# ------------------------------------------------------------------------------------------ base preservation
@pytest.mark.parametrize("mode", [RAW, GRAM], ids=["raw-rows", "gram+sketch"])
def test_concept_without_delta_and_unseen_directions_keep_the_base(mode):
    g = gen(9)
    d_in, d_out, n = 24, 12, 50
    W0 = torch.randn(d_out, d_in, generator=g)
    x_a = torch.zeros(n, d_in)
    x_a[:, :8] = torch.randn(n, 8, generator=g)
    x_b = torch.zeros(n, d_in)
    x_b[:, 8:16] = torch.randn(n, 8, generator=g)
    stats = [
        ConceptStats.from_rows(x_a, torch.randn(d_out, d_in, generator=g) * 0.1, name="A", **mode),
        ConceptStats.from_rows(x_b, None, name="B", **mode),  # B's LoRA does not touch this layer
    ]
    neutral = FeatureStats(d_in)
    x_n = torch.zeros(n, d_in)
    x_n[:, 16:] = torch.randn(n, 8, generator=g)  # directions no concept ever produced
    neutral.add(x_n)
    for delta in (solve_lsq(W0, stats), solve_loraclr(W0, stats)[0]):
        fid = layer_fidelity(delta, stats, W0, neutral=neutral)
        assert fid["rel_err"][0] < 1e-4
        assert math.isnan(fid["rel_err"][1])
        assert fid["base_change_own"][1] < 1e-6
        assert fid["base_change_neutral"] < 1e-6
    # with overlapping inputs, a zero-delta concept pulls the merge toward the base on its inputs
    x_c = x_a + 0.5 * x_b
    over = [stats[0], ConceptStats.from_rows(x_c, None, **mode)]
    alone = layer_fidelity(solve_lsq(W0, stats[:1]), over, W0)["base_change_own"][1]
    pulled = layer_fidelity(solve_lsq(W0, over), over, W0)["base_change_own"][1]
    assert pulled < 0.5 * alone


# ------------------------------------------------------------------------------------------ conv and shapes
def test_1x1_conv_layer():
    g = gen(10)
    c_in, c_out = 12, 10
    W0 = torch.randn(c_out, c_in, 1, 1, generator=g)
    dA = torch.randn(c_out, c_in, 1, 1, generator=g) * 0.1
    dB = (torch.randn(c_out, 3, 1, 1, generator=g) * 0.1, torch.randn(3, c_in, 1, 1, generator=g))
    xa = torch.zeros(2, c_in, 5, 5)
    xa[:, :6] = torch.randn(2, 6, 5, 5, generator=g)
    xb = torch.zeros(2, c_in, 5, 5)
    xb[:, 6:] = torch.randn(2, 6, 5, 5, generator=g)
    rows = rows_from_conv_input(xa)
    assert rows.shape == (50, c_in)
    # row order matches the conv: rows @ W.T == conv output permuted to [B, H, W, C]
    ref = F.conv2d(xa, W0).permute(0, 2, 3, 1).reshape(-1, c_out)
    assert torch.allclose(rows @ W0.flatten(1).T, ref, atol=1e-5)
    stats = [ConceptStats.from_rows(rows, dA), ConceptStats.from_rows(rows_from_conv_input(xb), dB)]
    delta = solve_loraclr(W0, stats)[0]
    assert delta.shape == (c_out, c_in)
    merged = W0 + delta.view_as(W0)
    dB_dense = (dB[0].flatten(1) @ dB[1].flatten(1)).view_as(W0)
    assert torch.allclose(F.conv2d(xa, merged), F.conv2d(xa, W0 + dA), atol=1e-4)
    assert torch.allclose(F.conv2d(xb, merged), F.conv2d(xb, W0 + dB_dense), atol=1e-4)
    with pytest.raises(ShapeMismatchError):
        solve_lsq(torch.randn(c_out, c_in, 3, 3), stats)


def test_different_row_counts_per_concept():
    g = gen(11)
    d_in, d_out = 20, 10
    W0 = torch.randn(d_out, d_in, generator=g)
    counts = (30, 55, 80)
    stats = [
        ConceptStats.from_rows(
            torch.randn(n, d_in, generator=g),
            torch.randn(d_out, d_in, generator=g) * 0.05,
            sketch_rows=40,
            max_raw_rows=0,
        )
        for n in counts
    ]
    for params in (LoraclrParams.official(), LoraclrParams.recommended()):
        delta, info = solve_loraclr(W0, stats, replace(params, margin=50.0))
        assert torch.isfinite(delta).all() and math.isfinite(info.final_loss)
        assert info.final_loss <= info.initial_loss
    # official negatives pair rows by index: with counts 30 and 55 only indices < 30 present in both sketches
    obj = objective_from_stats(W0, torch.zeros_like(W0), stats, replace(LoraclrParams.official(), margin=0.5))
    assert all(math.isfinite(v) for v in obj["neg"])


# ------------------------------------------------------------------------------------------ baselines
def test_linear_and_svd():
    g = gen(12)
    ds = [torch.randn(16, 24, generator=g) for _ in range(3)]
    lin = solve_linear([*ds, None], weights=[1.0, 0.5, 2.0, 1.0])
    assert torch.allclose(lin, ds[0] + 0.5 * ds[1] + 2.0 * ds[2])
    full = solve_svd(ds, rank=16, clamp_quantile=None)
    assert torch.allclose(full, sum(ds), atol=1e-4)
    r4 = solve_svd(ds, rank=4, clamp_quantile=None)
    sv = torch.linalg.svdvals(sum(ds).double())
    err = float(torch.linalg.matrix_norm((r4 - sum(ds)).double()))
    assert err == pytest.approx(float(sv[4:].pow(2).sum().sqrt()), rel=1e-4)  # Eckart-Young optimum
    clamped = solve_svd(ds, rank=4)
    assert float(torch.linalg.matrix_norm(clamped.double() - sum(ds).double())) >= err * (1 - 1e-6)


def test_linear_merge_of_two_concepts_has_leak_one():
    g = gen(13)
    x = torch.randn(100, 10, generator=g)
    dW = [torch.randn(6, 10, generator=g) for _ in range(2)]
    stats = [ConceptStats.from_rows(x, d) for d in dW]
    fid = layer_fidelity(solve_linear(dW), stats)
    assert fid["leak"][0][1] == pytest.approx(1.0) and fid["leak"][1][0] == pytest.approx(1.0)
    assert math.isnan(fid["leak"][0][0])


def test_merge_layer_dispatch_and_errors():
    W0, stats, dW, _ = orthogonal_layer(RAW)
    for method in ("loraclr", "lsq", "linear", "svd"):
        delta, info = merge_layer(method, W0, stats)
        assert delta.shape == W0.shape and info["seconds"] >= 0
    with pytest.raises(LoraclrError, match="unknown merge method"):
        merge_layer("average", W0, stats)
    with pytest.raises(LoraclrError, match="nothing to merge"):
        solve_lsq(W0, [])
    with pytest.raises(LoraclrError, match="no input rows"):
        solve_lsq(W0, [ConceptStats(FeatureStats(W0.shape[1]), dW[0])])
    with pytest.raises(ShapeMismatchError):
        ConceptStats(FeatureStats(7), dW[0])
    with pytest.raises(ShapeMismatchError):
        FeatureStats(8).add(torch.zeros(3, 9))
    with pytest.raises(ValueError, match="NaN"):
        FeatureStats(2).add(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError):
        LoraclrParams(negatives="bogus").validate()


def test_few_rows_are_solved_in_their_row_space_with_the_same_optimum(monkeypatch) -> None:
    """Few raw rows (R ≪ d_in): L-BFGS runs on ``Δ = B Qᵀ`` (Q spans the rows) and reaches the optimum of the
    full problem: same loss, the same distances, Δ inside the rows' span."""
    import lib_loraclr.merge.loraclr as L
    from lib_loraclr.merge.stats import ConceptStats

    g = torch.Generator().manual_seed(5)
    d_out, d_in = 48, 128
    w0 = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    base = torch.randn(6, d_in, generator=g)
    stats = []
    for i in range(4):
        x = torch.cat([base, torch.randn(2, d_in, generator=g)])  # shared rows (BOS, "photo of a"): conflicts
        delta = (
            None
            if i == 3
            else 0.5 * torch.randn(d_out, 4, generator=g) @ torch.randn(4, d_in, generator=g) / d_in
        )
        stats.append(ConceptStats.from_rows(x, delta, name=str(i)))
    params = L.LoraclrParams.recommended()
    assert L._in_row_space(w0, stats, params) is not None
    fast, info_fast = L.solve_loraclr(w0, stats, params)
    monkeypatch.setattr(L, "_in_row_space", lambda *a: None)
    full, info_full = L.solve_loraclr(w0, stats, params)
    assert info_full.iterations > 0  # a hinge was active: a real L-BFGS run on both sides
    assert abs(info_fast.final_loss - info_full.final_loss) <= 1e-5 * abs(info_full.final_loss)
    x = torch.cat([cs.features.rows() for cs in stats]).double()
    proj = x.T @ torch.linalg.pinv(x.T)  # projector on the rows' span
    assert float((fast.double() - fast.double() @ proj).norm()) < 1e-4 * float(fast.norm())
    assert float((fast - full).norm()) < 2e-2 * float(full.norm())
