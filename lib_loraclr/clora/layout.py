"""User layouts: where each concept goes, in the forms WebUI users know.

- ratio strings as Regional Prompter writes them: ``"1,1"`` = two equal columns, ``"1,2,1"`` = three
  columns 1:2:1; with ``;`` the string lists rows, each ``height, col, col, …`` (a row with only its
  height is one full-width cell): ``"1,1,1;1"`` = two columns on top, one cell below (equal heights).
  With ``rows=True`` the roles swap (``"1,1"`` = two rows);
- boxes: ``(x0, y0, x1, y1)`` as fractions of the image width and height (0…1);
- a colour mask image: every distinct non-black colour is a region.

Regions are ordered row-major (top to bottom, left to right; colour regions by their centroid) and
bound to the concepts in prompt order: region r → concept r. `layout_weights` turns them into the
``[B, K, h, w]`` 0/1 masks the CLoRA step uses (column 0 = background, i.e. no concept).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from .errors import CloraError

Box = tuple[float, float, float, float]


class LayoutError(CloraError):
    """A layout string, box list or mask image that cannot be read."""


_RATIO = re.compile(r"^\s*\d+(\.\d+)?\s*$")


def _ratios(parts: Sequence[str], spec: str) -> list[float]:
    vals = []
    for p in parts:
        if not _RATIO.match(p):
            raise LayoutError(
                f"layout {spec!r}: {p.strip()!r} is not a positive number (e.g. '1,1' or '1,2;1')"
            )
        v = float(p)
        if v <= 0:
            raise LayoutError(f"layout {spec!r}: ratios must be > 0")
        vals.append(v)
    return vals


def _cuts(ratios: Sequence[float]) -> list[tuple[float, float]]:
    total = sum(ratios)
    out, acc = [], 0.0
    for r in ratios:
        out.append((acc / total, (acc + r) / total))
        acc += r
    out[-1] = (out[-1][0], 1.0)
    return out


def parse_ratio_layout(spec: str, rows: bool = False) -> list[Box]:
    """Boxes of a Regional-Prompter ratio string (see the module docstring), row-major."""
    spec = (spec or "").strip()
    if not spec:
        raise LayoutError("empty layout: give ratios such as '1,1' (two columns)")
    if ";" not in spec:
        cells = _cuts(_ratios(spec.split(","), spec))
        boxes = [(a, 0.0, b, 1.0) for a, b in cells]
    else:
        row_specs = [r.split(",") for r in spec.split(";")]
        heights = _ratios([r[0] for r in row_specs], spec)
        boxes = []
        for (y0, y1), r in zip(_cuts(heights), row_specs):
            cols = _ratios(r[1:], spec) if len(r) > 1 else [1.0]
            boxes += [(a, y0, b, y1) for a, b in _cuts(cols)]
    if rows:
        boxes = [(y0, x0, y1, x1) for x0, y0, x1, y1 in boxes]
        boxes.sort(key=lambda b: (b[1], b[0]))
    return boxes


def check_boxes(boxes: Sequence[Sequence[float]]) -> list[Box]:
    """Validate ``(x0, y0, x1, y1)`` fractions: 0 ≤ x0 < x1 ≤ 1, 0 ≤ y0 < y1 ≤ 1."""
    out = []
    for i, b in enumerate(boxes):
        if len(b) != 4:
            raise LayoutError(f"box {i + 1} has {len(b)} numbers; give x0, y0, x1, y1 as fractions 0…1")
        x0, y0, x1, y1 = (float(v) for v in b)
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise LayoutError(f"box {i + 1} {tuple(b)} must satisfy 0 ≤ x0 < x1 ≤ 1 and 0 ≤ y0 < y1 ≤ 1")
        out.append((x0, y0, x1, y1))
    return out


def box_masks(boxes: Sequence[Box], hw: tuple[int, int]) -> torch.Tensor:
    """``[R, h, w]`` 0/1: a cell belongs to a box when its centre lies inside (later boxes win overlaps
    only where the earlier ones do not cover; every cell at most one region)."""
    h, w = hw
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    taken = torch.zeros(h, w, dtype=torch.bool)
    out = torch.zeros(len(boxes), h, w)
    for r, (x0, y0, x1, y1) in enumerate(boxes):
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        inside &= ~taken
        out[r] = inside.float()
        taken |= inside
    return out


def color_regions(image: torch.Tensor, min_share: float = 0.002) -> torch.Tensor:
    """Regions of a colour mask ``[H, W, 3]`` (uint8 or 0…1): ``[R, H, W]`` 0/1, one per distinct
    non-black colour covering at least ``min_share`` of the image, ordered by centroid (row-major)."""
    if image.dim() != 3 or image.shape[-1] < 3:
        raise LayoutError(f"a colour mask must be an H×W×3 image, got shape {tuple(image.shape)}")
    img = image[..., :3]
    if img.dtype.is_floating_point:
        img = (img.clamp(0, 1) * 255).round()
    img = img.to(torch.int64)
    codes = img[..., 0] * 65536 + img[..., 1] * 256 + img[..., 2]
    h, w = codes.shape
    regions = []
    for c in codes.unique().tolist():
        if c == 0:
            continue
        m = codes == c
        if m.float().mean() < min_share:
            continue
        yy, xx = torch.nonzero(m, as_tuple=True)
        cy, cx = float(yy.float().mean()) / h, float(xx.float().mean()) / w
        regions.append((round(cy * 4), cx, m.float()))  # rows of quarter height, then left to right
    if not regions:
        raise LayoutError("the colour mask has no coloured region (black is background)")
    regions.sort(key=lambda t: (t[0], t[1]))
    return torch.stack([m for _, _, m in regions])


def resize_regions(regions: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``[R, H, W]`` 0/1 → ``[R, h, w]`` 0/1 by nearest sampling (a cell keeps at most one region)."""
    import torch.nn.functional as F

    if tuple(regions.shape[-2:]) == tuple(hw):
        return regions.float()
    return F.interpolate(regions[None].float(), size=tuple(hw), mode="nearest")[0]


def layout_weights(
    regions: torch.Tensor, n_concepts: int, batch: int = 1, assign: Sequence[int] | None = None
) -> torch.Tensor:
    """``[B, K, h, w]`` masks with ``K = 1 + n_concepts``: column g+1 = region ``assign[g]`` (default:
    region g → concept g, in prompt order), column 0 = cells in no assigned region (background, the
    base branch)."""
    assign = list(range(n_concepts)) if assign is None else [int(a) for a in assign]
    if len(assign) != n_concepts:
        raise LayoutError(f"{len(assign)} region numbers for {n_concepts} concepts")
    bad = [a + 1 for a in assign if not 0 <= a < regions.shape[0]]
    if bad:
        raise LayoutError(f"the layout has {regions.shape[0]} regions; region {bad[0]} does not exist")
    if len(set(assign)) != len(assign):
        raise LayoutError("two concepts are bound to the same region; give each concept its own region")
    r = regions[assign].float()
    bg = (r.sum(0, keepdim=True) == 0).float()
    return torch.cat([bg, r], 0)[None].expand(batch, -1, -1, -1).contiguous()


def columns(n: int) -> str:
    """The ratio string of ``n`` equal columns (``"1,1"`` for two): what a user types for a row of
    subjects."""
    return ",".join(["1"] * n)


def user_layout(spec: str, n_concepts: int, latent_hw: tuple[int, int]) -> torch.Tensor | None:
    """The user's ratio-string layout (``"1,1"``) as ``[1, K, h, w]`` masks at the latent size, region r → the
    r-th concept of the prompt; None for an empty string (automatic masks) or no concept."""
    if not spec or n_concepts < 1:
        return None
    return layout_weights(box_masks(parse_ratio_layout(spec), latent_hw), n_concepts)
