"""Which host runs us, decided by capability (attributes present), never by version strings.

Forge (and its forks reForge / Classic / Neo) is recognised by a ``forge_objects`` attribute on the
model whose ``unet`` patcher offers ``set_model_attn2_replace`` and ``set_model_unet_function_wrapper``;
everything else is treated as A1111. ``git_tag()`` sniffing breaks on forks and zip installs.
"""

from __future__ import annotations

from typing import Any

from lib_loraclr.arch import unsupported_network

FORGE_UNET_METHODS = ("set_model_attn2_replace", "set_model_unet_function_wrapper", "clone")


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
    model = getattr(p_or_model, "sd_model", p_or_model)
    return forge_unet(model) is not None


def diffusion_model(sd_model: Any) -> Any | None:
    """The denoising network of a loaded model: Forge's ``forge_objects.unet.model.diffusion_model`` or
    A1111's ``model.diffusion_model``; None when neither is there."""
    unet = forge_unet(sd_model)
    holder = getattr(unet, "model", None) if unet is not None else getattr(sd_model, "model", None)
    return getattr(holder, "diffusion_model", None)


def unsupported_model(sd_model: Any) -> str | None:
    """Why CLoRA cannot serve this model (`lib_loraclr.arch.unsupported_network`), or None."""
    return unsupported_network(diffusion_model(sd_model))


def script_has_hook(script_base: type, name: str) -> bool:
    """Whether the WebUI's ``scripts.Script`` defines a hook (``process_before_every_sampling``: A1111 ≥ 1.10, Forge)."""
    return callable(getattr(script_base, name, None))
