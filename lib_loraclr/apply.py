"""Apply LoRA deltas to a model's weights temporarily, restoring them bit-for-bit.

Used offline (merge feature collection, the measuring world, previews); the CLoRA engine uses
forward hooks instead (``lib_loraclr.clora.routing``). The model's module paths must be the
canonical keys (docs/DESIGN.md), e.g. a ``SD1Model`` or the WebUI's ``sd_model``; pass ``prefix`` to
strip a leading part when the model is a bare sub-model (the ldm UNet alone: ``"model.diffusion_model."``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lib_loraclr.deltas import DeltaSet
from lib_loraclr.keymap import fused_rows, split_fused

WeightedDeltas = Sequence[tuple[DeltaSet, float]]

split_fused_key = split_fused  # "a.attn.in_proj:q" → ("a.attn", "q"); other keys → (key, None)


def target_weight(model: nn.Module, key: str, prefix: str = "") -> tuple[torch.Tensor, slice | None]:
    """The weight tensor a canonical key targets, and the row slice for fused q/k/v (else None)."""
    if prefix:
        if not key.startswith(prefix):
            raise KeyError(f"{key!r} is not under {prefix!r}")
        key = key[len(prefix) :]
    path, part = split_fused_key(key)
    module = model.get_submodule(path)
    if part is None:
        weight = module.weight
        if not isinstance(weight, torch.Tensor):
            raise KeyError(f"{key!r}: module has no weight tensor")
        return weight, None
    w = module.in_proj_weight  # type: ignore[union-attr]
    return w, fused_rows(part, w.shape[0])


def _as_list(deltas: DeltaSet | WeightedDeltas) -> list[tuple[DeltaSet, float]]:
    if isinstance(deltas, DeltaSet):
        return [(deltas, 1.0)]
    return list(deltas)


def summed_deltas(deltas: DeltaSet | WeightedDeltas) -> dict[str, torch.Tensor]:
    """Σ_k w_k · ΔW_k per canonical key (fp32), the linear merge most users do today."""
    out: dict[str, torch.Tensor] = {}
    for ds, w in _as_list(deltas):
        for mod in ds:
            d = mod.delta(torch.float32) * w
            out[mod.key] = out[mod.key] + d if mod.key in out else d
    return out


@contextmanager
def patched(
    model: nn.Module,
    deltas: DeltaSet | WeightedDeltas | dict[str, torch.Tensor],
    prefix: str = "",
    skip_missing: bool = False,
) -> Iterator[None]:
    """Add ΔW into the model's weights for the duration of the block; restore bit-for-bit after.

    deltas: one DeltaSet, a list of (DeltaSet, weight), or a dict canonical key → dense ΔW.
    Keys whose module is absent raise KeyError unless ``skip_missing`` (keys outside ``prefix`` are
    skipped silently when a prefix is given: a UNet-only model ignores text-encoder deltas).
    The original tensors are kept and put back (``param.data = original``), so no rounding error
    of add-then-subtract can remain.
    """
    dense = deltas if isinstance(deltas, dict) else summed_deltas(deltas)
    saved: list[tuple[nn.Parameter | torch.Tensor, torch.Tensor]] = []
    try:
        for key, d in dense.items():
            if prefix and not key.startswith(prefix):
                continue
            try:
                weight, rows = target_weight(model, key, prefix)
            except (AttributeError, KeyError):
                if skip_missing:
                    continue
                raise KeyError(f"LoRA key {key!r} has no module in this model") from None
            original = weight.data
            new = original.clone()
            view = new if rows is None else new[rows]
            if view.shape != d.shape:
                d = d.reshape(view.shape)  # 1x1 conv stored flat, or the reverse
            view += d.to(device=new.device, dtype=new.dtype)
            saved.append((weight, original))
            weight.data = new
        yield
    finally:
        for weight, original in reversed(saved):
            weight.data = original
