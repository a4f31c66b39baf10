"""Apply LoRA deltas to a model's weights temporarily, restoring them bit-for-bit.

`patched` (the measuring world, previews, the refinement stage) adds every ΔW into a copy of its weight
for the whole block; `hooked` / `DeltaHooks` (merge feature collection) give the same numbers with one
layer's copy at a time, built in that layer's forward pre-hook. The CLoRA engine uses its own forward hooks
(``lib_loraclr.clora.routing``). The model's module paths must be the
canonical keys (docs/DESIGN.md), e.g. a ``SD1Model`` or the WebUI's ``sd_model``; pass ``prefix`` to
strip a leading part when the model is a bare sub-model (the ldm UNet alone: ``"model.diffusion_model."``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lib_loraclr.deltas import DeltaSet, LoraModule
from lib_loraclr.keymap import fused_rows, split_fused
from lib_loraclr.models.half import HALF_DTYPES

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


DeltaLike = torch.Tensor | LoraModule  # a dense ΔW shaped like the target (or its rows), or a LoRA module


def _dense_delta(d: DeltaLike) -> torch.Tensor:
    """The dense float32 ΔW of ``d`` (a LoraModule's multiplier and alpha/rank scale included)."""
    return d.delta(torch.float32) if isinstance(d, LoraModule) else d


def hook_target(model: nn.Module, key: str) -> tuple[nn.Module, torch.Tensor, slice | None]:
    """``(module whose forward reads the weight, weight, row slice)`` of a canonical key.

    Usually the key's own module; the parent ``nn.MultiheadAttention`` for its fused ``in_proj:q|k|v`` rows
    and for its ``out_proj`` (torch reads ``out_proj.weight`` inside the attention's forward; the
    ``out_proj`` module itself never runs).
    """
    weight, rows = target_weight(model, key)
    path, _part = split_fused_key(key)
    module = model.get_submodule(path)
    parent_path, _, leaf = path.rpartition(".")
    if leaf == "out_proj":
        parent = model.get_submodule(parent_path) if parent_path else model
        if isinstance(parent, nn.MultiheadAttention):
            module = parent
    return module, weight, rows


class DeltaHooks:
    """Run targeted modules with ``W0 + ΔW`` through forward hooks, one module at a time.

    Same numbers as `patched` (the module's weight is ``W0`` cast to float32, plus ΔW, for the duration of
    its forward call), but the patched copy exists only while that module runs: memory is one layer's
    weight, not one copy of every targeted weight. ΔW may stay low-rank (a `LoraModule`): its dense form is
    built per call. ``use(deltas)`` switches the active set (key → ΔW); modules with no active delta run
    with their stored weight. A fp16/bf16 weight becomes float32 only while patched (`W0` is never
    modified). ``remove()`` takes the hooks away and puts every original weight tensor back.
    Only one `DeltaHooks` may target a given weight at a time.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id → (parameter, original data)
        self._module_weights: dict[int, list[int]] = {}  # id(module) → ids of the weights it reads
        self._active: dict[int, list[tuple[slice | None, DeltaLike]]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def use(self, deltas: Mapping[str, DeltaLike]) -> None:
        """Make ``deltas`` (canonical key → ΔW) the active set; hooks are added for modules not seen yet."""
        active: dict[int, list[tuple[slice | None, DeltaLike]]] = {}
        for key, d in deltas.items():
            try:
                module, weight, rows = hook_target(self.model, key)
            except (AttributeError, KeyError):
                raise KeyError(f"LoRA key {key!r} has no module in this model") from None
            wid = id(weight)
            if wid not in self._weights:
                self._weights[wid] = (weight, weight.data)
            mid = id(module)
            if mid not in self._module_weights:
                self._module_weights[mid] = []
                self._handles.append(module.register_forward_pre_hook(self._pre))
                self._handles.append(module.register_forward_hook(self._post, always_call=True))
            if wid not in self._module_weights[mid]:
                self._module_weights[mid].append(wid)
            active.setdefault(wid, []).append((rows, d))
        self._active = active

    def _pre(self, module: nn.Module, args: tuple) -> None:
        for wid in self._module_weights.get(id(module), ()):
            weight, original = self._weights[wid]
            parts = self._active.get(wid)
            if not parts:
                weight.data = original
                continue
            new = original.float() if original.dtype in HALF_DTYPES else original.clone()  # a copy either way
            for rows, d in parts:
                view = new if rows is None else new[rows]
                dense = _dense_delta(d)
                if view.shape != dense.shape:
                    dense = dense.reshape(view.shape)  # 1x1 conv stored flat, or the reverse
                view += dense.to(device=new.device, dtype=new.dtype)
            weight.data = new

    def _post(self, module: nn.Module, args: tuple, output: object) -> None:
        for wid in self._module_weights.get(id(module), ()):
            weight, original = self._weights[wid]
            weight.data = original

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for weight, original in self._weights.values():
            weight.data = original
        self._weights.clear()
        self._module_weights.clear()
        self._active = {}


@contextmanager
def hooked(model: nn.Module, deltas: Mapping[str, DeltaLike]) -> Iterator[DeltaHooks]:
    """`DeltaHooks` with ``deltas`` active for the duration of the block (the low-memory `patched`)."""
    h = DeltaHooks(model)
    try:
        h.use(deltas)
        yield h
    finally:
        h.remove()
