"""Batching helpers for opaque conditionings (tensors, dicts, lists of tensors), batch-first.

Covers what the hosts pass to the UNet wrapper: SD1 ``[B, T, D]`` tensors, SDXL dicts
``{"crossattn": [B, T, D], "vector": [B, A]}``, A1111 dicts ``{"c_crossattn": [t], "c_concat": [t]}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConditioningMismatchError

_CROSSATTN_KEYS = ("crossattn", "c_crossattn")


def cat_conds(conds: Sequence[Any]) -> Any:
    """Concatenate conditionings along the batch dimension, recursively (tensor / dict / list)."""
    first = conds[0]
    if isinstance(first, torch.Tensor):
        try:
            return torch.cat(list(conds), dim=0)
        except RuntimeError as e:
            shapes = [tuple(c.shape) for c in conds]
            raise ConditioningMismatchError(
                f"conditionings cannot be batched together: shapes {shapes}"
            ) from e
    if isinstance(first, dict):
        keys = list(first)
        for c in conds:
            if not isinstance(c, dict) or list(c) != keys:
                raise ConditioningMismatchError("conditioning dicts have different keys")
        return {k: cat_conds([c[k] for c in conds]) for k in keys}
    if isinstance(first, (list, tuple)):
        n = len(first)
        if any(len(c) != n for c in conds):
            raise ConditioningMismatchError("conditioning lists have different lengths")
        return type(first)(cat_conds([c[i] for c in conds]) for i in range(n))
    raise ConditioningMismatchError(f"unsupported conditioning type {type(first).__name__}")


def crossattn(cond: Any) -> torch.Tensor:
    """The cross-attention context ``[B, T, D]`` of a conditioning."""
    if isinstance(cond, torch.Tensor):
        return cond
    if isinstance(cond, dict):
        for k in _CROSSATTN_KEYS:
            if k in cond:
                return crossattn(cond[k])
        raise ConditioningMismatchError(f"conditioning dict has no cross-attention entry: {sorted(cond)}")
    if isinstance(cond, (list, tuple)) and cond:
        return torch.cat([crossattn(c) for c in cond], dim=1)
    raise ConditioningMismatchError(f"unsupported conditioning type {type(cond).__name__}")


def token_length(cond: Any) -> int:
    return int(crossattn(cond).shape[1])


def batch_size(cond: Any) -> int:
    return int(crossattn(cond).shape[0])
