"""Per-layer merge solvers: LoRACLR (contrastive), least squares (Mix-of-Show), linear sum, SVD re-rank.

Notation for one layer: base weight ``W0 [d_out, d_in]``; concept i has input rows ``X_i [n_i, d_in]``
(summarised by :class:`~lib_loraclr.merge.stats.FeatureStats`, Gram ``G_i = X_iᵀX_i``) and its own delta
``ΔW_i``; its target is ``Y_i = X_i (W0 + ΔW_i)ᵀ``. Every solver returns one additive ``Δ [d_out, d_in]``
(float32); the merged layer is ``W0 + Δ``. Bias is never involved.

LoRACLR objective (official code, methods.md §1.4), with ``Ŷ_i = X_i (W0 + Δ)ᵀ``:
``D_ij = ‖vec(Ŷ_i) − vec(Y_j)‖``, ``pos_i = D_ii``, ``neg_i = min_{j≠i} D_ij``,
``L = λ_con·(1/N)Σ_i[pos_i² + max(0, m − neg_i)²] + λ_mse·mean((Ŷ − Y)²) + λ_reg·‖Δ‖_F``.
From statistics: ``pos_i² = ⟨(Δ−ΔW_i) G_i, Δ−ΔW_i⟩`` exactly; the sum of the pos and MSE terms is a quadratic
``Σ_i c_i pos_i²`` whose minimiser is a weighted least-squares solution (closed form). The negatives need
rows: the official pairing (row r of concept i vs row r of concept j) is evaluated on the aligned sketches.

Presets (:class:`LoraclrParams`): ``official()`` — the official loop (AdamW from 0, 50 steps) on the official
objective, reproducing its iterates; ``official_objective()`` — the same objective minimised exactly (closed
form, L-BFGS only if a hinge is active); ``recommended()`` — our objective (relative errors, "axis" negatives).

``closed_form`` — lsq / linear / svd; ``loraclr`` — the contrastive solver and its presets; ``fidelity`` — the
per-layer fidelity metric; this module — the method names and the dispatcher `merge_layer`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from lib_loraclr.errors import LoraclrError
from lib_loraclr.merge.closed_form import solve_linear, solve_lsq, solve_svd
from lib_loraclr.merge.fidelity import layer_fidelity
from lib_loraclr.merge.loraclr import LoraclrParams, SolveInfo, objective_from_stats, solve_loraclr
from lib_loraclr.merge.stats import ConceptStats

METHODS = ("loraclr", "lsq", "linear", "svd")

__all__ = [
    "METHODS",
    "LoraclrParams",
    "SolveInfo",
    "layer_fidelity",
    "merge_layer",
    "objective_from_stats",
    "solve_linear",
    "solve_loraclr",
    "solve_lsq",
    "solve_svd",
]


def merge_layer(
    method: str,
    W0: torch.Tensor,
    stats: Sequence[ConceptStats],
    *,
    params: LoraclrParams | None = None,
    ridge: float = 1e-6,
    rank: int = 64,
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Merge one layer with ``method`` in ``{"loraclr", "lsq", "linear", "svd"}``.

    ``weights``: lsq → importance weights; linear / svd → multipliers of ΔW_i (default 1). ``linear`` and
    ``svd`` only read the deltas of ``stats`` (their features may be empty).
    Returns ``(Δ float32 [d_out, d_in], info dict)``.
    """
    t0 = time.perf_counter()
    if method == "loraclr":
        delta, info = solve_loraclr(W0, stats, params)
        return delta, info.as_dict()
    if method == "lsq":
        delta = solve_lsq(W0, stats, ridge=ridge, weights=weights)
    elif method == "linear":
        delta = solve_linear([cs.delta for cs in stats], weights)
    elif method == "svd":
        delta = solve_svd([cs.delta for cs in stats], weights, rank=rank)
    else:
        raise LoraclrError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    return delta, {"method": method, "seconds": time.perf_counter() - t0}
