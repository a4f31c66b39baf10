"""Fidelity of a merged layer: the error against each concept's own LoRA on its own inputs, the other
concepts' leak, the change of the base on neutral inputs (trace formulas over the statistics)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lib_loraclr.merge.closed_form import _apply_gram, _own_effect_sq, _sqnorm_on
from lib_loraclr.merge.stats import ConceptStats, FeatureStats, as_2d_weight


def layer_fidelity(
    delta: torch.Tensor,
    stats: Sequence[ConceptStats],
    W0: torch.Tensor | None = None,
    neutral: FeatureStats | None = None,
) -> dict:
    """Fidelity / interference / base-preservation numbers of a merged ``Δ`` at one layer (trace formulas).

    With ``E_i = Δ − ΔW_i`` and ``‖X Mᵀ‖² = ⟨M G, M⟩``:

    - ``rel_err[i] = ‖X_i E_iᵀ‖ / ‖X_i ΔW_iᵀ‖``: error of the merged layer vs concept i's own LoRA on concept
      i's inputs, relative to the LoRA's effect (NaN when ΔW_i = 0; see ``base_change_own``);
      ``abs_err[i]`` and ``own_effect[i] = ‖X_iΔW_iᵀ‖`` are the two norms.
    - ``leak[i][j] = ⟨X_i E_iᵀ, X_i ΔW_jᵀ⟩ / ‖X_i ΔW_jᵀ‖²`` (j ≠ i): the share of concept j's effect that the
      merged layer adds on concept i's inputs beyond i's own (plain sum of two LoRAs → 1, none → 0;
      NaN when ΔW_j does nothing on X_i or on the diagonal).
    - ``interference[i] = mean_{j≠i} |leak[i][j]|`` over finite entries (NaN if none).
    - ``base_change_own[i] = ‖X_iΔᵀ‖ / ‖X_iW0ᵀ‖`` for concepts with ΔW_i = 0 (needs W0), else NaN.
    - ``base_change_neutral = ‖X_nΔᵀ‖ / ‖X_nW0ᵀ‖`` on the ``neutral`` features (needs W0), else None.

    Returns plain floats / lists (JSON-ready; NaN stays NaN).
    """
    d = as_2d_weight(delta, "delta").detach().double()
    d_out = d.shape[0]
    nan = float("nan")
    rel, abs_err, own, base_own = [], [], [], []
    n = len(stats)
    leak = [[nan] * n for _ in range(n)]
    w0 = None if W0 is None else as_2d_weight(W0, "base weight").detach().double()
    all_d = [cs.delta_or_zeros(d_out).double() for cs in stats]
    for i, cs in enumerate(stats):
        fs = cs.features
        r = fs.rows()
        g = None if (r is not None and r.shape[0] < fs.d_in) else fs.gram()
        e = d - all_d[i]
        eg = _apply_gram(fs, e, g)  # E_i G_i
        err2 = max(float((eg * e).sum()), 0.0)
        if g is None:  # few raw rows: every effect through the rows
            assert r is not None
            eff2 = [
                float(cs_j.apply_delta_t(r).double().pow(2).sum()) if cs_j.has_delta else 0.0
                for cs_j in stats
            ]
        else:  # ‖X_iΔW_jᵀ‖² from the Gram (cheap through the factors of low-rank deltas)
            eff2 = [max(_own_effect_sq(cs_j, g), 0.0) if cs_j.has_delta else 0.0 for cs_j in stats]
        abs_err.append(math.sqrt(err2))
        own.append(math.sqrt(eff2[i]))
        rel.append(math.sqrt(err2 / eff2[i]) if eff2[i] > 0 else nan)
        scale = max(eff2) if eff2 else 0.0
        for j in range(n):
            if j != i and eff2[j] > 1e-12 * scale and eff2[j] > 0:
                leak[i][j] = float((eg * all_d[j]).sum()) / eff2[j]
        if cs.delta is None and w0 is not None:
            b2 = _sqnorm_on(fs, w0, g)
            base_own.append(math.sqrt(_sqnorm_on(fs, d, g) / b2) if b2 > 0 else nan)
        else:
            base_own.append(nan)
    interference = []
    for i in range(n):
        vals = [abs(v) for j, v in enumerate(leak[i]) if j != i and math.isfinite(v)]
        interference.append(sum(vals) / len(vals) if vals else nan)
    neutral_change = None
    if neutral is not None and w0 is not None and neutral.n > 0:
        b2 = _sqnorm_on(neutral, w0)
        neutral_change = math.sqrt(_sqnorm_on(neutral, d) / b2) if b2 > 0 else nan
    return {
        "rel_err": rel,
        "abs_err": abs_err,
        "own_effect": own,
        "leak": leak,
        "interference": interference,
        "base_change_own": base_own,
        "base_change_neutral": neutral_change,
    }
