"""FULL SD1.5 / SD2 / SDXL module trees on the meta device: every real module name, no memory.

The trees carry the module paths of the WebUI's (A1111) model object that LoRAs target, i.e. the
checkpoint key prefixes:

- SD1.5: ``model.diffusion_model`` (ldm UNet, 320 ch, mult [1,2,4,4], heads 8, context 768) and
  ``cond_stage_model.transformer`` (transformers ``CLIPTextModel``, CLIP ViT-L/14: 12 layers, 768).
- SD2: ``model.diffusion_model`` (head channels 64, linear proj_in/out, context 1024) and
  ``cond_stage_model.model`` (OpenCLIP ViT-H/14 text tower: 24 layers, width 1024).
- SDXL: ``model.diffusion_model`` (sgm layout via `sdxl_unet`: 70 ``attn2``, ``label_emb.0.{0,2}``),
  ``conditioner.embedders.0.transformer`` (CLIP-L, transformers) and ``conditioner.embedders.1.model``
  (OpenCLIP ViT-bigG/14 text tower: 32 layers, width 1280), plus the three parameter-free size
  embedders ``conditioner.embedders.2..4``.

OpenCLIP towers: the real ``open_clip.model.CLIP`` with ``visual`` deleted (what the WebUI holds) when
``open_clip`` imports, else `openclip_text.OpenClipTextModel`, a replica with the same module tree
(``use_open_clip=False`` forces the replica). VAEs (``first_stage_model``) are not built: LoRAs do not
target them. Built under ``torch.device("meta")`` (torch ≥ 2.0): shapes are real, storage is none.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .openclip_text import OpenClipTextModel


class ModelTree(nn.Module):
    """A plain container whose attribute paths mirror the WebUI model object."""


def _holder(**children: nn.Module) -> nn.Module:
    m = ModelTree()
    for name, child in children.items():
        setattr(m, name, child)
    return m


def _clip_l() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    return CLIPTextModel(cfg)


def _open_clip_text(name: str, use_open_clip: bool | None) -> tuple[nn.Module, bool]:
    """The OpenCLIP text tower ``name`` (``ViT-H-14`` / ``ViT-bigG-14``); returns (module, is_real)."""
    sizes = {"ViT-H-14": (1024, 24, 16, 1024), "ViT-bigG-14": (1280, 32, 20, 1280)}
    width, layers, heads, embed = sizes[name]
    if use_open_clip is not False:
        try:
            from open_clip import get_model_config
            from open_clip.model import CLIP

            cfg = get_model_config(name)
            model = CLIP(**cfg)
            del model.visual
            return model, True
        except Exception:
            if use_open_clip:
                raise
    return OpenClipTextModel(width=width, layers=layers, heads=heads, embed_dim=embed), False


class SizeEmbedder(nn.Module):
    """sgm ``ConcatTimestepEmbedderND``: each number of a ``[B, N]`` tensor → sinusoidal ``outdim``
    features (cos, sin), concatenated → ``[B, N·outdim]``. No parameters."""

    def __init__(self, outdim: int = 256) -> None:
        super().__init__()
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape
        emb = timestep_embedding(x.reshape(-1).float(), self.outdim)
        return emb.reshape(b, n * self.outdim)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ldm's ``timestep_embedding`` (same operations, so the same numbers) without importing ldm:
    ``[N]`` numbers → ``[N, dim]`` features ``[cos(t·f), sin(t·f)]``, ``f = max_period^(-k/half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
        device=t.device
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _ldm_unet(**kwargs: object) -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = {
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4],
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "use_checkpoint": False,
        "legacy": False,
    }
    base.update(kwargs)
    return UNetModel(**base)


def full_sd15_tree() -> nn.Module:
    """SD1.5 on meta: ``model.diffusion_model`` + ``cond_stage_model.transformer``."""
    with torch.device("meta"):
        unet = _ldm_unet(num_heads=8, context_dim=768)
        te = _clip_l()
    return _holder(model=_holder(diffusion_model=unet), cond_stage_model=_holder(transformer=te))


def full_sd2_tree(use_open_clip: bool | None = None) -> nn.Module:
    """SD2.x on meta: ``model.diffusion_model`` + ``cond_stage_model.model`` (OpenCLIP ViT-H text)."""
    with torch.device("meta"):
        unet = _ldm_unet(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
        te, _ = _open_clip_text("ViT-H-14", use_open_clip)
    return _holder(model=_holder(diffusion_model=unet), cond_stage_model=_holder(model=te))


def full_sdxl_tree(use_open_clip: bool | None = None) -> nn.Module:
    """SDXL base on meta: ``model.diffusion_model`` + ``conditioner.embedders.{0.transformer,1.model,2,3,4}``."""
    from .sdxl_unet import sdxl_unet

    with torch.device("meta"):
        unet = sdxl_unet()
        te1 = _clip_l()
        te2, _ = _open_clip_text("ViT-bigG-14", use_open_clip)
    embedders = nn.ModuleList(
        [
            _holder(transformer=te1),
            _holder(model=te2),
            SizeEmbedder(256),
            SizeEmbedder(256),
            SizeEmbedder(256),
        ]
    )
    return _holder(model=_holder(diffusion_model=unet), conditioner=_holder(embedders=embedders))
