"""Half-precision storage with float32 compute for a merge base (an SDXL checkpoint in fp16 is 6.9 GB;
its fp32 copy would be 13.6 GB).

`store_half` swaps the class of every plain ``nn.Linear`` / ``nn.Conv2d`` whose weight is fp16 or bf16
for `HalfStoredLinear` / `HalfStoredConv2d`: same module names, parameters and hooks (``isinstance``
still holds), but ``forward`` casts the weight and bias to the input's dtype on each call, so a float32
input computes exactly what the float32 weights would. Layers inside ``nn.MultiheadAttention`` are left
alone (its forward reads ``out_proj.weight`` directly): a loader keeps them float32.

`to_float32` turns chosen modules back into float32 storage before LoRA deltas are added into their weights
(an fp16 weight would round ΔW away: fp16 keeps about 3 decimal digits).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

HALF_DTYPES = (torch.float16, torch.bfloat16)


class HalfStoredLinear(nn.Linear):
    """``nn.Linear`` computing in the input's dtype from weights stored in fp16/bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


class HalfStoredConv2d(nn.Conv2d):
    """``nn.Conv2d`` computing in the input's dtype from weights stored in fp16/bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return self._conv_forward(x, self.weight.to(x.dtype), bias)


_SWAP: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: HalfStoredLinear, nn.Conv2d: HalfStoredConv2d}


def half_storable(model: nn.Module) -> set[str]:
    """Names of the modules whose weights may stay fp16/bf16: plain ``nn.Linear`` / ``nn.Conv2d`` outside
    any ``nn.MultiheadAttention`` (other classes, e.g. a host's custom layers, keep float32)."""
    inside_mha: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            inside_mha |= {f"{name}.{sub}" if name else sub for sub, _ in mod.named_modules()}
    return {name for name, mod in model.named_modules() if type(mod) in _SWAP and name not in inside_mha}


def store_half(model: nn.Module, names: Iterable[str]) -> int:
    """Swap the modules ``names`` (from `half_storable`) whose weight is fp16/bf16 to their half-stored
    class; returns how many were swapped. Others stay as they are."""
    n = 0
    for name in names:
        mod = model.get_submodule(name)
        if type(mod) in _SWAP and mod.weight.dtype in HALF_DTYPES:
            mod.__class__ = _SWAP[type(mod)]
            n += 1
    return n


def to_float32(model: nn.Module, module_paths: Iterable[str]) -> int:
    """Store the weight and bias of each half-stored module in ``module_paths`` as float32 (values
    unchanged: fp16/bf16 → fp32 is exact) and give it its plain class back; absent paths and float32
    modules are skipped. Returns how many modules changed."""
    n = 0
    back = {v: k for k, v in _SWAP.items()}
    for path in dict.fromkeys(module_paths):
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if type(mod) not in back:
            continue
        with torch.no_grad():
            for p in (mod.weight, mod.bias):
                if p is not None and p.dtype in HALF_DTYPES:
                    p.data = p.data.float()
        mod.__class__ = back[type(mod)]
        n += 1
    return n
