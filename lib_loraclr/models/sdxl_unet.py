"""SDXL's UNet module tree (generative-models ``sgm``) built from ldm's classes.

No ``sgm`` distribution exists on PyPI; ldm's ``UNetModel`` / ``SpatialTransformer`` /
``BasicTransformerBlock`` have the same module names. `SDXLUNetModel` builds ldm's UNet with transformer
depth 1, then grows each ``SpatialTransformer`` to its level's depth (SDXL: 2 at the second level, 10 at
the third and in the middle block → 70 ``attn2`` layers) and adds sgm's ``label_emb.0.{0,2}`` (the
``adm_in_channels`` vector embedding, 2816 in SDXL). Forward follows sgm: ``emb = time_embed(t) +
label_emb(y)``, the same context for every transformer block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import linear, timestep_embedding
from torch import nn


def _spatial_transformers_by_level(
    unet: nn.Module, n_levels: int, num_res_blocks: int
) -> list[tuple[nn.Module, int]]:
    """(SpatialTransformer, level) pairs; the middle block gets level ``n_levels - 1``."""
    out: list[tuple[nn.Module, int]] = []
    idx = 1
    for level in range(n_levels):
        for _ in range(num_res_blocks):
            out += [(m, level) for m in unet.input_blocks[idx] if isinstance(m, SpatialTransformer)]
            idx += 1
        if level != n_levels - 1:
            idx += 1  # downsample
    out += [(m, n_levels - 1) for m in unet.middle_block if isinstance(m, SpatialTransformer)]
    idx = 0
    for level in reversed(range(n_levels)):
        for _ in range(num_res_blocks + 1):
            out += [(m, level) for m in unet.output_blocks[idx] if isinstance(m, SpatialTransformer)]
            idx += 1
    return out


def _grow(st: nn.Module, depth: int) -> None:
    first = st.transformer_blocks[0]
    heads = first.attn1.heads
    inner = first.attn1.to_q.out_features
    ctx = first.attn2.to_k.in_features
    while len(st.transformer_blocks) < depth:
        st.transformer_blocks.append(
            BasicTransformerBlock(inner, heads, inner // heads, context_dim=ctx, checkpoint=False)
        )


class SDXLUNetModel(UNetModel):
    """ldm ``UNetModel`` with sgm SDXL's module names (see the module docstring).

    ``transformer_depth``: per level (levels without attention ignore it); the middle block uses
    the last level's depth, as sgm does.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2),
        transformer_depth: Sequence[int] = (1, 2, 10),
        num_head_channels: int = 64,
        context_dim: int = 2048,
        adm_in_channels: int = 2816,
    ) -> None:
        super().__init__(
            image_size=32,
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            attention_resolutions=list(attention_resolutions),
            num_res_blocks=num_res_blocks,
            channel_mult=list(channel_mult),
            num_heads=-1,
            num_head_channels=num_head_channels,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=context_dim,
            use_checkpoint=False,
            legacy=False,
            use_linear_in_transformer=True,
        )
        depth = list(transformer_depth)
        if len(depth) != len(channel_mult):
            raise ValueError(
                f"transformer_depth needs one entry per level ({len(channel_mult)}), got {depth}"
            )
        for st, level in _spatial_transformers_by_level(self, len(channel_mult), num_res_blocks):
            _grow(st, max(1, depth[level]))
        self.max_depth = max(1, *depth)
        self.adm_in_channels = adm_in_channels
        ted = model_channels * 4
        self.label_emb = nn.Sequential(
            nn.Sequential(linear(adm_in_channels, ted), nn.SiLU(), linear(ted, ted))
        )

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """ε ``[B, C, H, W]`` from latents ``x``, timesteps ``[B]``, context ``[B, T, D]`` and the
        vector ``y`` ``[B, adm_in_channels]``."""
        if y is None or y.shape[0] != x.shape[0]:
            raise ValueError("SDXL UNet needs the vector conditioning y with one row per latent")
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(x.dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y)
        ctx = [context] * self.max_depth
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, ctx)
            hs.append(h)
        h = self.middle_block(h, emb, ctx)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, ctx)
        return self.out(h)


def sdxl_unet(**kwargs: object) -> SDXLUNetModel:
    """An `SDXLUNetModel` (defaults: the full SDXL base UNet; pass tiny sizes for tests)."""
    return SDXLUNetModel(**kwargs)
