"""Random kohya-style LoRAs for a model's modules (tests only)."""

from __future__ import annotations

import torch
from torch import nn

from lib_loraclr.apply import target_weight
from lib_loraclr.deltas import DeltaSet, LoraModule


def attention_keys(model: nn.Module, te: bool = True, kv: bool = True, other: bool = True) -> list[str]:
    """Canonical keys of the usual LoRA targets of an SD1-layout model."""
    keys = []
    for name, mod in model.named_modules():
        in_te = name.startswith(("cond_stage_model.", "conditioner.embedders."))
        if (
            te
            and in_te
            and isinstance(mod, nn.Linear)
            and name.rsplit(".", 1)[-1]
            in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "c_fc", "c_proj")
        ):
            keys.append(name)
        if te and in_te and isinstance(mod, nn.MultiheadAttention):
            keys += [f"{name}.in_proj:{p}" for p in "qkv"]
        if not name.startswith("model.diffusion_model."):
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_kv = ".attn2.to_k" in name or ".attn2.to_v" in name
        if (kv and is_kv) or (
            other
            and not is_kv
            and (
                name.endswith(("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"))
                or leaf in ("proj_in", "proj_out")
            )
        ):
            keys.append(name)
    return keys


def random_lora(
    model: nn.Module, keys: list[str], rank: int = 4, scale: float = 0.3, seed: int = 0, arch: str = "sd1"
) -> DeltaSet:
    """LoRA factors with ‖ΔW‖ ≈ scale·‖W0‖ per module (conv kernels kept 4-D)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for k in keys:
        w, rows = target_weight(model, k)
        w = w if rows is None else w[rows]
        out, inp = w.shape[0], w[0].numel()
        down = torch.randn(rank, inp, generator=g) / inp**0.5
        up = torch.randn(out, rank, generator=g)
        d = up @ down
        up = up * (scale * w.detach().float().norm() / d.norm())
        if w.dim() == 4:
            down = down.reshape(rank, *w.shape[1:])
            up = up[:, :, None, None]
        mods[k] = LoraModule(key=k, down=down, up=up, alpha=float(rank))
    return DeltaSet(modules=mods, arch=arch, fmt="kohya")
