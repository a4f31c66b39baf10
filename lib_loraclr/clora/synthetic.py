"""Random LoRAs for tests and benchmarks (deterministic per seed; the global RNG is untouched)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..deltas import DeltaSet, LoraModule

DEFAULT_TARGETS = ("attn2.to_k", "attn2.to_v", "attn2.to_q", "attn2.to_out.0", "attn1.to_q", "attn1.to_k")


def random_lora(
    model: nn.Module,
    seed: int,
    rank: int = 4,
    std: float = 0.3,
    targets: Sequence[str] = DEFAULT_TARGETS,
    prefix: str = "",
    conv: bool = False,
    relative: float | None = None,
) -> DeltaSet:
    """A `DeltaSet` with a rank-``rank`` LoRA (alpha = rank, so scale 1) on every module of ``model``
    whose name ends with one of ``targets`` (and, with ``conv``, on every 3×3 conv of ResBlocks as a
    LoCon). Keys are ``prefix + module name`` (``prefix="model.diffusion_model."`` for a bare UNet).

    ``relative``: instead of ``std``, draw ``down ~ N(0, 1/in)`` and ``up ~ N(0, relative²/rank)`` so that
    ``‖ΔW·x‖ ≈ relative·‖x‖`` whatever the layer width (for full-size models)."""
    g = torch.Generator().manual_seed(int(seed))
    mods: dict[str, LoraModule] = {}
    for name, m in model.named_modules():
        key = prefix + name
        if isinstance(m, nn.Linear) and name.endswith(tuple(targets)):
            sd, su = (std, std) if relative is None else (m.in_features**-0.5, relative * rank**-0.5)
            down = torch.randn(rank, m.in_features, generator=g) * sd
            up = torch.randn(m.out_features, rank, generator=g) * su
            mods[key] = LoraModule(key, down=down, up=up, alpha=float(rank))
        elif conv and isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and ".in_layers." in name:
            down = torch.randn(rank, m.in_channels, 3, 3, generator=g) * std / 3
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * std
            mods[key] = LoraModule(key, down=down, up=up, alpha=float(rank), kind="locon")
    return DeltaSet(mods, arch="sd1", fmt="synthetic")
