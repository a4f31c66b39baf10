"""The one internal representation of a LoRA: a set of per-module weight deltas.

A `LoraModule` holds either low-rank factors (``up @ down`` with ``alpha``) or, for formats without
a low-rank form (LyCORIS LoHa/LoKr, full ``diff``), a dense ΔW. Conv kernels keep their spatial
dimensions. Keys are canonical module paths in the WebUI's model (see docs/DESIGN.md).

ΔW = multiplier · scale · up @ down,  scale = alpha / rank (1.0 when alpha is absent),
shaped like the target module's weight: ``[out, in]`` (linear) or ``[out, in, kh, kw]`` (conv).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

UNET_PREFIX = "model.diffusion_model."


@dataclass
class LoraModule:
    """Weight delta for one module.

    down: ``[r, in]`` (linear) or ``[r, in, kh, kw]`` (conv); up: ``[out, r]`` or ``[out, r, 1, 1]``.
    dense: materialised ΔW (without multiplier), used instead of up/down when set.
    alpha: kohya alpha; ``None`` means scale 1.0 (the WebUI's rule).
    """

    key: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    dense: torch.Tensor | None = None
    multiplier: float = 1.0
    kind: str = "lora"  # lora | locon | loha | lokr | full

    def __post_init__(self) -> None:
        if self.dense is None and (self.down is None or self.up is None):
            raise ValueError(f"{self.key}: a LoraModule needs up and down, or a dense delta")
        if self.dense is None:
            assert self.down is not None and self.up is not None
            if self.up.shape[1] != self.down.shape[0]:
                raise ValueError(
                    f"{self.key}: rank mismatch, lora_up has rank {self.up.shape[1]} "
                    f"but lora_down has rank {self.down.shape[0]}"
                )

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    @property
    def is_conv(self) -> bool:
        t = self.dense if self.dense is not None else self.down
        assert t is not None
        return t.dim() == 4

    @property
    def scale(self) -> float:
        """alpha / rank, or 1.0 without alpha (dense deltas: 1.0)."""
        if self.dense is not None or self.alpha is None or self.rank is None:
            return 1.0
        return float(self.alpha) / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ΔW (= the target weight's shape)."""
        if self.dense is not None:
            return tuple(self.dense.shape)
        assert self.down is not None and self.up is not None
        if self.down.dim() == 4:
            return (self.up.shape[0], self.down.shape[1], self.down.shape[2], self.down.shape[3])
        return (self.up.shape[0], self.down.shape[1])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ΔW including multiplier and scale, shaped like the module weight."""
        m = self.multiplier * self.scale
        if self.dense is not None:
            return self.dense.to(dtype) * m
        assert self.down is not None and self.up is not None
        up = self.up.to(dtype).flatten(1)  # [out, r]
        if self.down.dim() == 4:
            r, cin, kh, kw = self.down.shape
            d = up @ self.down.to(dtype).reshape(r, cin * kh * kw)
            return d.reshape(up.shape[0], cin, kh, kw) * m
        return (up @ self.down.to(dtype)) * m

    def delta_2d(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW flattened to ``[out, in·kh·kw]`` (a 1×1 conv becomes a linear map)."""
        d = self.delta(dtype)
        return d.flatten(1) if d.dim() == 4 else d

    def scaled(self, multiplier: float) -> LoraModule:
        """A copy whose multiplier is multiplied by ``multiplier``."""
        return replace(self, multiplier=self.multiplier * multiplier)


@dataclass
class DeltaSet:
    """All module deltas of one LoRA file (or of a merge result).

    arch: "sd1" | "sd2" | "sdxl" | "unknown"; fmt: the file format it was read from
    ("kohya", "peft", "diffusers", "edlora", "lycoris", "merged"); unmapped: source keys that no
    key map recognised (reported, never silently dropped); metadata: safetensors metadata strings.
    """

    modules: dict[str, LoraModule] = field(default_factory=dict)
    arch: str = "unknown"
    fmt: str = "kohya"
    metadata: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    source: str = ""
    # ED-LoRA / textual-inversion style new token embeddings: name -> [n_tokens, dim]
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)

    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    def __contains__(self, key: object) -> bool:
        return key in self.modules

    def __getitem__(self, key: str) -> LoraModule:
        return self.modules[key]

    def unet_keys(self) -> list[str]:
        return [k for k in self.modules if is_unet_key(k)]

    def te_keys(self) -> list[str]:
        return [k for k in self.modules if not is_unet_key(k)]

    def scaled(self, te: float = 1.0, unet: float = 1.0) -> DeltaSet:
        """A copy with TE and UNet multipliers applied (a multiplier of 0 drops that part)."""
        mods = {}
        for k, m in self.modules.items():
            s = unet if is_unet_key(k) else te
            if s != 0.0:
                mods[k] = m.scaled(s)
        return replace(self, modules=mods, unmapped=list(self.unmapped))

    def ranks(self) -> dict[str, int | None]:
        return {k: m.rank for k, m in self.modules.items()}

    def trigger_words(self) -> list[str]:
        """Trigger words from our metadata (``loraclr_trigger``) or kohya's ``ss_tag_frequency``."""
        from lib_loraclr.metadata import trigger_words  # local: keeps this module dependency-free

        return trigger_words(self.metadata)


def is_unet_key(key: str) -> bool:
    """True for canonical keys inside the UNet (``model.diffusion_model.…``)."""
    return key.startswith(UNET_PREFIX)
