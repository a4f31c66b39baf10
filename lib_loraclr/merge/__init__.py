"""Merge engine: per-layer sufficient statistics and solvers (LoRACLR, least squares, linear, SVD).

``stats``     — :class:`FeatureStats` (bounded-memory Gram + aligned row sketch), :class:`ConceptStats`.
``solvers``   — the method names and :func:`merge_layer`, over ``closed_form`` (:func:`solve_lsq`,
                :func:`solve_linear`, :func:`solve_svd`), ``loraclr`` (:func:`solve_loraclr`,
                :class:`LoraclrParams` presets) and ``fidelity`` (:func:`layer_fidelity`).
``pipeline``  — the whole-model merge; ``job`` — one merge job for every front end; ``report`` — its report.
``official``  — a faithful float32 re-implementation of the official per-layer loop (tests, benchmark).
"""

from lib_loraclr.merge.official import official_loss, official_update_contrastive
from lib_loraclr.merge.solvers import (
    METHODS,
    LoraclrParams,
    SolveInfo,
    layer_fidelity,
    merge_layer,
    objective_from_stats,
    solve_linear,
    solve_loraclr,
    solve_lsq,
    solve_svd,
)
from lib_loraclr.merge.stats import ConceptStats, FeatureStats, as_2d_weight, rows_from_conv_input

__all__ = [
    "METHODS",
    "ConceptStats",
    "FeatureStats",
    "LoraclrParams",
    "SolveInfo",
    "as_2d_weight",
    "layer_fidelity",
    "merge_layer",
    "objective_from_stats",
    "official_loss",
    "official_update_contrastive",
    "rows_from_conv_input",
    "solve_linear",
    "solve_loraclr",
    "solve_lsq",
    "solve_svd",
]
