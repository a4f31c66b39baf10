"""One CLoRA step inside a host's own model call: the piece both WebUI adapters share.

A host (A1111's ``CFGDenoiser``, Forge's sampling function) batches its rows itself — every image's cond
rows (one per ``AND`` part), then the uncond rows — pads or splits them, and calls its model (the
k-diffusion wrapper) once or several times per sampler step. `clora_call` replaces one such call: it is
told the role of each row, ``(COND, image)``, ``(UNCOND, image)`` or ``(OTHER, image)``, runs the CLoRA
engine (`CloraDenoiser` / `RegionalDenoiser` ``.predict``) on the rows of the CFG halves that hold every
image once, and returns the host's tensor with those rows replaced by the mask-fused prediction; OTHER
rows (further ``AND`` parts, or a half split over several calls) go to the host's model unchanged.
Guidance, masks for inpainting, callbacks and previews stay the host's.

Branch conditionings follow the host's own: branch 0 is the call's cond rows; branch k ≥ 1 is the same
conditioning with the text part replaced by ``branch_text[k-1]`` (`replace_text`: SD1 ``c_crossattn``,
SDXL ``crossattn`` + ``vector``; image conditioning kept). Every branch uses the call's uncond rows.

The step counter, the latent update (on the call with the cond half; ``engine.x_new``, ``updated_now``)
and the masks (from the cond half; a later uncond-only call of the same σ reuses them and runs at the
updated latent) live in the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .conds import replace_text, select_rows
from .denoiser import COND, UNCOND

OTHER = -1


def clora_call(
    engine: Any,
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: Any,
    rows: Sequence[tuple[int, int]],
    branch_text: Sequence[Any] | None = None,
) -> torch.Tensor:
    """The host's model output ``[N, C, H, W]`` for its rows ``x`` with CLoRA's prediction on the CFG halves.

    Args:
        engine: a `CloraDenoiser` or `RegionalDenoiser` (its ``inner_model`` is the host's model call).
        model: ``model(x, sigma, cond)`` — the host's call for OTHER rows.
        x, sigma, cond: the host's call (``cond`` batched like ``x``: tensor, dict or list entries).
        rows: per row of ``x``, ``(half, image)`` with half `COND`, `UNCOND` or `OTHER` (`CfgStep.take`,
            `chunk_roles`). The engine's UNet calls batch the halves in the order of their rows here.
        branch_text: per branch k ≥ 1, its text conditioning at this step (``[1|B, T, D]`` or an SDXL
            dict); None keeps ``engine.conds`` as they are.
    """
    n = int(x.shape[0])
    if len(rows) != n:
        raise ValueError(f"{len(rows)} row roles for {n} rows")
    where: dict[int, dict[int, int]] = {}
    for r, (half, image) in enumerate(rows):
        if half in (COND, UNCOND):
            where.setdefault(half, {}).setdefault(image, r)
    b = max((max(m) + 1 for m in where.values()), default=0)
    halves = sorted(
        (
            h
            for h in (COND, UNCOND)
            if h in where and sorted(where[h]) == list(range(b)) and sum(1 for q in rows if q[0] == h) == b
        ),
        key=lambda h: min(where[h].values()),  # the host's order (Forge batches the uncond chunk first)
    )
    index = {h: [where[h][i] for i in range(b)] for h in halves}
    taken = {r for h in halves for r in index[h]}
    other = [r for r in range(n) if r not in taken]
    out: torch.Tensor | None = None
    if halves:
        first = index[halves[0]]
        xh, sh = x[first], sigma[first]
        conds = {h: select_rows(cond, index[h], n) for h in halves}
        if branch_text is not None and COND in conds:
            engine.conds = [None] + [replace_text(conds[COND], t) for t in branch_text]
        fused = engine.predict(xh, sh, conds.get(COND), conds.get(UNCOND), tuple(halves))
        out = x.new_empty((n, *fused[halves[0]].shape[1:]))
        for h in halves:
            out[index[h]] = fused[h].to(out.dtype)
    if other:
        plain = model(x[other], sigma[other], select_rows(cond, other, n))
        if out is None:
            out = x.new_empty((n, *plain.shape[1:]))
        out[other] = plain.to(out.dtype)
    assert out is not None
    return out


def chunk_roles(cond_or_uncond: Sequence[int], b: int) -> list[tuple[int, int]]:
    """Row roles of a call made of chunks of ``b`` rows, one role per chunk (Forge's and ComfyUI's
    ``cond_or_uncond``: 0 = cond, 1 = uncond): the first chunk of each half is that half's rows, further
    chunks of a half (more conds, e.g. ``AND`` parts) are `OTHER` (the host's plain call)."""
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for role in map(int, cond_or_uncond):
        half = role if role in (COND, UNCOND) and role not in seen else OTHER
        seen.add(role)
        out += [(half, i) for i in range(b)]
    return out


class CfgStep:
    """What a host's CFG denoiser is doing in the call in progress: the sampler's ``x`` (where a latent
    update is written), the prompt schedules' step, and the roles of the rows of the batch it builds —
    per image one cond row per ``AND`` part (``repeats[i]`` parts for image i), then one uncond row per
    image (A1111 1.10's ``CFGDenoiser.forward``). Its model calls consume the rows in order (`take`);
    ``x_new`` is the latent update made during the step (written into ``x`` by the host adapter)."""

    def __init__(self, x: torch.Tensor, step: int, repeats: Sequence[int]) -> None:
        self.x = x
        self.step = step
        self.roles: list[tuple[int, int]] = []
        for i, n in enumerate(repeats):
            self.roles += [(COND, i)] + [(OTHER, i)] * (n - 1)  # CLoRA fuses each image's first AND part
        self.roles += [(UNCOND, i) for i in range(len(repeats))]
        self.offset = 0
        self.x_new: torch.Tensor | None = None

    def take(self, n: int) -> list[tuple[int, int]] | None:
        """Roles of the next ``n`` rows; None when the calls do not add up to the batch."""
        a, self.offset = self.offset, self.offset + n
        return self.roles[a : self.offset] if self.offset <= len(self.roles) else None


__all__ = ["OTHER", "CfgStep", "chunk_roles", "clora_call"]
