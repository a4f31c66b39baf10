"""Cross-attention probability capture at the chosen layers only.

`AttentionCapture` hooks ``attn2.to_q`` and ``attn2.to_k`` of the chosen cross-attention layers and
recomputes ``softmax(q·kᵀ·scale)`` per head from their outputs (with gradients when the input needs
them). The model's own attention (xformers, SDP, sub-quadratic, Forge's attention function…) still
produces the layer output untouched; only the capture layers pay for an explicit ``[R, heads, N, T]``
probability tensor, and those are the lowest-resolution layers (SD1 at 512²: 16×16, N = 256).

`AttentionCapture.maps()` = mean over the captured layers and heads: ``[R, N, T]`` per batch row
(``N = h·w`` query positions in row-major order, ``T`` = context tokens).

Layer choice (`lowest_resolution_layers`): the ``attn2`` layers of the ``input_blocks`` /
``output_blocks`` at the deepest down-sampling level that has cross-attention, the middle block
excluded (SD1: input_blocks 7, 8 and output_blocks 3, 4, 5; SDXL: input_blocks 7, 8 and output_blocks
0, 1, 2). The level comes from the module structure (``Downsample`` / ``Upsample`` blocks), so no probe
forward is needed. Pass explicit layer names for other architectures.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CaptureError


class StopForward(Exception):
    """Raised inside the UNet after the last capture layer when the rest of the forward is not needed."""


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names (relative to ``unet``) of every ``attn2`` module that has ``to_q`` and ``to_k``."""
    return [
        n
        for n, m in unet.named_modules()
        if n.rsplit(".", 1)[-1] == "attn2" and hasattr(m, "to_q") and hasattr(m, "to_k")
    ]


def _has_class(module: nn.Module, name: str) -> bool:
    return any(type(m).__name__ == name for m in module.modules())


def attention_levels(unet: nn.Module) -> dict[str, tuple[str, int]]:
    """``{attn2 name: (part, level)}`` with part in input/middle/output and level = number of 2×
    down-samplings before that layer (ldm / sgm / Forge module layout: ``input_blocks``,
    ``middle_block``, ``output_blocks``)."""
    inp = getattr(unet, "input_blocks", None)
    outp = getattr(unet, "output_blocks", None)
    if not isinstance(inp, nn.ModuleList) or not isinstance(outp, nn.ModuleList):
        raise CaptureError(
            f"{type(unet).__name__} has no input_blocks/output_blocks; pass the capture layer names explicitly"
        )
    block_level: dict[str, tuple[str, int]] = {}
    level = 0
    for i, block in enumerate(inp):
        if _has_class(block, "Downsample"):
            level += 1
        block_level[f"input_blocks.{i}"] = ("input", level)
    block_level["middle_block"] = ("middle", level)
    for i, block in enumerate(outp):
        block_level[f"output_blocks.{i}"] = ("output", level)
        if _has_class(block, "Upsample"):
            level -= 1
    out: dict[str, tuple[str, int]] = {}
    for name in cross_attention_layers(unet):
        parts = name.split(".")
        key = parts[0] if parts[0] == "middle_block" else ".".join(parts[:2])
        if key in block_level:
            out[name] = block_level[key]
    return out


def lowest_resolution_layers(unet: nn.Module) -> list[str]:
    """The ``attn2`` layers at the deepest level with cross-attention outside the middle block."""
    levels = {n: lv for n, (part, lv) in attention_levels(unet).items() if part != "middle"}
    if not levels:
        raise CaptureError("the UNet has no cross-attention (attn2) layers outside its middle block")
    deepest = max(levels.values())
    return [n for n, lv in levels.items() if lv == deepest]


def localizing_layers(unet: nn.Module) -> list[str]:
    """The ``attn2`` layers next to the bottleneck: the last input block and the first output block
    with cross-attention at the deepest level that has it, and the middle block (every ``attn2`` of
    those blocks, e.g. all 10 transformer blocks of SDXL's).

    These are the layers whose maps place the concept tokens (see docs/DESIGN.md, "CLoRA masks": in the
    measuring world input_blocks.5, middle_block and output_blocks.0 localise 96–100 % of the concept
    tokens, the other 4×8 layers 46–90 %, the 8×16 ones at chance). World: input_blocks.5,
    middle_block, output_blocks.0; SD1: input_blocks.8, middle_block, output_blocks.3; SDXL:
    input_blocks.8, middle_block, output_blocks.0.
    """
    levels = attention_levels(unet)
    outside = {n: lv for n, (part, lv) in levels.items() if part != "middle"}
    if not outside:
        raise CaptureError("the UNet has no cross-attention (attn2) layers outside its middle block")
    deepest = max(outside.values())

    def block(name: str) -> str:
        parts = name.split(".")
        return parts[0] if parts[0] == "middle_block" else ".".join(parts[:2])

    inputs = [n for n, (part, lv) in levels.items() if part == "input" and lv == deepest]
    outputs = [n for n, (part, lv) in levels.items() if part == "output" and lv == deepest]
    chosen: set[str] = set()
    if inputs:
        last = max(inputs, key=lambda n: int(block(n).split(".")[1]))
        chosen |= {n for n in inputs if block(n) == block(last)}
    if outputs:
        first = min(outputs, key=lambda n: int(block(n).split(".")[1]))
        chosen |= {n for n in outputs if block(n) == block(first)}
    chosen |= {n for n, (part, _) in levels.items() if part == "middle"}
    return [n for n in levels if n in chosen]


def resize_maps(maps: torch.Tensor, hw_from: tuple[int, int], hw_to: tuple[int, int]) -> torch.Tensor:
    """Resample attention maps ``[..., N, T]`` (``N = h·w`` row-major) from ``hw_from`` to ``hw_to``
    (bilinear up, area down); a map keeps its meaning as a per-position share of the token's mass."""
    if tuple(hw_from) == tuple(hw_to):
        return maps
    lead = maps.shape[:-2]
    t = maps.shape[-1]
    x = maps.reshape(-1, hw_from[0], hw_from[1], t).permute(0, 3, 1, 2)
    if hw_to[0] >= hw_from[0] and hw_to[1] >= hw_from[1]:
        y = F.interpolate(x, size=tuple(hw_to), mode="bilinear", align_corners=False)
    else:
        y = F.adaptive_avg_pool2d(x, tuple(hw_to))
    return y.permute(0, 2, 3, 1).reshape(*lead, hw_to[0] * hw_to[1], t)


def map_hw(n_query: int, height: int, width: int) -> tuple[int, int]:
    """Spatial size ``(h, w)`` with ``h·w = n_query`` of a map at a latent of ``height × width``
    (repeated ceil-halving, as ldm's stride-2 convs do)."""
    h, w = height, width
    while h * w > n_query:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != n_query:
        raise CaptureError(f"attention maps of {n_query} positions do not fit a {height}×{width} latent")
    return h, w


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float | None = None) -> torch.Tensor:
    """``softmax(q·kᵀ·scale)`` averaged over heads: q ``[R, N, h·d]``, k ``[R, T, h·d]`` → ``[R, N, T]``
    (float32)."""
    r, n, c = q.shape
    t = k.shape[1]
    d = c // heads
    if scale is None:
        scale = d**-0.5
    with torch.autocast(device_type=q.device.type, enabled=False):  # full precision under the host's autocast
        qh = q.float().reshape(r, n, heads, d).transpose(1, 2)
        kh = k.float().reshape(r, t, heads, d).transpose(1, 2)
        return (qh @ kh.transpose(-1, -2) * scale).softmax(dim=-1).mean(dim=1)


class AttentionCapture:
    """Capture head- and layer-averaged cross-attention probabilities at ``layers`` of ``unet``.

    Args:
        unet: the ldm/sgm/Forge UNet module.
        layers: ``attn2`` module names relative to ``unet``; default `lowest_resolution_layers`.

    Attributes set per call: ``stop_after_last`` — raise `StopForward` once every layer was captured
    (the caller catches it; used for the gradient pass, which needs the maps only); ``enabled``.
    While installed, gradient checkpointing (ldm's ``checkpoint=True`` flag) is switched off on the
    transformer blocks that hold capture layers (it would compute them without autograd) and restored
    on removal.
    """

    def __init__(self, unet: nn.Module, layers: Sequence[str] | None = None) -> None:
        self.unet = unet
        self.layers = list(layers) if layers is not None else lowest_resolution_layers(unet)
        if not self.layers:
            raise CaptureError("no capture layers given")
        self.modules: list[nn.Module] = []
        for name in self.layers:
            try:
                m = unet.get_submodule(name)
            except AttributeError as e:
                raise CaptureError(f"capture layer {name!r} does not exist in the UNet") from e
            if not (hasattr(m, "to_q") and hasattr(m, "to_k")):
                raise CaptureError(f"capture layer {name!r} is not an attention module with to_q/to_k")
            self.modules.append(m)
        self.enabled = True
        self.stop_after_last = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._restore_ckpt: list[tuple[nn.Module, Any]] = []
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._sums: dict[int, torch.Tensor] = {}
        self._count = 0
        self.latent_hw: tuple[int, int] | None = None

    # ------------------------------------------------------------------ lifecycle
    def install(self) -> AttentionCapture:
        if self._handles:
            return self
        try:
            for i, (name, m) in enumerate(zip(self.layers, self.modules)):
                self._handles.append(m.to_q.register_forward_hook(self._hook(i, "q")))
                self._handles.append(m.to_k.register_forward_hook(self._hook(i, "k")))
                parent_name = name.rsplit(".", 1)[0] if "." in name else ""
                parent = self.unet.get_submodule(parent_name) if parent_name else self.unet
                if getattr(parent, "checkpoint", None) is True:
                    self._restore_ckpt.append((parent, parent.checkpoint))
                    parent.checkpoint = False
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for parent, value in self._restore_ckpt:
            parent.checkpoint = value
        self._restore_ckpt.clear()
        self.reset()

    def __enter__(self) -> AttentionCapture:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the maps of the previous call (call before every UNet call)."""
        self._pending.clear()
        self._sums = {}
        self._count = 0

    @property
    def complete(self) -> bool:
        return self._count == len(self.layers)

    def maps(self) -> torch.Tensor:
        """``[R, N, T]`` mean over capture layers and heads of the last call (float32). Layers of several
        resolutions (possible only with ``latent_hw`` set) are resampled to the finest one first."""
        if not self._sums or self._count == 0:
            raise CaptureError("no attention was captured; did the UNet run with the capture installed?")
        if self._count < len(self.layers):
            raise CaptureError(
                f"only {self._count} of {len(self.layers)} capture layers ran in the last call"
            )
        if self._count > len(self.layers):
            raise CaptureError(
                f"{self._count} captures for {len(self.layers)} layers: call reset() before each call"
            )
        if len(self._sums) == 1:
            return next(iter(self._sums.values())) / self._count
        assert self.latent_hw is not None
        h, w = self.latent_hw
        n_max = max(self._sums)
        hw_max = map_hw(n_max, h, w)
        total = sum(resize_maps(m, map_hw(n, h, w), hw_max) for n, m in self._sums.items())
        return total / self._count  # type: ignore[operator]

    def _hook(self, i: int, which: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            if not self.enabled:
                return
            slot = self._pending.setdefault(i, {})
            slot[which] = output
            if "q" in slot and "k" in slot:
                del self._pending[i]
                self._accumulate(i, slot["q"], slot["k"])
                if self.stop_after_last and self.complete:
                    raise StopForward()

        return hook

    def _accumulate(self, i: int, q: torch.Tensor, k: torch.Tensor) -> None:
        attn = self.modules[i]
        heads = int(attn.heads)
        scale = getattr(attn, "scale", None)
        probs = attention_probs(q, k, heads, float(scale) if scale is not None else None)
        n = probs.shape[1]
        if self._sums and n not in self._sums and self.latent_hw is None:
            raise CaptureError(
                f"capture layer {self.layers[i]} has {n} query positions, others {next(iter(self._sums))}; "
                "choose layers of one resolution or set latent_hw"
            )
        self._sums[n] = probs if n not in self._sums else self._sums[n] + probs
        self._count += 1


def count_hooks(module: nn.Module) -> int:
    """Number of forward (pre-)hooks on ``module`` and all its sub-modules (for leak checks)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _is_attention(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads"))


@contextmanager
def override_attention(unet: nn.Module, make_forward: Callable[[nn.Module, str], Callable[..., Any]]) -> Any:
    """Temporarily give every ldm-style attention module of ``unet`` an instance-level ``forward``
    (``make_forward(module, name)``), like the WebUI's optimisations do class-wide; restored on exit."""
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for name, m in unet.named_modules():
            if _is_attention(m):
                saved.append((m, m.__dict__.get("forward", None)))
                m.forward = make_forward(m, name)
        yield
    finally:
        for m, prev in saved:
            if prev is None:
                del m.forward
            else:
                m.forward = prev


def _sdpa_forward(m: nn.Module, name: str) -> Callable[..., Any]:
    def forward(
        self: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None, mask: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        h = self.heads
        q = self.to_q(x)
        ctx = x if context is None else context
        k = self.to_k(ctx)
        v = self.to_v(ctx)
        b, n, c = q.shape
        q, k, v = (t.reshape(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))

    return types.MethodType(forward, m)


def efficient_attention(unet: nn.Module) -> Any:
    """Context manager: every attention module of ``unet`` uses ``F.scaled_dot_product_attention``
    (what the WebUI's ``--opt-sdp-attention`` does class-wide). For tests and benchmarks of models built
    outside the WebUI; in the WebUI the host's own optimisation is in place already."""
    return override_attention(unet, _sdpa_forward)
