"""Fusion masks from attention maps: the official CLoRA rule (made exact) and the layout rule.

`layout_masks` (the default): the concepts compete for every position (normalised maps compared,
background below a floor). `concept_masks` (the paper's rule, kept as an option): for each LoRA
branch k ≥ 1, its own concept-token maps (on branch k's attention) thresholded at ``A > α·max(A)`` per token, union over the tokens; optional 3×3 dilation / erosion (max-pool based);
branch 0 (no LoRA) takes every position no LoRA mask covers; nearest-upsampled to the latent size;
overlaps averaged, so the weights of the branches sum to 1 at every latent pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .options import CloraOptions


def _dilate(m: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        m = F.max_pool2d(m, 3, stride=1, padding=1)
    return m


def _erode(m: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        m = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return m


def concept_masks(
    maps: torch.Tensor,
    mask_tokens: Sequence[Sequence[int]],
    hw: tuple[int, int],
    threshold: float = 0.3,
    dilate: int = 0,
    erode: int = 0,
) -> torch.Tensor:
    """Binary masks ``[B, K, h, w]`` (float 0/1) at map resolution; column 0 = background (branch 0).

    ``maps``: ``[B, K, N, T]`` (N = h·w); ``mask_tokens[k]``: token positions of branch k's concept
    (empty for branch 0). ``dilate``/``erode``: number of 3×3 max-pool passes (dilation first).
    """
    b, k, n, _ = maps.shape
    h, w = hw
    if h * w != n:
        raise ValueError(f"maps have {n} positions, not {h}×{w}")
    out = torch.zeros(b, k, h, w, dtype=torch.float32, device=maps.device)
    for br in range(1, k):
        tokens = list(mask_tokens[br]) if br < len(mask_tokens) else []
        if not tokens:
            continue
        a = maps[:, br][:, :, tokens].detach().float()  # [B, N, nt]
        thr = threshold * a.amax(dim=1, keepdim=True)
        m = (a > thr).any(dim=2).float().reshape(b, 1, h, w)
        if dilate:
            m = _dilate(m, dilate)
        if erode:
            m = _erode(m, erode)
        out[:, br] = m[:, 0]
    out[:, 0] = (out[:, 1:].sum(dim=1) == 0).float() if k > 1 else 1.0
    return out


def fusion_weights(masks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Nearest-upsample ``[B, K, h, w]`` masks to the latent size and average overlaps →
    ``[B, K, 1, H, W]`` weights summing to 1 at every pixel (a pixel with no mask goes to branch 0)."""
    m = F.interpolate(masks, size=tuple(latent_hw), mode="nearest")
    none = m.sum(dim=1, keepdim=True) == 0
    if bool(none.any()):
        m = m.clone()
        m[:, :1] = torch.where(none, torch.ones_like(m[:, :1]), m[:, :1])
    return (m / m.sum(dim=1, keepdim=True)).unsqueeze(2)


def fuse(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k weights[:, k]·outputs[:, k]: ``outputs`` ``[B, K, C, H, W]``, ``weights`` ``[B, K, 1, H, W]``.
    With one branch (weight exactly 1) this returns ``outputs[:, 0]`` bit for bit."""
    if outputs.shape[1] == 1:
        return outputs[:, 0]
    return (outputs * weights.to(outputs.dtype)).sum(dim=1)


def _minmax(a: torch.Tensor) -> torch.Tensor:
    lo, hi = a.amin(dim=-1, keepdim=True), a.amax(dim=-1, keepdim=True)
    return (a - lo) / (hi - lo).clamp_min(1e-12)


MASK_SOURCES = ("base", "own", "both")


def concept_scores(
    maps: torch.Tensor, groups: Sequence[Sequence[Sequence[int]]], source: str = "base"
) -> torch.Tensor:
    """``[B, K, N]``: per concept branch k = g+1, the min–max-normalised map of concept g's tokens (mean
    over its tokens); column 0 is 0.

    ``maps`` ``[B, K, N, T]``; ``groups[g][b]`` = concept g's token positions in branch b's prompt.
    ``source``: ``"base"`` = read concept g's words in branch 0 (no LoRA: the base model's own
    attention, which localises best, see docs/DESIGN.md), ``"own"`` = its trigger and words in its own
    LoRA branch (the paper), ``"both"`` = the mean of the two. A concept without tokens in branch 0
    falls back to its own branch."""
    if source not in MASK_SOURCES:
        raise ValueError(f"mask source must be one of {MASK_SOURCES}, got {source!r}")
    b, k, n, _ = maps.shape
    out = torch.zeros(b, k, n, dtype=torch.float32, device=maps.device)
    m = maps.detach().float()
    for g, by_branch in enumerate(groups):
        br = g + 1
        if br >= k:
            break
        own = list(by_branch[br]) if br < len(by_branch) else []
        base = list(by_branch[0]) if by_branch else []
        parts = []
        if source in ("base", "both") and base:
            parts.append(_minmax(m[:, 0][:, :, base].mean(dim=2)))
        if (source in ("own", "both") or not parts) and own:
            parts.append(_minmax(m[:, br][:, :, own].mean(dim=2)))
        if parts:
            out[:, br] = sum(parts) / len(parts)
    return out


def layout_masks(
    maps: torch.Tensor,
    groups: Sequence[Sequence[Sequence[int]]],
    hw: tuple[int, int],
    background: float = 0.0,
    source: str = "base",
    background_tokens: Sequence[int] = (),
) -> torch.Tensor:
    """One-hot masks ``[B, K, h, w]`` (column 0 = background): each map position goes to the concept
    whose normalised token map (`concept_scores`) is highest there, or to the background (branch 0)
    when even that score is below ``background`` or below the best normalised map (in branch 0) of the
    prompt's other content words ``background_tokens`` (`lib_loraclr.clora.tokens.content_tokens`: "7"
    in "a sks and a 7", "park" in "a sks man in a park").

    Unlike the paper's rule (`concept_masks`: one threshold per concept, overlaps averaged) the concepts
    compete for each position, so two concepts never share one and a weak map still gets the positions
    where it is the strongest."""
    b, k, n, _ = maps.shape
    h, w = hw
    if h * w != n:
        raise ValueError(f"maps have {n} positions, not {h}×{w}")
    out = torch.zeros(b, k, n, dtype=torch.float32, device=maps.device)
    if k == 1 or not groups:
        out[:, 0] = 1.0
        return out.reshape(b, k, h, w)
    s = concept_scores(maps, groups, source)[:, 1:]
    best, idx = s.max(dim=1)  # [B, N]
    keep = best >= background
    if len(background_tokens):
        other = _minmax(
            maps.detach().float()[:, 0][:, :, list(background_tokens)].transpose(1, 2)
        )  # [B, t, N]
        keep &= best >= other.amax(dim=1)
    idx = torch.where(keep, idx + 1, torch.zeros_like(idx))
    out.scatter_(1, idx[:, None, :], 1.0)
    return out.reshape(b, k, h, w)


def slot_masks(batch: int, n_slots: int, concept_slots: Sequence[int], hw: tuple[int, int]) -> torch.Tensor:
    """``[B, K, h, w]`` truth of a row of ``n_slots`` equal columns: column g+1 = slot
    ``concept_slots[g]``, column 0 = the other slots (for diagnostics and the measuring world)."""
    from .layout import box_masks, columns, layout_weights, parse_ratio_layout

    regions = box_masks(parse_ratio_layout(columns(n_slots)), hw)
    return layout_weights(regions, len(concept_slots), batch, assign=concept_slots)


class MaskEstimator:
    """Fusion masks of one sampling run, by the options' rule; shared by every host's CLoRA step.

    - a user ``layout`` (``[B or 1, K, h, w]``, `lib_loraclr.clora.layout.layout_weights`) is used as is;
    - ``mask_rule="layout"``: the branch maps of the steps before ``layout_until`` are summed, each step's
      masks come from that sum (`layout_masks`), and the result is frozen at ``layout_until``;
    - ``mask_rule="paper"``: `concept_masks` of each step's own maps.

    ``options`` is a `CloraOptions`; ``groups`` / ``mask_tokens`` as in `branch_prompts`. Call `reset` at
    the start of a sampling run."""

    def __init__(
        self,
        options: CloraOptions,
        groups: Sequence[Sequence[Sequence[int]]],
        mask_tokens: Sequence[Sequence[int]],
        layout: torch.Tensor | None = None,
        background_tokens: Sequence[int] = (),
    ) -> None:
        self.options = options
        self.background_tokens = list(background_tokens)
        self.groups = [[list(t) for t in g] for g in groups]
        self.mask_tokens = [list(t) for t in mask_tokens]
        self.layout = layout
        self.reset()

    def reset(self) -> None:
        self._acc: torch.Tensor | None = None
        self.frozen: torch.Tensor | None = None

    def fixed(self, batch: int, device: torch.device | None = None) -> torch.Tensor | None:
        """The user layout or the frozen automatic one, ``[B, K, h, w]``; None while maps are needed."""
        if self.layout is not None:
            lay = self.layout.to(device=device, dtype=torch.float32)
            return lay.expand(batch, -1, -1, -1) if lay.shape[0] == 1 else lay
        return self.frozen

    def from_maps(self, maps: torch.Tensor, step: int, hw: tuple[int, int]) -> torch.Tensor:
        """Masks ``[B, K, h, w]`` from this step's branch maps ``[B, K, N, T]`` (``h·w = N``)."""
        o = self.options
        if o.mask_rule == "paper":
            return concept_masks(maps, self.mask_tokens, hw, o.mask_threshold, o.dilate, o.erode)
        acc = maps if self._acc is None or self._acc.shape != maps.shape else self._acc + maps
        self._acc = acc
        masks = layout_masks(acc, self.groups, hw, o.mask_background, o.mask_source, self.background_tokens)
        if o.dilate or o.erode:
            body = _erode(_dilate(masks[:, 1:], o.dilate), o.erode)
            masks = torch.cat([(body.sum(1, keepdim=True) == 0).float(), body], 1)
        if o.layout_until and step + 1 >= o.layout_until:
            self.frozen = masks
        return masks


PALETTE = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
]


def mask_image(weights: torch.Tensor, scale: int = 8) -> Any:
    """``[K, 1, H, W]`` fusion weights → a PIL RGB image (branch 0 black, concept k the k-th `PALETTE` colour,
    mixed by the weights), each cell ``scale`` × ``scale`` pixels: the WebUI's mask preview."""
    import numpy as np
    from PIL import Image

    w = weights.detach().float().cpu().numpy()[:, 0]  # [K, H, W]
    colors = np.array([PALETTE[k % len(PALETTE)] for k in range(w.shape[0])], dtype=np.float32)  # [K, 3]
    rgb = np.einsum("khw,kc->hwc", w, colors).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_mask_images(
    weights: torch.Tensor, folder: Path, seeds: Sequence[int], iteration: int = 0
) -> list[Path]:
    """Write each image's fusion weights (``[B, K, 1, H, W]``) as ``clora-mask-{seed}-{iteration}-{i}.png``
    in ``folder`` (created; ``seeds[i]``, else ``i``) and return the files."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(weights.shape[0]):
        seed = seeds[i] if i < len(seeds) else i
        path = folder / f"clora-mask-{seed}-{iteration}-{i}.png"
        mask_image(weights[i]).save(path)
        written.append(path)
    return written
