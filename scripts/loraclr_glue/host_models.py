"""The merge's base model on hosts without ``ldm``: a UNet factory built from the host's own classes.

The merge rebuilds the base model from the checkpoint FILE (`lib_loraclr.base_model.load_base`). By default
that UNet is ldm's ``UNetModel``, which A1111 ships and Forge does not. Forge's own SD1 UNet,
``backend.nn.unet.IntegratedUNet2DConditionModel``, has the same module names (``input_blocks`` /
``middle_block`` / ``output_blocks`` / ``out``; ``attn1``/``attn2`` with plain ``nn.Linear`` ``to_q``/``to_k``/
``to_v``/``to_out.0``; ``ff.net.0.proj``/``ff.net.2``; 1×1 ``proj_in``/``proj_out``) and the same call
``forward(x, timesteps, context)``, so it can stand in. Built outside Forge's ``using_forge_operations``
its layers are ordinary torch modules (the merge's hooks see ``nn.Linear``/``nn.Conv2d``).

The choice is by capability: ldm importable → None (load_base's default); else Forge's class importable →
`forge_unet_factory`; else None (load_base then fails with a clear message, see `lib_loraclr.folder_merge.load_base_model`).

The base model's CLIP tokenizer (`lib_loraclr.models.tokenizer.clip_tokenizer`) is generated from
open_clip_torch's vocabulary file, which Forge Neo does not install; Forge ships the same tokenizer's
files for its SD1 loader, and `seed_clip_tokenizer` fills the library's cache from them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lib_loraclr.models import tokenizer
from lib_loraclr.models.sd import integrated_unet_kwargs


def forge_unet_class() -> type[nn.Module] | None:
    """Forge's ``IntegratedUNet2DConditionModel``, or None outside Forge."""
    if importlib.util.find_spec("backend") is None:
        return None
    try:
        from backend.nn.unet import IntegratedUNet2DConditionModel
    except ImportError:
        return None
    return IntegratedUNet2DConditionModel


def forge_unet_factory(unet_class: type[nn.Module] | None = None) -> Callable[[Any], nn.Module] | None:
    """``factory(UNetConfig | SDXLUNetSpec) -> nn.Module`` building Forge's SD1 or SDXL UNet (None outside
    Forge); `integrated_unet_kwargs` gives Forge's arguments for either (for SDXL base: 1680 tensors with the
    checkpoint's names and shapes, the same ε as the library's own SDXL UNet)."""
    cls = unet_class or forge_unet_class()
    if cls is None:
        return None

    def factory(cfg: Any) -> nn.Module:
        return cls(**integrated_unet_kwargs(cfg))

    factory.unet_class = cls  # type: ignore[attr-defined]  (for messages and tests)
    return factory


def merge_unet_factory() -> Callable[[Any], nn.Module] | None:
    """The UNet factory the merge should pass to ``load_base`` on this host (see the module docstring)."""
    if importlib.util.find_spec("ldm") is not None:
        return None
    return forge_unet_factory()


#: the SD1 CLIP tokenizer's folder in Forge's ``backend`` package (Forge main and Neo ship it)
FORGE_SD1_TOKENIZER = ("huggingface", "runwayml", "stable-diffusion-v1-5", "tokenizer")


def forge_tokenizer_folder() -> Path | None:
    """Forge's SD1 tokenizer folder (`FORGE_SD1_TOKENIZER` under ``backend``), or None outside Forge."""
    spec = importlib.util.find_spec("backend")
    for root in list(getattr(spec, "submodule_search_locations", None) or []) if spec is not None else []:
        folder = Path(root).joinpath(*FORGE_SD1_TOKENIZER)
        if folder.is_dir():
            return folder
    return None


def seed_clip_tokenizer() -> Path | None:
    """The merge's CLIP tokenizer without open_clip_torch (Forge Neo): `lib_loraclr.models.tokenizer.
    seed_clip_tokenizer` from Forge's own files."""
    return tokenizer.seed_clip_tokenizer(forge_tokenizer_folder())
