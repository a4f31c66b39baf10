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
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from torch import nn


def sd1_unet_kwargs(cfg: Any) -> dict[str, Any]:
    """``IntegratedUNet2DConditionModel`` arguments for an SD1-layout UNet described by ``cfg``
    (`lib_loraclr.models.sd.UNetConfig`: sizes read from the checkpoint's shapes).

    Forge describes attention per res block (``transformer_depth``: one entry per input res block,
    ``transformer_depth_output``: one per output block, popped from the end) instead of ldm's
    ``attention_resolutions`` (level ``i`` has attention when ``2**i`` is listed)."""
    levels = len(cfg.channel_mult)
    depth = [cfg.transformer_depth if 2**i in cfg.attention_resolutions else 0 for i in range(levels)]
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "model_channels": cfg.model_channels,
        "num_res_blocks": [cfg.num_res_blocks] * levels,
        "channel_mult": list(cfg.channel_mult),
        "num_heads": cfg.num_heads,
        "num_head_channels": cfg.num_head_channels,
        "use_spatial_transformer": True,
        "context_dim": cfg.context_dim,
        "use_linear_in_transformer": cfg.use_linear_in_transformer,
        "transformer_depth": [d for d in depth for _ in range(cfg.num_res_blocks)],
        "transformer_depth_middle": cfg.transformer_depth,
        "transformer_depth_output": [d for d in depth for _ in range(cfg.num_res_blocks + 1)],
        "adm_in_channels": None,
        "use_checkpoint": False,
    }


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
    """``factory(UNetConfig) -> nn.Module`` building Forge's SD1 UNet (None outside Forge)."""
    cls = unet_class or forge_unet_class()
    if cls is None:
        return None

    def factory(cfg: Any) -> nn.Module:
        return cls(**sd1_unet_kwargs(cfg))

    factory.unet_class = cls  # type: ignore[attr-defined]  (for messages and tests)
    return factory


def merge_unet_factory() -> Callable[[Any], nn.Module] | None:
    """The UNet factory the merge should pass to ``load_base`` on this host (see the module docstring)."""
    if importlib.util.find_spec("ldm") is not None:
        return None
    return forge_unet_factory()
