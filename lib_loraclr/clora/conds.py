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


def select_rows(cond: Any, rows: Sequence[int], n: int) -> Any:
    """Rows ``rows`` of a conditioning whose batch is ``n`` rows (recursively). Entries with fewer rows (a
    batch-1 broadcast) are kept whole; entries with more are read by position (A1111 keeps every row of
    ``image_cond_in`` when it drops the uncond rows of ``x_in``)."""
    if isinstance(cond, torch.Tensor):
        if cond.dim() == 0 or cond.shape[0] < n:
            return cond
        if cond.shape[0] == n and list(rows) == list(range(n)):
            return cond
        return cond[torch.as_tensor(list(rows), dtype=torch.long, device=cond.device)]
    if isinstance(cond, dict):
        return {k: select_rows(v, rows, n) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(select_rows(v, rows, n) for v in cond)
    return cond


def replace_text(cond: Any, text: Any) -> Any:
    """``cond`` (a host's conditioning for the UNet) with its text part replaced by ``text``: a ``[B|1, T, D]``
    tensor, or a dict such as SDXL's ``{"crossattn", "vector"}`` whose keys replace the same keys of
    ``cond``. Other entries (``c_concat``, …) and the key order are kept; a list-wrapped entry
    (``{"c_crossattn": [t]}``) stays wrapped."""
    if isinstance(text, dict):
        if isinstance(cond, dict) and all(k in cond for k in text):
            return {k: text.get(k, v) for k, v in cond.items()}
        text = crossattn(text)
    if isinstance(cond, torch.Tensor):
        return text
    if isinstance(cond, dict):
        for k in _CROSSATTN_KEYS:
            if k in cond:
                v = cond[k]
                return {**cond, k: type(v)([text]) if isinstance(v, (list, tuple)) else text}
    raise ConditioningMismatchError(f"cannot place a text conditioning into a {type(cond).__name__}")
