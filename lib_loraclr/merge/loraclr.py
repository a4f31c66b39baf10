"""LoRACLR's per-layer solver: the contrastive objective from sufficient statistics and its minimisers.

LoRACLR objective (official code, methods.md §1.4), with ``Ŷ_i = X_i (W0 + Δ)ᵀ``:
``D_ij = ‖vec(Ŷ_i) − vec(Y_j)‖``, ``pos_i = D_ii``, ``neg_i = min_{j≠i} D_ij``,
``L = λ_con·(1/N)Σ_i[pos_i² + max(0, m − neg_i)²] + λ_mse·mean((Ŷ − Y)²) + λ_reg·‖Δ‖_F``.
From statistics: ``pos_i² = ⟨(Δ−ΔW_i) G_i, Δ−ΔW_i⟩`` exactly; the sum of the pos and MSE terms is a quadratic
``Σ_i c_i pos_i²`` whose minimiser is a weighted least-squares solution (closed form). The negatives need
rows: the official pairing (row r of concept i vs row r of concept j) is evaluated on the aligned sketches.

Presets (:class:`LoraclrParams`): ``official()`` — the official loop (AdamW from 0, 50 steps) on the official
objective, reproducing its iterates; ``official_objective()`` — the same objective minimised exactly (closed
form, L-BFGS only if a hinge is active); ``recommended()`` — our objective (relative errors, "axis" negatives).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import torch

from lib_loraclr.merge.closed_form import (
    _check_stats,
    _lsq_core,
    _own_effect_sq,
    _own_rows,
    _row_path,
)
from lib_loraclr.merge.stats import ConceptStats, FeatureStats, as_2d_weight

_SLACK = 0.3  # pairs whose negative distance is below margin + _SLACK at the start are optimised actively


# ---------------------------------------------------------------------------------------------- loraclr
@dataclass
class LoraclrParams:
    """Hyper-parameters of :func:`solve_loraclr`. Use the presets :meth:`official` / :meth:`recommended`.

    margin, lambda_con, lambda_mse, lambda_reg: the objective (``λ_reg`` multiplies ``‖Δ‖_F``, not squared).
    hinge_weight: extra factor on the hinge term only (official 1: the hinge and ``pos²`` share ``λ_con``).
    ridge: extra ``λ‖Δ‖²`` with ``λ = ridge·tr(H)/d_in`` inside the quadratic part (0 = none).
    negatives: ``"paired"`` = official ``D_ij = ‖Ŷ_i − Y_j‖`` pairing row r of i with row r of j (aligned
        sketches); ``"own"`` = ``‖X_i(W0+Δ)ᵀ − X_i(W0+ΔW_j)ᵀ‖``: on concept i's own inputs, distance to what
        concept j's LoRA would output there (base parts cancel; exact from i's statistics, no alignment);
        ``"axis"`` (recommended) = the same distance measured ALONG the segment from j's target to i's own
        target on i's inputs: ``t_ij = ⟨X_i(Δ−ΔW_j)ᵀ, X_i(ΔW_i−ΔW_j)ᵀ⟩ / ‖X_i(ΔW_i−ΔW_j)ᵀ‖²`` (0 = on j's
        target, 1 = on i's own, ``m = 0.5``: "closer to my target than to j's"). Unlike the plain distance it
        cannot be satisfied by exaggerating directions only concept i sees (over-separation), it is linear
        in Δ (the objective stays convex), and its hinge gap is scaled by ``sep_ij / σ_i`` (pos units) and
        capped at ``m``, so near-duplicate concepts (tiny separation) are not pushed apart.
    normalize: ``"none"`` (official units) or ``"concept"``: ``pos_i`` divided by ``σ_i = ‖X_iΔW_iᵀ‖``
        (so ``pos_i`` is concept i's relative error; floored at ``sigma_floor`` × the RMS per-row effect; a
        concept with ΔW_i = 0, such as the neutral base rows, uses the RMS per-row effect itself);
        "own"/"paired" distances divided by the distance between the two targets.
    init: ``"zero"`` (official), ``"lsq"``: the exact minimiser of the quadratic part (pos + MSE + ridge), or
        ``"lsq_reg"``: the exact minimiser of the quadratic part plus ``λ_reg‖Δ‖_F`` (the lsq solution shrunk
        along the Gram's eigen-directions, ``Δ = Δ* H (H + νI)^-1`` with the scalar ν found by bisection).
    optimizer: ``"adamw"`` (lr, weight_decay; official) or ``"lbfgs"`` (strong-Wolfe line search).
    iters: optimiser steps (L-BFGS: iterations per round). skip_if_inactive: when no hinge is active at the
        start (and λ_reg = 0) the warm start is already optimal: return it without iterating.
    hinge_rank: rank of the Gram factor used for "own"/"axis" negatives (exact when ``min(n_i, d_in)`` is not
        larger; otherwise the largest eigen-directions of ``G_i``, i.e. the negatives see the dominant part of
        the inputs). Bounds the memory of the pair terms to ``N²·hinge_rank·d_out`` floats.
    """

    margin: float = 0.5
    lambda_con: float = 1.0
    hinge_weight: float = 10.0
    lambda_mse: float = 0.0
    lambda_reg: float = 0.0
    ridge: float = 1e-6
    negatives: str = "axis"
    normalize: str = "concept"
    init: str = "lsq"
    optimizer: str = "lbfgs"
    iters: int = 100
    lr: float = 1e-4
    weight_decay: float = 1e-4
    skip_if_inactive: bool = True
    hinge_rank: int = 384
    sigma_floor: float = 0.3
    max_rounds: int = 3
    preset: str = "custom"

    @classmethod
    def official(cls) -> LoraclrParams:
        """The official hyper-parameters and loop (AdamW from Δ=0, 50 steps, best iterate), official units."""
        return cls(
            margin=0.5,
            lambda_con=1.0,
            hinge_weight=1.0,
            lambda_mse=0.1,
            lambda_reg=1e-3,
            ridge=0.0,
            negatives="paired",
            normalize="none",
            init="zero",
            optimizer="adamw",
            iters=50,
            lr=1e-4,
            weight_decay=1e-4,
            skip_if_inactive=False,
            preset="official",
        )

    @classmethod
    def official_objective(cls) -> LoraclrParams:
        """The official objective and units, minimised well: exact closed form (least squares shrunk for the
        ``λ_reg‖Δ‖_F`` term), L-BFGS only when a hinge is active. Same loss as :meth:`official`, lower value."""
        return replace(
            cls.official(),
            init="lsq_reg",
            optimizer="lbfgs",
            iters=100,
            skip_if_inactive=True,
            preset="official_objective",
        )

    @classmethod
    def recommended(cls) -> LoraclrParams:
        """Our preset: per-concept normalisation, "axis" negatives (hinge ×10), closed-form warm start, L-BFGS.

        In effect: the Mix-of-Show least-squares merge with every concept's error measured relative to its own
        LoRA's effect, plus a contrastive hinge that protects a concept from being pulled past the midpoint
        toward another concept (e.g. a majority of similar LoRAs swallowing a different one).
        """
        return cls(preset="recommended")

    def validate(self) -> None:
        if self.negatives not in ("paired", "own", "axis"):
            raise ValueError(f"negatives must be 'paired', 'own' or 'axis', got {self.negatives!r}")
        if self.normalize not in ("none", "concept"):
            raise ValueError(f"normalize must be 'none' or 'concept', got {self.normalize!r}")
        if self.init not in ("zero", "lsq", "lsq_reg"):
            raise ValueError(f"init must be 'zero', 'lsq' or 'lsq_reg', got {self.init!r}")
        if self.optimizer not in ("adamw", "lbfgs"):
            raise ValueError(f"optimizer must be 'adamw' or 'lbfgs', got {self.optimizer!r}")
        if self.iters < 0 or self.margin < 0 or min(self.lambda_con, self.lambda_mse, self.lambda_reg) < 0:
            raise ValueError("iters, margin and the lambdas must be >= 0")


@dataclass
class SolveInfo:
    """What :func:`solve_loraclr` did for one layer (JSON-ready through :meth:`as_dict`).

    pos/neg: per-concept final distances in the objective's units (normalised when ``normalize="concept"``;
    neg is NaN where a concept has no valid negative). hinge_ever_active: any ``m − neg_i > 0`` at an
    evaluated iterate.
    """

    method: str = "loraclr"
    preset: str = "custom"
    initial_loss: float = float("nan")
    final_loss: float = float("nan")
    pos: list[float] = field(default_factory=list)
    neg: list[float] = field(default_factory=list)
    pos_initial: list[float] = field(default_factory=list)
    neg_initial: list[float] = field(default_factory=list)
    hinge_active_initial: bool = False
    hinge_ever_active: bool = False
    active_pairs: int = 0
    iterations: int = 0
    evaluations: int = 0
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


class _Objective:
    """The LoRACLR objective of one layer, built from statistics (see module docstring)."""

    def __init__(self, W0: torch.Tensor, stats: Sequence[ConceptStats], params: LoraclrParams) -> None:
        params.validate()
        self.p = params
        self.w0 = _check_stats(W0, stats)
        self.feats = [cs.features for cs in stats]
        self._concepts = list(stats)
        self.N = len(stats)
        self.d_out, self.d_in = self.w0.shape
        self.n = [fs.n for fs in self.feats]
        n_tot = sum(self.n)
        self._deltas: list[torch.Tensor] | None = None
        self._rows_mode = _row_path(stats)
        if self._rows_mode:  # few raw rows: work with X_i and X_iΔW_iᵀ only, never with Grams
            self._X = [fs.rows() for fs in self.feats]
            self._Tii = [_own_rows(cs, self.d_out) for cs in stats]
            self._Xcat, self._Tcat = torch.cat(self._X), torch.cat(self._Tii)  # type: ignore[arg-type]
            self._lengths = torch.tensor(self.n)
            r = self._Tcat.pow(2).sum(1).double()
            self.own_sq = torch.segment_reduce(r, "sum", lengths=self._lengths).tolist()
        else:
            self._grams = [fs.gram() for fs in self.feats]  # computed once per solve (raw mode builds it)
            self.own_sq = [
                _own_effect_sq(cs, g) if cs.has_delta else 0.0 for cs, g in zip(stats, self._grams)
            ]
        if params.normalize == "concept":
            per_row = [o / n for o, n in zip(self.own_sq, self.n) if o > 0]
            rms = math.sqrt(sum(per_row) / len(per_row)) if per_row else 1.0
            # a concept without an effect here (ΔW_i = 0, e.g. the neutral "base" rows) counts like a typical one
            self.s = [
                max(math.sqrt(o), params.sigma_floor * rms * math.sqrt(n)) if o > 0 else rms * math.sqrt(n)
                for o, n in zip(self.own_sq, self.n)
            ]
        else:
            self.s = [1.0] * self.N
        self.w = [cs.weight for cs in stats]
        base = params.lambda_con / self.N + params.lambda_mse / (n_tot * self.d_out)
        self.c = [w * base / s**2 for w, s in zip(self.w, self.s)]
        self.hinge_w = [w * params.lambda_con * params.hinge_weight / self.N for w in self.w]
        own = self._Tii if self._rows_mode else None
        lazy = self._rows_mode and params.init == "lsq_reg" and bool(params.lambda_reg)  # start = lsq_shrunk
        lsq, h, rr, lam, zt = _lsq_core(
            stats,
            self.d_out,
            self.c,
            params.ridge,
            own_rows=own,
            grams=None if self._rows_mode else self._grams,
            want_delta=not lazy,
        )
        self._zt = zt
        self.lam = lam
        self._lsq = None if lsq is None else lsq.float()
        self._h, self._r = h, rr
        if self._rows_mode:
            assert zt is not None
            self._z = zt[0].float()
        self.ref: torch.Tensor | None = None
        self._setup_hinge()

    @property
    def lsq(self) -> torch.Tensor:
        """The minimiser of the quadratic part, float32 ``[d_out, d_in]`` (formed on first use, row path)."""
        if self._lsq is None:
            assert self._zt is not None
            _, _, e, tu, uz = self._zt
            el = e + self.lam
            inv = torch.where(el > 1e-12 * max(float(el[-1]), 1e-300), 1.0 / el, torch.zeros_like(el))
            self._lsq = ((tu * inv) @ uz).float()
        return self._lsq

    @property
    def deltas(self) -> list[torch.Tensor]:
        """Dense ΔW_i float32 (zeros when None), built on first use."""
        if self._deltas is None:
            self._deltas = [cs.delta_or_zeros(self.d_out) for cs in self._concepts]
        return self._deltas

    # ---- quadratic part: Q(Δ) = Σ c_i pos_i² + λ‖Δ‖²
    def _h_apply(self, m: torch.Tensor) -> torch.Tensor:
        """``M H_λ`` (dtype of M)."""
        if self._rows_mode:
            z = self._z.to(m.dtype)
            out = (m @ z.T) @ z
        else:
            assert self._h is not None
            out = m @ self._h.to(m.dtype)
        return out + self.lam * m if self.lam else out

    def _r_mat(self) -> torch.Tensor:
        if self._r is None:  # rows mode: R = Σ c_i ΔW_i G_i
            assert self._zt is not None
            z, t = self._zt[0], self._zt[1]
            self._r = t.T @ z
        return self._r

    def lsq_shrunk(self, mu: float) -> torch.Tensor:
        """Exact minimiser of ``Q(Δ) + μ‖Δ‖_F`` (Q = quadratic part with ridge λ).

        Stationarity: ``2(ΔH_λ − R) + μΔ/‖Δ‖ = 0`` ⇒ ``Δ(ν) = R(H + (λ+ν)I)^-1`` — least squares with the extra
        ridge ``ν = μ / (2‖Δ(ν)‖)``. ``‖Δ(ν)‖`` is explicit in the eigenbasis (rows path: of ``ZZᵀ``,
        ``‖Δ‖² = Σ e_k‖T̃ᵀu_k‖²/(e_k+λ+ν)²``; Gram path: of H, ``Σ ‖Rv_k‖²/(h_k+λ+ν)²``); ν by bisection.
        """
        if self._rows_mode:
            assert self._zt is not None
            _, _, e, tu, uz = self._zt
            num = e * tu.pow(2).sum(0)
            left, right = tu, uz
        else:
            assert self._h is not None and self._r is not None
            e, v = torch.linalg.eigh(self._h)
            e = e.clamp_min(0.0)
            left, right = self._r @ v, v.T
            num = left.pow(2).sum(0)
        lam = self.lam
        num_np, e_np = num.numpy(), e.numpy()  # scalar bisection: numpy is much cheaper per step than torch

        def norm(nu: float) -> float:
            return math.sqrt(float((num_np / (e_np + lam + nu) ** 2).sum()))

        if mu >= 2 * math.sqrt(float(num_np.sum())):  # lim_{ν→∞} 2ν‖Δ(ν)‖; beyond it Δ = 0 is optimal
            return torch.zeros(self.d_out, self.d_in)
        lo, hi = 0.0, 1.0
        while 2 * hi * norm(hi) < mu:
            hi *= 4.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if 2 * mid * norm(mid) < mu:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-15 * hi:
                break
        nu = 0.5 * (lo + hi)
        return (left / (e + lam + nu)).float() @ right.float()  # factors in float64, the product in float32

    def _rows_times(self, delta: torch.Tensor) -> torch.Tensor:
        """``X Δᵀ`` over all raw rows ``[Σn_i, d_out]`` (row path), remembered for the last ``delta`` seen without
        grad, so that the errors and the paired distances of one evaluation share the product."""
        memo = getattr(self, "_xd_memo", None)
        if memo is not None and memo[0] is delta and memo[1] == delta._version:
            return memo[2]
        out = self._Xcat @ delta.T
        if not delta.requires_grad:
            self._xd_memo = (delta, delta._version, out)
        return out

    def sq_errors(self, delta: torch.Tensor) -> list[float]:
        """``‖X_i(Δ − ΔW_i)ᵀ‖²`` per concept, float64 (no cancellation)."""
        if self._rows_mode:
            r = (self._rows_times(delta.float()) - self._Tcat).pow(2).sum(1).double()
            return [max(v, 0.0) for v in torch.segment_reduce(r, "sum", lengths=self._lengths).tolist()]
        if not hasattr(self, "_grams32"):  # float32 copies: the errors are formed first, so no cancellation
            self._grams32 = [g.float() for g in self._grams]
        d = delta.float()
        out = []
        for dw, g in zip(self.deltas, self._grams32):
            e = d - dw
            out.append(max(float(((e @ g) * e).sum(dtype=torch.float64)), 0.0))
        return out

    def quad_exact(self, delta: torch.Tensor, sq_err: list[float] | None = None) -> float:
        """Q(Δ) = Σ c_i ‖X_i(Δ−ΔW_i)ᵀ‖² + λ‖Δ‖² in float64."""
        e = self.sq_errors(delta) if sq_err is None else sq_err
        q = sum(c * v for c, v in zip(self.c, e))
        return q + (self.lam * float(delta.double().pow(2).sum()) if self.lam else 0.0)

    def set_reference(self, ref: torch.Tensor) -> None:
        """Expand Q around ``ref`` so float32 iterations do not cancel: Q = Q_ref + ⟨g, D⟩ + ⟨D H_λ, D⟩."""
        self.ref = ref.detach().float().clone()
        d = ref.double()
        self._q_ref = self.quad_exact(ref)
        self._g_ref = (2 * (self._h_apply(d) - self._r_mat())).float()

    def quad(self, delta: torch.Tensor) -> torch.Tensor:
        assert self.ref is not None
        dd = delta - self.ref
        return self._q_ref + (self._g_ref * dd).sum() + (self._h_apply(dd) * dd).sum()

    def pos_exact(self, delta: torch.Tensor, sq_err: list[float] | None = None) -> list[float]:
        """Per-concept ``pos_i`` (objective units) from the Gram, float64."""
        e = self.sq_errors(delta) if sq_err is None else sq_err
        return [math.sqrt(v) / s for v, s in zip(e, self.s)]

    # ---- negatives
    def _setup_hinge(self) -> None:
        p = self.p
        self.all_pairs = [(i, j) for i in range(self.N) for j in range(self.N) if i != j]
        self.hinge_on = p.lambda_con > 0 and self.N > 1
        self.neg: _Negatives | None = None
        if self.hinge_on:
            self.neg = _PairedNegatives(self) if p.negatives == "paired" else _RowspaceNegatives(self)

    @property
    def gap_scale(self) -> torch.Tensor:
        """Hinge gap multiplier per pair ``[N, N]`` (axis: separation / σ_i; else 1)."""
        return self.neg.gap_scale if self.neg is not None else torch.ones(self.N, self.N)

    def scan(self, delta: torch.Tensor) -> torch.Tensor:
        """All negative distances ``[N, N]`` at ``delta`` (no gradient; inf on the diagonal / invalid pairs)."""
        assert self.neg is not None
        with torch.no_grad():
            return self.neg.dist(delta, None)

    def dist(self, delta: torch.Tensor, pairs: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Normalised negative distances ``[N, N]`` (inf where not evaluated); ``pairs=None``: all (no grad
        for own/axis)."""
        assert self.neg is not None
        if pairs is None and not isinstance(self.neg, _PairedNegatives):
            return self.scan(delta)
        return self.neg.dist(delta, pairs)

    # ---- total loss
    def evaluate(self, delta: torch.Tensor) -> dict:
        """Exact objective at ``delta`` (float64 quadratic part): loss, quad, pos, neg, active, pairs, dist."""
        with torch.no_grad():
            dist = self.scan(delta) if self.hinge_on else torch.full((self.N, self.N), float("inf"))
            hinge, neg, active = self.hinge(delta, dist=dist)
            e = self.sq_errors(delta)
            quad = self.quad_exact(delta, e)
            total = quad + float(hinge)
            if self.p.lambda_reg:
                total += self.p.lambda_reg * float(delta.double().norm())
        return {
            "loss": total,
            "quad": quad,
            "pos": self.pos_exact(delta, e),
            "neg": _neg_list(neg),
            "active": bool(active.any()),
            "pairs": int((dist < self.p.margin).sum()),
            "dist": dist,
        }

    def loss(
        self,
        delta: torch.Tensor,
        pairs: Sequence[tuple[int, int]] | None = None,
        dist: torch.Tensor | None = None,
    ):
        """(total loss tensor, neg [N] tensor, hinge active [N] bool); ``dist`` = precomputed distances."""
        total = self.quad(delta)
        hinge, neg, active = self.hinge(delta, pairs, dist)
        total = total + hinge
        if self.p.lambda_reg:
            total = total + self.p.lambda_reg * torch.norm(delta)
        return total, neg, active

    def hinge(self, delta: torch.Tensor, pairs=None, dist: torch.Tensor | None = None):
        """(hinge term, neg [N], active [N] bool)."""
        total = delta.new_zeros(())
        if self.hinge_on:
            if dist is None:
                dist = self.dist(delta, pairs)
            neg = dist.min(dim=1).values
            gap = torch.clamp(self.p.margin - dist, min=0.0)  # inf distance -> 0
            if self.p.negatives == "axis":  # no extra push once past j's own target (t < 0)
                gap = torch.clamp(gap, max=self.p.margin)
            gap = gap * self.gap_scale
            gap = gap.max(dim=1).values  # hardest negative (= relu(m - min_j D_ij) when gap_scale = 1)
            total = total + (torch.tensor(self.hinge_w) * gap.pow(2)).sum()
            active = gap > 0
        else:
            neg = torch.full((self.N,), float("nan"))
            active = torch.zeros(self.N, dtype=torch.bool)
        return total, neg, active


_TERM_CACHE_BYTES = 256 * 2**20  # the all-pairs term cache of _RowspaceNegatives, at most


class _Negatives(Protocol):
    """The contrastive part's distances: ``dist(Δ, pairs)`` ``[N, N]`` normalised D_ij (inf where not
    evaluated; ``pairs=None``: all), ``valid`` pairs that can be pushed apart, ``gap_scale`` ``[N, N]``."""

    valid: list[tuple[int, int]]
    gap_scale: torch.Tensor

    def dist(self, delta: torch.Tensor, pairs: Sequence[tuple[int, int]] | None) -> torch.Tensor: ...


class _PairedNegatives:
    """Official negatives ``D_ij = ‖Ŷ_i − Y_j‖``: concept i's merged output and concept j's target on PAIRED
    sketch rows (row r of i with row r of j; exact when the sketches hold every row and are aligned)."""

    def __init__(self, o: _Objective) -> None:
        self.o = o
        self.valid = list(o.all_pairs)
        self.gap_scale = torch.ones(o.N, o.N)
        sk = [fs.sketch() for fs in self.o.feats]
        self._sk_x = [x.float().cpu() for _, x in sk]
        self._sk_idx = [idx for idx, _ in sk]
        full = self.o._rows_mode and all(int(ix.numel()) == n for ix, n in zip(self._sk_idx, self.o.n))
        self._xw0: torch.Tensor | None = None
        if full:  # the sketches are all the rows: reuse X_iΔW_iᵀ (and X W0ᵀ, see _rows_times)
            self._xw0 = torch.cat(self._sk_x) @ self.o.w0.T
            y = self._xw0 + self.o._Tcat
            self._sk_y = list(torch.split(y, self.o.n))
        else:
            base = list(
                torch.split(torch.cat(self._sk_x) @ self.o.w0.T, [int(x.shape[0]) for x in self._sk_x])
            )
            self._sk_y = [
                b + cs.apply_delta_t(x) if cs.has_delta else b
                for b, x, cs in zip(base, self._sk_x, self.o._concepts)
            ]
        same = all(torch.equal(self._sk_idx[0], ix) for ix in self._sk_idx) and len(set(self.o.n)) == 1
        self._aligned = same and self._sk_idx[0].numel() > 0
        self._pair_sel: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, float]] = {}
        if self._aligned:
            self._xs = torch.stack(self._sk_x)
            self._ys = torch.stack(self._sk_y)
            self._scale = self.o.n[0] / self._sk_idx[0].numel()
        else:
            for i, j in self.o.all_pairs:
                lim = min(self.o.n[i], self.o.n[j])
                ii, jj = self._sk_idx[i], self._sk_idx[j]
                common = ii[torch.isin(ii, jj) & (ii < lim)]
                if common.numel() == 0:
                    continue
                si = torch.searchsorted(ii, common)
                sj = torch.searchsorted(jj, common)
                self._pair_sel[(i, j)] = (si, sj, lim / common.numel())
        # normalisers t_ij: distance between the two targets on the paired rows
        self._t = torch.ones(self.o.N, self.o.N)
        if self.o.p.normalize == "concept":
            for i, j in self.o.all_pairs:
                yi, yj, sc = self._paired_rows(self._sk_y, i, j)
                if yi is not None:
                    self._t[i, j] = math.sqrt(sc * float((yi - yj).double().pow(2).sum())) + 1e-30

    def _paired_rows(self, ys, i, j):
        if self._aligned:
            return ys[i], self._sk_y[j], self._scale
        if (i, j) not in self._pair_sel:
            return None, None, 1.0
        si, sj, sc = self._pair_sel[(i, j)]
        return ys[i][si], self._sk_y[j][sj], sc

    def dist(self, delta: torch.Tensor, pairs: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """``[N, N]`` matrix of (normalised) D_ij, j ≠ i (every pair: ``pairs`` is ignored); diagonal and unknown
        pairs = +inf."""
        if self._aligned and self._xw0 is not None and not delta.requires_grad:
            yh = (self._xw0 + self.o._rows_times(delta)).reshape(self.o.N, -1, self.o.d_out)  # shares X Δᵀ
        elif self._aligned:
            yh = self._xs @ (self.o.w0 + delta).T  # [N, k, d_out]
        if self._aligned:
            a = yh.reshape(self.o.N, -1)
            v = self._ys.reshape(self.o.N, -1)
            d2 = a.pow(2).sum(1, keepdim=True) + v.pow(2).sum(1, keepdim=True).T - 2 * a @ v.T
            dist = torch.sqrt(torch.clamp(self._scale * d2, min=1e-12))
            dist = dist.masked_fill(torch.eye(self.o.N, dtype=torch.bool), float("inf"))
        else:
            a_w = self.o.w0 + delta
            yh = [x @ a_w.T for x in self._sk_x]
            rows = []
            for i in range(self.o.N):
                row = []
                for j in range(self.o.N):
                    yi, yj, sc = self._paired_rows(yh, i, j) if i != j else (None, None, 1.0)
                    if yi is None:
                        row.append(delta.new_tensor(float("inf")))
                        continue
                    d2 = yi.pow(2).sum() + yj.pow(2).sum() - 2 * (yi * yj).sum()
                    row.append(torch.sqrt(torch.clamp(sc * d2, min=1e-12)))
                rows.append(torch.stack(row))
            dist = torch.stack(rows)
        return dist / self._t


class _RowspaceNegatives:
    """ "own" / "axis" negatives: exact through a factor ``L_i`` (``L_iᵀL_i = G_i``) of each concept's Gram.

    Per concept i and negative j the terms are (A_ij [p, d_out], const_ij, norm_ij):
    own:  value = ‖L_iΔᵀ − A‖ / norm with A = L_iΔW_jᵀ, norm = separation (or 1 with normalize="none");
    axis: value = (⟨L_iΔᵀ, A⟩ − const) / norm with A = L_i(ΔW_i − ΔW_j)ᵀ, const = ⟨L_iΔW_jᵀ, A⟩,
          norm = ‖A‖² (position of the merged output on the segment from j's target (0) to i's (1)).
    """

    def __init__(self, o: _Objective) -> None:
        self.o = o
        self.gap_scale = torch.ones(o.N, o.N)  # hinge gap multiplier per pair (axis: separation / σ_i)
        self._L = [fs.factor(max_rank=self.o.p.hinge_rank, dtype=torch.float32) for fs in self.o.feats]
        self._stats = list(self.o._concepts)
        cache_bytes = sum(int(L.shape[0]) for L in self._L) * self.o.N * self.o.d_out * 4
        self._cache_terms = cache_bytes <= _TERM_CACHE_BYTES
        self._terms: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._sub_terms: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.valid = []
        blocks = self._target_blocks(list(range(self.o.N))) if self._cache_terms else None
        for i in range(self.o.N):
            _, _, _, valid = self._row_terms(i, None if blocks is None else blocks[i])
            self.valid.extend((i, j) for j in valid.nonzero().flatten().tolist())
        if self._cache_terms:  # padded batch of every pair: one einsum per evaluation
            pmax = max(int(L.shape[0]) for L in self._L)
            self._Lp = torch.zeros(self.o.N, pmax, self.o.d_in)
            self._Ap = torch.zeros(self.o.N, self.o.N, pmax, self.o.d_out)
            for i in range(self.o.N):
                a, _, _, _ = self._terms[i]
                p_i = int(self._L[i].shape[0])
                self._Lp[i, :p_i] = self._L[i]
                self._Ap[i, :, :p_i] = a
            self._constp = torch.stack([self._terms[i][1] for i in range(self.o.N)])
            self._normp = torch.stack([self._terms[i][2] for i in range(self.o.N)])
            self.validp = torch.stack([self._terms[i][3] for i in range(self.o.N)])
            if self.o.p.negatives == "own":
                self._Asq = self._Ap.pow(2).sum((2, 3))
            self._terms.clear()

    def _dist_all(self, delta: torch.Tensor) -> torch.Tensor:
        """Every pair at once (cached terms): ``[N, N]`` distances, inf where invalid."""
        pp = self._Lp @ delta.T  # [N, pmax, d_out]
        inner = torch.einsum("ijpd,ipd->ij", self._Ap, pp)
        if self.o.p.negatives == "axis":
            vals = (inner - self._constp) / self._normp
        else:
            psq = pp.pow(2).sum((1, 2)).unsqueeze(1)
            vals = (psq - 2 * inner + self._Asq).clamp_min(1e-24).sqrt() / self._normp
        return torch.where(self.validp, vals, torch.full_like(vals, float("inf")))

    def _target_blocks(self, idx: list[int]) -> list[torch.Tensor]:
        """``L_i ΔW_jᵀ`` for every j, as ``[N, p_i, d_out]``, for each i in ``idx`` (one batched product)."""
        lcat = torch.cat([self._L[i] for i in idx])  # [P, d_in]
        if all(cs.is_low_rank or not cs.has_delta for cs in self._stats):
            rmax = max([cs.down.shape[0] for cs in self._stats if cs.down is not None] or [1])
            downs = torch.zeros(self.o.N, rmax, self.o.d_in)
            ups = torch.zeros(self.o.N, rmax, self.o.d_out)
            for j, cs in enumerate(self._stats):
                if cs.down is not None and cs.up is not None:
                    downs[j, : cs.down.shape[0]] = cs.down
                    ups[j, : cs.up.shape[1]] = cs.up.T
            low = (
                (lcat @ downs.reshape(-1, self.o.d_in).T).reshape(-1, self.o.N, rmax).transpose(0, 1)
            )  # [N, P, r]
            t = torch.bmm(low, ups)  # [N, P, d_out]
        else:
            t = (lcat @ torch.cat(self.o.deltas).T).reshape(-1, self.o.N, self.o.d_out).transpose(0, 1)
        return list(torch.split(t, [int(self._L[i].shape[0]) for i in idx], dim=1))

    def _row_terms(self, i: int, t_all: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(A [N, p, d_out], const [N], norm [N], valid [N] bool) of concept i against every j."""
        if i in self._terms:
            return self._terms[i]
        if t_all is None:
            t_all = self._target_blocks([i])[0]
        ti = t_all[i]
        diff = ti.unsqueeze(0) - t_all
        sep_sq = diff.pow(2).sum((1, 2)).double()
        scale_sq = (ti.pow(2).sum() + t_all.pow(2).sum((1, 2))).double()
        valid = torch.ones(self.o.N, dtype=torch.bool)
        valid[i] = False
        if self.o.p.negatives == "axis" or self.o.p.normalize == "concept":
            valid &= (sep_sq > 1e-12 * scale_sq) & (
                sep_sq > 0
            )  # identical targets: nothing to move away from
        if self.o.p.negatives == "axis":
            a = diff
            const = (t_all * diff).sum((1, 2))
            norm = sep_sq.float().clamp_min(1e-30)
            self.gap_scale[i] = torch.where(valid, sep_sq.sqrt().float() / self.o.s[i], torch.ones(self.o.N))
        else:
            a = t_all
            const = torch.zeros(self.o.N)
            norm = (
                sep_sq.sqrt().float().clamp_min(1e-30)
                if self.o.p.normalize == "concept"
                else torch.ones(self.o.N)
            )
        out = (a, const, norm, valid)
        if self._cache_terms:
            self._terms[i] = out
        return out

    def _values_i(
        self, i: int, delta: torch.Tensor, js: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances of concept i to negatives ``js`` (all valid when None): (values, js).

        Without the all-pairs cache (large layers), the terms of the requested ``js`` are kept per i, so an
        optimisation over a few candidate pairs does not rebuild them at every evaluation."""
        if js is not None and not self._cache_terms:
            key = (i, tuple(js.tolist()))
            if key not in self._sub_terms:
                a_all, c_all, n_all, _ = self._row_terms(i)
                self._sub_terms[key] = (a_all[js].clone(), c_all[js], n_all[js])
            a, const, norm = self._sub_terms[key]
            pi = self._L[i] @ delta.T
            idx = torch.arange(len(js))
            if self.o.p.negatives == "axis":
                vals = ((a * pi.unsqueeze(0)).sum((1, 2)) - const[idx]) / norm[idx]
            else:
                vals = (pi.unsqueeze(0) - a).pow(2).sum((1, 2)).clamp_min(1e-24).sqrt() / norm[idx]
            return vals, js
        a, const, norm, valid = self._row_terms(i)
        if js is None:
            js = valid.nonzero().flatten()
        pi = self._L[i] @ delta.T  # [p, d_out]
        a = a[js]
        if self.o.p.negatives == "axis":
            vals = ((a * pi.unsqueeze(0)).sum((1, 2)) - const[js]) / norm[js]
        else:
            vals = (pi.unsqueeze(0) - a).pow(2).sum((1, 2)).clamp_min(1e-24).sqrt() / norm[js]
        return vals, js

    def dist(self, delta: torch.Tensor, pairs: Sequence[tuple[int, int]] | None) -> torch.Tensor:
        """Distances ``[N, N]`` of ``pairs`` (every valid pair when None), inf elsewhere."""
        if pairs is None:
            if self._cache_terms:
                return self._dist_all(delta)
            dist = torch.full((self.o.N, self.o.N), float("inf"))
            for i in range(self.o.N):
                vals, js = self._values_i(i, delta, None)
                dist[i, js] = vals
            return dist
        return self._dist_rows(delta, pairs)

    def _dist_rows(self, delta: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
        if self._cache_terms:
            mask = torch.zeros(self.o.N, self.o.N, dtype=torch.bool)
            if pairs:
                mask[torch.tensor([i for i, _ in pairs]), torch.tensor([j for _, j in pairs])] = True
            d = self._dist_all(delta)
            return torch.where(mask, d, torch.full_like(d, float("inf")))
        by_i: dict[int, list[int]] = {}
        for i, j in pairs:
            by_i.setdefault(i, []).append(j)
        vals, ii, jj = [], [], []
        for i, js in by_i.items():
            v, jt = self._values_i(i, delta, torch.tensor(js))
            vals.append(v)
            ii.append(torch.full((len(js),), i))
            jj.append(jt)
        dist = torch.full((self.o.N, self.o.N), float("inf"), dtype=delta.dtype)
        if vals:
            dist = dist.index_put((torch.cat(ii), torch.cat(jj)), torch.cat(vals))
        return dist


def _neg_list(neg: torch.Tensor) -> list[float]:
    return [v if math.isfinite(v) else float("nan") for v in neg.detach().tolist()]


def solve_loraclr(
    W0: torch.Tensor,
    stats: Sequence[ConceptStats],
    params: LoraclrParams | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """LoRACLR for one layer from sufficient statistics. Returns ``(Δ float32 [d_out, d_in], SolveInfo)``.

    ``LoraclrParams.official()`` runs the official loop (AdamW from 0, 50 steps, best iterate) on the official
    objective evaluated from statistics (exact when every concept's rows fit its sketch, else the negatives
    are sketch estimates). ``official_objective()`` minimises that objective exactly. ``recommended()``: see
    :class:`LoraclrParams`; it starts at the closed-form minimiser of the quadratic part and only iterates
    (L-BFGS) while some hinge is active. Default: ``recommended()``.
    """
    params = params or LoraclrParams.recommended()
    reduced = _in_row_space(W0, stats, params)
    if reduced is not None:
        w0_r, stats_r, params_r, q = reduced
        delta_r, info = solve_loraclr(w0_r, stats_r, params_r)
        info.preset = params.preset
        return (delta_r.double() @ q.T).float(), info
    t0 = time.perf_counter()
    obj = _Objective(W0, stats, params)
    info = SolveInfo(preset=params.preset)
    if params.init == "zero":
        start = torch.zeros(obj.d_out, obj.d_in)
    elif params.init == "lsq_reg" and params.lambda_reg:
        start = obj.lsq_shrunk(params.lambda_reg)
    else:
        start = obj.lsq.clone()
    ev0 = obj.evaluate(start)
    l0, neg0, act0, dist0 = ev0["loss"], ev0["neg"], ev0["active"], ev0["dist"]
    info.initial_loss = l0
    info.pos_initial = ev0["pos"]
    info.neg_initial = neg0
    info.hinge_active_initial = act0
    info.hinge_ever_active = act0
    best, best_loss = start.clone(), l0
    exact_start = params.init == "lsq_reg" or (params.init == "lsq" and not params.lambda_reg)
    skip = params.skip_if_inactive and not act0 and exact_start
    if params.iters > 0 and not skip:
        obj.set_reference(start)
        if params.negatives != "paired" and obj.hinge_on:
            cand = _candidates(dist0, obj.neg.valid, params.margin + _SLACK)
        else:
            cand = None
        for _round in range(max(1, params.max_rounds)):
            best, best_loss = _optimise(obj, best, best_loss, cand, info)
            if cand is None:
                break
            dist = obj.scan(best)
            new = [
                (i, j)
                for (i, j) in obj.neg.valid
                if (i, j) not in cand and float(dist[i, j]) < params.margin + _SLACK / 2
            ]
            if not new:
                break
            cand = cand + new
        evf = obj.evaluate(best)
    else:
        evf = ev0
    info.final_loss, info.neg, info.active_pairs, info.pos = evf["loss"], evf["neg"], evf["pairs"], evf["pos"]
    info.seconds = time.perf_counter() - t0
    if skip:
        info.note = "no hinge active at the warm start: closed-form solution returned"
    return best, info


def _in_row_space(
    W0: torch.Tensor, stats: Sequence[ConceptStats], params: LoraclrParams
) -> tuple[torch.Tensor, list[ConceptStats], LoraclrParams, torch.Tensor] | None:
    """The same L-BFGS problem in the coordinates of the inputs' row space, when there are few raw rows.

    Every term of the objective sees Δ only through ``X Δᵀ`` (all concepts' rows X ``[R, d_in]``) and ``‖Δ‖``,
    and the warm start (least squares) lies in X's row space, so with an orthonormal basis ``Q [d_in, r]`` of
    that space (r ≤ R) the minimiser is ``Δ = B Qᵀ`` with ``B [d_out, r]`` the minimiser of the same objective
    on the rows ``X Q``, the targets ``ΔW_i Q`` and ``W0 Q`` (ridge rescaled so that λ is unchanged). L-BFGS
    then works on ``d_out × r`` instead of ``d_out × d_in`` numbers: a text-encoder layer of SD1.5 with a few
    prompts per concept has ``R ≈ 60`` rows for ``d_in = 768 / 3072``. Returns ``(W0 Q, stats, params, Q)``,
    or None where it does not apply (Gram statistics, ``2R > d_in``, AdamW: not invariant to the change of
    coordinates).
    """
    if params.optimizer != "lbfgs" or not stats or not all(cs.features.is_raw for cs in stats):
        return None
    d_in = int(W0.shape[-1])
    rows = [cs.features.rows() for cs in stats]
    n_rows = sum(0 if r is None else int(r.shape[0]) for r in rows)
    if n_rows == 0 or 2 * n_rows > d_in:
        return None
    x = torch.cat([r for r in rows if r is not None]).double()
    e, u = torch.linalg.eigh(x @ x.T)
    keep = e > 1e-12 * float(e[-1].clamp_min(1e-300))
    q = (x.T @ u[:, keep]) / e[keep].sqrt()  # [d_in, r], orthonormal columns spanning X's rows
    r = int(q.shape[1])
    out = []
    for cs, rw in zip(stats, rows):
        fs = FeatureStats(r, cs.features.sketch_rows, cs.features.seed)
        if rw is not None and rw.shape[0]:
            fs.add((rw.double() @ q).float())
        if cs.up is not None and cs.down is not None:
            delta: Any = (cs.up, (cs.down.double() @ q).float())
        elif cs.delta is not None:
            delta = (cs.delta.double() @ q).float()
        else:
            delta = None
        out.append(ConceptStats(fs, delta, weight=cs.weight, name=cs.name))
    w0 = as_2d_weight(W0, "base weight").double()
    return (w0 @ q).float(), out, replace(params, ridge=params.ridge * r / d_in), q


def _candidates(dist: torch.Tensor, valid: Sequence[tuple[int, int]], limit: float, per_concept: int = 2):
    """Pairs optimised actively: for every concept its ``per_concept`` nearest negatives below ``limit``
    (the hinge only sees the hardest negative; later rounds add pairs that come closer)."""
    out = []
    for i in range(dist.shape[0]):
        js = sorted((float(dist[i, j]), j) for (a, j) in valid if a == i and float(dist[i, j]) < limit)
        out.extend((i, j) for _, j in js[:per_concept])
    return out


def _optimise(obj: _Objective, start: torch.Tensor, start_loss: float, pairs, info: SolveInfo):
    p = obj.p
    param = torch.nn.Parameter(start.clone())
    best = start.clone()
    best_loss = start_loss
    if p.optimizer == "adamw":
        opt = torch.optim.AdamW([param], lr=p.lr, weight_decay=p.weight_decay)
        for _ in range(p.iters):
            opt.zero_grad()
            loss, _, act = obj.loss(param, pairs)
            val = float(loss.detach())
            info.evaluations += 1
            info.history.append(val)
            info.hinge_ever_active |= bool(act.any())
            if val < best_loss:
                best_loss, best = val, param.detach().clone()
            loss.backward()
            opt.step()
            info.iterations += 1
        return best, best_loss

    opt = torch.optim.LBFGS(
        [param],
        lr=1.0,
        max_iter=p.iters,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
    )
    state = {"best": best, "best_loss": best_loss}

    def closure():
        opt.zero_grad()
        loss, _, act = obj.loss(param, pairs)
        val = float(loss.detach())
        info.evaluations += 1
        info.history.append(val)
        info.hinge_ever_active |= bool(act.any())
        if math.isfinite(val) and val < state["best_loss"]:
            state["best_loss"], state["best"] = val, param.detach().clone()
        loss.backward()
        return loss

    opt.step(closure)
    info.iterations += int(opt.state[param].get("n_iter", 0)) if param in opt.state else 0
    return state["best"], state["best_loss"]


def objective_from_stats(
    W0: torch.Tensor, delta: torch.Tensor, stats: Sequence[ConceptStats], params: LoraclrParams
) -> dict:
    """The LoRACLR objective of ``params`` at ``delta``, from statistics: ``{"loss", "quad", "pos", "neg"}``."""
    obj = _Objective(W0, stats, params)
    ev = obj.evaluate(as_2d_weight(delta, "delta").detach().float())
    return {k: ev[k] for k in ("loss", "quad", "pos", "neg")}
