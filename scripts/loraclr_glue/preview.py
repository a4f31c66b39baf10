"""The merge tab's preview (`lib_loraclr.merge.preview`), made by the WebUI's own txt2img: one
``StableDiffusionProcessingTxt2Img`` job (``n_iter`` = one image per prompt, the same seed for all) through
``processing.process_images`` (A1111 1.8–1.10 and Forge alike); nothing is saved to the outputs folder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lib_loraclr.merge.preview import DEFAULT_SIZE, DEFAULT_STEPS, SAMPLER, PreviewSettings, preview_prompts

__all__ = ["DEFAULT_SIZE", "DEFAULT_STEPS", "PreviewSettings", "preview_prompts", "render"]


def render(
    processing: Any, shared: Any, prompts: Sequence[tuple[str, str]], settings: PreviewSettings
) -> list[tuple[Any, str]]:
    """Run the prompts through the WebUI's txt2img; ``[(image, caption)]`` for a gallery.

    ``processing`` / ``shared``: the WebUI's ``modules.processing`` / ``modules.shared``.
    """
    if not prompts:
        return []
    size = max(64, int(settings.size) // 64 * 64)
    cls = processing.StableDiffusionProcessingTxt2Img
    extra = {"scheduler": "Automatic"} if _accepts(cls, "scheduler") else {}  # A1111 ≥ 1.9, Forge
    p = cls(
        sd_model=shared.sd_model,
        outpath_samples=None,
        outpath_grids=None,
        prompt=[q for _, q in prompts],
        negative_prompt="",
        seed=[int(settings.seed)] * len(prompts),  # the same noise for every prompt: images comparable
        sampler_name=SAMPLER,
        batch_size=1,
        n_iter=len(prompts),
        steps=int(settings.steps),
        cfg_scale=float(settings.cfg_scale),
        width=size,
        height=size,
        do_not_save_samples=True,
        do_not_save_grid=True,
        **extra,
    )
    try:
        processed = processing.process_images(p)
    finally:
        close = getattr(p, "close", None)
        if callable(close):
            close()
    images = list(getattr(processed, "images", []) or [])[-len(prompts) :]
    return [(img, caption) for img, (caption, _) in zip(images, prompts)]


def _accepts(cls: Any, name: str) -> bool:
    """Whether ``cls(...)`` takes the keyword ``name`` (A1111's processing classes are dataclasses)."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(cls):
        return any(f.name == name and f.init for f in dataclasses.fields(cls))
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values())
