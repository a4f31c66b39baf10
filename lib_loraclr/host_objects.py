"""The parts of a WebUI's loaded model that CLoRA needs, found by capability (attributes present), never
by version strings and without importing the WebUI: the objects are passed in.

Forge (and its forks reForge / Classic / Neo) is recognised by a ``forge_objects`` attribute on the model
whose ``unet`` patcher offers `FORGE_UNET_METHODS`; everything else is treated as A1111. ``git_tag()``
sniffing breaks on forks and zip installs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lib_loraclr.arch import unsupported_network
from lib_loraclr.clora import BranchPrompts, CloraError, Concept, branch_prompts
from lib_loraclr.clora.tokens import region_prompts, token_positions_from
from lib_loraclr.keymap import FORGE_TEXT_ENCODERS, te_hf_module_path

FORGE_UNET_METHODS = ("set_model_attn2_replace", "set_model_unet_function_wrapper", "clone")

#: ``(text encoder module, canonical key prefix[, path_of])``, see `te_roots`
TeRoot = tuple[Any, str] | tuple[Any, str, Callable[[str], str | None]]


def forge_unet(sd_model: Any) -> Any | None:
    """The Forge ``UnetPatcher`` of a model object, or None when the model is not a Forge model."""
    objs = getattr(sd_model, "forge_objects", None)
    unet = getattr(objs, "unet", None) if objs is not None else None
    if unet is None:
        return None
    if all(callable(getattr(unet, m, None)) for m in FORGE_UNET_METHODS):
        return unet
    return None


def is_forge(p_or_model: Any) -> bool:
    """True for a Forge processing object or model (see the module docstring)."""
    return forge_unet(getattr(p_or_model, "sd_model", p_or_model)) is not None


def diffusion_model(sd_model: Any) -> Any | None:
    """The denoising network of a loaded model: Forge's ``forge_objects.unet.model.diffusion_model`` or
    A1111's ``model.diffusion_model``; None when neither is there."""
    unet = forge_unet(sd_model)
    holder = getattr(unet, "model", None) if unet is not None else getattr(sd_model, "model", None)
    return getattr(holder, "diffusion_model", None)


def unsupported_model(sd_model: Any) -> str | None:
    """Why CLoRA cannot serve this model (`lib_loraclr.arch.unsupported_network`), or None."""
    return unsupported_network(diffusion_model(sd_model))


def host_tokenize_line(sd_model: Any) -> Callable[[str], tuple[Sequence[Any], int]]:
    """The first text encoder's ``tokenize_line``: Forge ``text_processing_engine`` (``_l`` for SDXL),
    A1111 ``cond_stage_model`` (SD1/SD2) or ``conditioner.embedders[0]`` (SDXL)."""
    embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", None) or [None]
    for name in ("text_processing_engine", "text_processing_engine_l", "cond_stage_model"):
        fn = getattr(getattr(sd_model, name, None), "tokenize_line", None)
        if callable(fn):
            return fn
    fn = getattr(embedders[0], "tokenize_line", None)
    if callable(fn):
        return fn
    raise CloraError("this model has no tokenize_line (unsupported model type for CLoRA)")


def concept_prompts(
    sd_model: Any, base: str, specs: Sequence[Any], *, short_regions: bool = False
) -> BranchPrompts:
    """`branch_prompts` of the base prompt and the bound concepts, with the host's tokenizer;
    ``short_regions``: branch k reads concept k's own phrase (`region_prompts`, the routed mode's default)."""
    concepts = [Concept(s.trigger, s.words) for s in specs]
    positions = token_positions_from(host_tokenize_line(sd_model))
    bp = branch_prompts(base, concepts, positions)
    return region_prompts(bp, positions) if short_regions else bp


def _forge_te_roots(sd_model: Any) -> list[TeRoot]:
    root = getattr(getattr(sd_model.forge_objects, "clip", None), "cond_stage_model", None)
    if root is None:
        return []
    family = (
        "sdxl"
        if getattr(sd_model, "is_sdxl", False)
        else "sd2"
        if getattr(sd_model, "is_sd2", False)
        else "sd1"
    )
    roots: list[TeRoot] = []
    for name, prefix in FORGE_TEXT_ENCODERS[family]:
        m = getattr(getattr(root, name, None), "transformer", None)
        if m is not None and hasattr(m, "text_model"):
            roots.append((m, prefix, te_hf_module_path))
    if roots:
        return roots
    for _name, m in root.named_modules():  # another layout: the first transformers text model
        if hasattr(m, "text_model"):
            return [(m, FORGE_TEXT_ENCODERS[family][0][1], te_hf_module_path)]
    return []


def te_roots(sd_model: Any) -> list[TeRoot]:
    """``(module, canonical prefix[, path_of])`` of each text encoder whose keys our LoRAs use.

    A1111 wraps the encoders (``.wrapped``): SD1/SD2 ``cond_stage_model.wrapped`` ↔ ``cond_stage_model.``;
    SDXL ``conditioner.embedders[i].wrapped`` ↔ ``conditioner.embedders.i.``. Forge: every transformers-named
    text model under ``forge_objects.clip.cond_stage_model`` (SDXL: ``clip_l`` and ``clip_g``) with
    `te_hf_module_path`, which maps OpenCLIP keys (``…attn.in_proj:q``) to Forge's separate q/k/v Linears.
    """
    if forge_unet(sd_model) is not None:
        return _forge_te_roots(sd_model)
    embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", None)
    if embedders is not None:
        return [(getattr(e, "wrapped", e), f"conditioner.embedders.{i}.") for i, e in enumerate(embedders)]
    cm = getattr(sd_model, "cond_stage_model", None)
    return [(getattr(cm, "wrapped", cm), "cond_stage_model.")] if cm is not None else []


def latent_hw(p: Any) -> tuple[int, int]:
    """The latent's ``(height, width)`` of a processing object (pixels / 8)."""
    return int(getattr(p, "height", 512)) // 8, int(getattr(p, "width", 512)) // 8
