"""Closed-form per-layer merges: least squares (Mix-of-Show gradient fusion), linear sum, SVD re-rank, and
the Gram/row helpers every solver shares.

Notation for one layer: base weight ``W0 [d_out, d_in]``; concept i has input rows ``X_i [n_i, d_in]``
(summarised by :class:`~lib_loraclr.merge.stats.FeatureStats`, Gram ``G_i = X_iᵀX_i``) and its own delta
``ΔW_i``; its target is ``Y_i = X_i (W0 + ΔW_i)ᵀ``. Every solver returns one additive ``Δ [d_out, d_in]``
(float32); the merged layer is ``W0 + Δ``. Bias is never involved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lib_loraclr.errors import LoraclrError, ShapeMismatchError
from lib_loraclr.merge.stats import ConceptStats, FeatureStats, as_2d_weight


# ---------------------------------------------------------------------------------------------- helpers
def _apply_gram(fs: FeatureStats, m: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """``M G`` in float64 for ``M [..., d_in]`` (through the raw rows when that is cheaper; ``gram``: G if
    already computed)."""
    md = m.double()
    r = fs.rows()
    if r is not None and r.shape[0] < fs.d_in:
        rd = r.double()
        return (md @ rd.T) @ rd
    return md @ (fs.gram() if gram is None else gram)


def _sqnorm_on(fs: FeatureStats, m: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """``‖X Mᵀ‖²_F = ⟨M G, M⟩`` (float64) for ``M [d_out, d_in]``."""
    r = fs.rows()
    if r is not None and r.shape[0] < fs.d_in:
        return float((r @ m.float().T).pow(2).sum(dtype=torch.float64))
    return float((_apply_gram(fs, m, gram) * m.double()).sum())


def _delta_gram(cs: ConceptStats, g: torch.Tensor) -> torch.Tensor:
    """``ΔW_i G`` float64 (through the factors when low-rank: ``up (down G)``)."""
    if cs.up is not None and cs.down is not None:
        return cs.up.double() @ (cs.down.double() @ g)
    assert cs.delta is not None
    return cs.delta.double() @ g


def _own_effect_sq(cs: ConceptStats, g: torch.Tensor) -> float:
    """``‖XΔW_iᵀ‖² = ⟨ΔW_i G, ΔW_i⟩`` (low-rank: ``tr(upᵀup · down G downᵀ)``)."""
    if cs.up is not None and cs.down is not None:
        d = cs.down.double()
        u = cs.up.double()
        return float(((u.T @ u) * (d @ g @ d.T)).sum())
    assert cs.delta is not None
    dd = cs.delta.double()
    return float(((dd @ g) * dd).sum())


def _check_stats(W0: torch.Tensor, stats: Sequence[ConceptStats]) -> torch.Tensor:
    """W0 as float32 ``[d_out, d_in]``; validates every concept's shapes and row count."""
    if len(stats) == 0:
        raise LoraclrError("nothing to merge: no concept statistics for this layer")
    w0 = as_2d_weight(W0, "base weight").detach().float().cpu()
    d_out, d_in = w0.shape
    for k, cs in enumerate(stats):
        if cs.features.d_in != d_in:
            raise ShapeMismatchError(
                f"concept {cs.name or k}: features have width {cs.features.d_in}, the layer has {d_in} inputs"
            )
        if cs.n == 0:
            raise LoraclrError(f"concept {cs.name or k}: no input rows were collected for this layer")
        out = (
            cs.up.shape[0] if cs.up is not None else (cs._dense.shape[0] if cs._dense is not None else d_out)
        )
        if out != d_out:
            raise ShapeMismatchError(
                f"delta of concept {cs.name or k} has {out} outputs, the layer has {d_out}"
            )
    return w0


def _row_path(stats: Sequence[ConceptStats]) -> bool:
    """True when every concept still holds raw rows and there are fewer rows than input features."""
    return all(cs.features.is_raw for cs in stats) and sum(cs.n for cs in stats) < stats[0].features.d_in


def _own_rows(cs: ConceptStats, d_out: int) -> torch.Tensor:
    """``X_i ΔW_iᵀ`` float32 ``[n_i, d_out]`` from the raw rows (zeros when ΔW_i = 0)."""
    r = cs.features.rows()
    assert r is not None
    if cs.up is None and cs._dense is None:
        return r.new_zeros(r.shape[0], d_out)
    return cs.apply_delta_t(r)


def _lsq_core(
    stats: Sequence[ConceptStats],
    d_out: int,
    coef: Sequence[float],
    ridge: float,
    own_rows: Sequence[torch.Tensor] | None = None,
    grams: Sequence[torch.Tensor] | None = None,
    want_delta: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, float, tuple | None]:
    """Minimiser of ``Σ_i c_i ‖X_i(Δ − ΔW_i)ᵀ‖² + λ‖Δ‖²``, ``λ = ridge·tr(Σ c_i G_i)/d_in``.

    Returns ``(Δ float64, H, R, λ, None)`` with ``H = Σ c_i G_i``, ``R = Σ c_i ΔW_i G_i``; or, on the row path
    (all concepts raw and ``Σ n_i < d_in``), ``(Δ, None, None, λ, (Z, T̃, e, T̃ᵀU, UᵀZ))`` from the push-through
    identity ``Δ = T̃ᵀ(λI + ZZᵀ)^-1 Z`` (``ZZᵀ = U diag(e) Uᵀ``) with weighted rows ``Z = √c_i X_i`` and targets
    ``T̃ = √c_i X_iΔW_iᵀ`` (an ``n × n`` problem instead of ``d_in × d_in``; without ridge the pseudo-inverse,
    i.e. the minimum-norm solution). ``own_rows``: precomputed ``X_iΔW_iᵀ`` (row path). ``want_delta=False``
    (row path only): return ``Δ = None`` and let the caller form it from the factors when needed.
    """
    d_in = stats[0].features.d_in
    feats = [cs.features for cs in stats]
    if _row_path(stats):
        rows = [fs.rows() for fs in feats]
        own = own_rows if own_rows is not None else [_own_rows(cs, d_out) for cs in stats]
        sc = torch.tensor([math.sqrt(max(c, 0.0)) for c in coef], dtype=torch.float64)
        counts = [int(r.shape[0]) for r in rows]  # type: ignore[union-attr]
        w = torch.repeat_interleave(sc, torch.tensor(counts)).unsqueeze(1)
        z = torch.cat(rows).double() * w  # type: ignore[arg-type]
        t = torch.cat(list(own)).double() * w
        trace = float(z.pow(2).sum())
        lam = ridge * trace / d_in if trace > 0 else 0.0
        e, u = torch.linalg.eigh(z @ z.T)
        e = e.clamp_min(0.0)
        tu = t.T @ u  # [d_out, n]
        uz = u.T @ z  # [n, d_in]
        el = e + lam
        inv = torch.where(el > 1e-12 * max(float(el[-1]), 1e-300), 1.0 / el, torch.zeros_like(el))
        delta = (tu * inv) @ uz if want_delta else None
        return delta, None, None, lam, (z, t, e, tu, uz)
    h = torch.zeros(d_in, d_in, dtype=torch.float64)
    rr = torch.zeros(d_out, d_in, dtype=torch.float64)
    for k, (c, cs) in enumerate(zip(coef, stats)):
        if c == 0.0:
            continue
        g = cs.features.gram() if grams is None else grams[k]
        h += c * g
        if cs.has_delta:
            rr += c * _delta_gram(cs, g)
    trace = float(h.diagonal().sum())
    lam = ridge * trace / d_in if trace > 0 else 0.0
    hl = h + lam * torch.eye(d_in, dtype=h.dtype) if lam > 0 else h
    chol, info = torch.linalg.cholesky_ex(hl)
    if int(info) == 0:
        delta = torch.cholesky_solve(rr.T, chol).T
    else:  # singular without ridge: minimum-norm solution (Δ = 0 on directions no concept saw)
        delta = rr @ torch.linalg.pinv(hl, hermitian=True)
    return delta, h, rr, lam, None


# ---------------------------------------------------------------------------------------------- baselines
def solve_lsq(
    W0: torch.Tensor,
    stats: Sequence[ConceptStats],
    ridge: float = 1e-6,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Mix-of-Show gradient fusion in closed form: ``Δ = (Σ w_i ΔW_i G_i)(Σ w_i G_i + λI)^-1``.

    W0: ``[d_out, d_in]`` (or 1×1 conv); stats: one :class:`ConceptStats` per concept. ``w_i`` =
    ``ConceptStats.weight`` × ``weights[i]``. ``λ = ridge · tr(Σ w_i G_i) / d_in`` (relative to the mean
    eigenvalue of the Gram; it shrinks Δ toward 0, i.e. toward the base output). ``ridge=0`` gives the
    minimum-norm exact solution. A concept with ``ΔW_i = 0`` pulls Δ toward 0 on its inputs (base kept).
    Returns Δ float32 ``[d_out, d_in]``.
    """
    w0 = _check_stats(W0, stats)
    coef = [cs.weight * (1.0 if weights is None else float(weights[k])) for k, cs in enumerate(stats)]
    delta, _, _, _, _ = _lsq_core(stats, w0.shape[0], coef, ridge)
    assert delta is not None
    return delta.float()


def _as_deltas(deltas: Sequence[torch.Tensor | None], weights: Sequence[float] | None) -> list[torch.Tensor]:
    present = [d for d in deltas if d is not None]
    if not present:
        raise LoraclrError("nothing to merge: no concept has a delta for this layer")
    shape = as_2d_weight(present[0], "delta").shape
    out = []
    for k, d in enumerate(deltas):
        w = 1.0 if weights is None else float(weights[k])
        if d is None or w == 0.0:
            continue
        d2 = as_2d_weight(d, f"delta {k}").float()
        if d2.shape != shape:
            raise ShapeMismatchError(f"delta {k} has shape {tuple(d2.shape)}, delta 0 has {tuple(shape)}")
        out.append(w * d2)
    return out or [torch.zeros(shape)]


def solve_linear(
    deltas: Sequence[torch.Tensor | None], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Weighted sum ``Σ w_i ΔW_i`` (what stacking LoRAs at sampling time does). None entries count as 0."""
    return torch.stack(_as_deltas(deltas, weights)).sum(0)


def solve_svd(
    deltas: Sequence[torch.Tensor | None],
    weights: Sequence[float] | None = None,
    rank: int = 64,
    clamp_quantile: float | None = 0.99,
) -> torch.Tensor:
    """Sum then SVD re-rank (SuperMerger / kohya ``svd_merge_lora`` style).

    ``S = Σ w_i ΔW_i = U Σ Vᵀ``; keep the top ``rank`` singular triplets, ``up = U_r Σ_r``, ``down = V_rᵀ``;
    with ``clamp_quantile`` (default 0.99, as those tools) every entry of up and down is clamped to
    ``±q`` where q is that quantile of ``|entries|`` of both factors together. Returns dense ``up @ down``.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    s = solve_linear(deltas, weights).double()
    u, sv, vh = torch.linalg.svd(s, full_matrices=False)
    r = min(rank, sv.numel())
    up = u[:, :r] * sv[:r]
    down = vh[:r]
    if clamp_quantile is not None:
        vals = torch.cat([up.flatten(), down.flatten()]).abs().float()
        if vals.numel() > 2**24 - 1:  # torch.quantile's input limit: subsample deterministically
            vals = vals[:: vals.numel() // (2**24 - 1) + 1]
        hi = float(torch.quantile(vals, clamp_quantile))
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    return (up @ down).float()
