"""The merge tab's preview: a few images of the merged LoRA made with the WebUI's own txt2img.

One image per concept (``<lora:NAME:1> photo of TRIGGER``) and one with every concept in the same
prompt, generated in one ``modules.processing.StableDiffusionProcessingTxt2Img`` job (``n_iter`` = one
image per prompt, same seed for all) through ``processing.process_images``, as the WebUI's txt2img tab
does (A1111 1.8–1.10 and Forge share this API; Forge loads its model inside ``process_images``). Nothing
is saved to the outputs folder; the built-in Lora loads the new file by name like any other LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_SIZE = 256
DEFAULT_STEPS = 12
SAMPLER = "Euler"  # present in every supported host; deterministic (no ancestral noise)


@dataclass(frozen=True)
class PreviewSettings:
    enabled: bool = True
    size: int = DEFAULT_SIZE  # width = height, pixels (multiple of 64)
    steps: int = DEFAULT_STEPS
    seed: int = 0
    cfg_scale: float = 7.0


def preview_prompts(
    lora_name: str, triggers: Sequence[tuple[str, str]], weight: float = 1.0
) -> list[tuple[str, str]]:
    """``[(caption, prompt)]``: one per concept (``triggers`` = ``[(concept name, trigger words)]``) and, for
    two or more concepts, one with all of them (caption ``"all concepts"``)."""
    tag = f"<lora:{lora_name}:{weight:g}>"
    out = [(name, f"{tag} photo of {trigger}") for name, trigger in triggers]
    if len(triggers) > 1:
        out.append(("all concepts", f"{tag} photo of " + " and ".join(t for _, t in triggers)))
    return out


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
