"""One call that assembles a `CloraDenoiser` from prompts, concepts and LoRAs (for hosts and scripts)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .denoiser import CloraDenoiser
from .options import CloraOptions
from .regional import RegionalDenoiser
from .routing import UNET_PREFIX, Branch, RoutedLoras, te_branch_conds, te_key
from .tokens import BranchPrompts, Concept, TokenPositions, branch_prompts, region_prompts


def build_clora_denoiser(
    inner_model: Callable[..., Any],
    unet: nn.Module,
    encode: Callable[[list[str]], Any],
    token_positions: TokenPositions,
    base_prompt: str,
    concepts: Sequence[Concept],
    concept_loras: Sequence[Branch],
    negative_prompt: str = "",
    style: Branch = (),
    options: CloraOptions | None = None,
    te_model: nn.Module | None = None,
    batch_size: int = 1,
    unet_prefix: str = UNET_PREFIX,
    mode: str = "insert",
    capture_layers: Sequence[str] | None = None,
    layout: torch.Tensor | None = None,
    routed: bool = False,
    region_prompt: str = "concept",
) -> tuple[CloraDenoiser | RegionalDenoiser, BranchPrompts]:
    """Branch 0 = ``base_prompt`` without concept LoRA; branch k = concept k's prompt with
    ``concept_loras[k-1]`` (a list of ``(lora, weight)``); ``style`` LoRAs are active in every branch.

    ``encode(prompts)`` is the host's prompt encoder (``get_learned_conditioning``); with ``te_model``
    (the module the text-encoder keys resolve in, e.g. the whole model object) each branch's prompt and
    negative prompt are encoded with that branch's text-encoder LoRAs active, else text-encoder keys
    are ignored. ``unet`` is the UNet module; UNet keys are resolved below ``unet_prefix``.

    ``layout``: a user layout ``[1, K, h, w]`` (`lib_loraclr.clora.layout.layout_weights`) instead of the
    automatic masks; ``routed``: return a `RegionalDenoiser` (one UNet pass per step, each LoRA in its
    region) around the branch-fusion denoiser, which then only finds the layout when none is given;
    ``options.region_crops`` sets its region crops (measured with a user layout and each region's own short
    prompt; a crop given the whole branch prompt tries to draw the whole scene in the crop).
    ``region_prompt`` (routed only): ``"concept"`` = branch k reads concept k's own phrase (`region_prompts`,
    as the WebUI's default), ``"scene"`` = the whole branch prompt.
    """
    if region_prompt not in ("concept", "scene"):
        raise ValueError(f"region_prompt must be 'concept' or 'scene', got {region_prompt!r}")
    if len(concept_loras) != len(concepts):
        raise ValueError(f"{len(concept_loras)} LoRA lists for {len(concepts)} concepts")
    bp = branch_prompts(base_prompt, concepts, token_positions, mode=mode)
    if routed and region_prompt == "concept":
        bp = region_prompts(bp, token_positions, mode=mode)
    branches = [list(style)] + [list(loras) + list(style) for loras in concept_loras]
    router = RoutedLoras(unet, branches, prefix=unet_prefix)
    te_router = RoutedLoras(te_model, branches, key_filter=te_key) if te_model is not None else None
    if te_router is not None and te_router.n_modules == 0:
        te_router = None
    conds = te_branch_conds(encode, [[p] * batch_size for p in bp.prompts], te_router)
    unconds = te_branch_conds(encode, [[negative_prompt] * batch_size for _ in bp.prompts], te_router)
    den = CloraDenoiser(
        inner_model,
        unet,
        conds,
        bp.groups,
        bp.mask_tokens,
        options,
        unconds=unconds,
        router=router,
        capture_layers=capture_layers,
        background_tokens=bp.background_tokens,
        layout=None if routed else layout,
    )
    if routed:
        return RegionalDenoiser(
            inner_model,
            unet,
            conds,
            unconds,
            router,
            layout=layout,
            estimator=None if layout is not None else den,
            crops=den.options.region_crops,
            options=den.options,
        ), bp
    return den, bp
