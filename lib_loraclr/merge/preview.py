"""What the merge's preview shows: one image per concept of a merged LoRA (``<lora:NAME:1> photo of
TRIGGER``) and one with every concept, and the small, fast settings it is made with. The WebUI renders
them with its own txt2img (``scripts/loraclr_glue/preview.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
