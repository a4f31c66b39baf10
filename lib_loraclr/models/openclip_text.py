"""A faithful replica of the OpenCLIP text tower as the WebUI holds it (``open_clip.CLIP`` minus ``visual``).

SD2's ``cond_stage_model.model`` and SDXL's ``conditioner.embedders.1.model`` are ``open_clip`` ``CLIP``
objects whose vision tower was deleted. Their module tree (open_clip 2.x)::

    token_embedding                      nn.Embedding(vocab, width)
    positional_embedding                 Parameter [context_length, width]
    transformer.resblocks.N.ln_1         LayerNorm
    transformer.resblocks.N.attn         nn.MultiheadAttention (in_proj_weight [3·width, width], out_proj)
    transformer.resblocks.N.ls_1 / ls_2  Identity
    transformer.resblocks.N.ln_2         LayerNorm
    transformer.resblocks.N.mlp.c_fc / .gelu / .c_proj
    ln_final                             LayerNorm
    text_projection                      Parameter [width, embed_dim]
    logit_scale                          Parameter []
    attn_mask                            buffer (causal, -inf above the diagonal), not persistent

`OpenClipTextModel` reproduces that tree and open_clip's computation (sequence-first
``nn.MultiheadAttention``, GELU MLP), so tiny models need no ``open_clip`` import; a test checks names and
numbers against the real ``open_clip.model.CLIP``. The forward returns what the WebUI's embedders use.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm: computes in the input dtype and casts back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig = x.dtype
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(orig)


class ResidualAttentionBlock(nn.Module):
    """open_clip ``ResidualAttentionBlock`` (no layer scale): input ``[L, B, width]`` (sequence first)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ls_1 = nn.Identity()
        self.ln_2 = LayerNorm(width)
        mlp_width = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, mlp_width)),
                    ("gelu", nn.GELU()),
                    ("c_proj", nn.Linear(mlp_width, width)),
                ]
            )
        )
        self.ls_2 = nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attn_mask.to(x.dtype) if attn_mask is not None else None
        h = self.ln_1(x)
        x = x + self.ls_1(self.attn(h, h, h, need_weights=False, attn_mask=mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """open_clip ``Transformer``: ``resblocks`` applied in order."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for r in self.resblocks:
            x = r(x, attn_mask=attn_mask)
        return x


def causal_mask(n: int) -> torch.Tensor:
    return torch.empty(n, n).fill_(float("-inf")).triu_(1)


class OpenClipTextModel(nn.Module):
    """OpenCLIP text tower with ``open_clip.CLIP``'s attribute names (see the module docstring).

    Args: width, layers, heads, embed_dim (text projection), vocab_size, context_length, mlp_ratio.
    """

    def __init__(
        self,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        embed_dim: int = 1024,
        vocab_size: int = 49408,
        context_length: int = 77,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.text_pool_type = "argmax"
        self.register_buffer("attn_mask", causal_mask(context_length), persistent=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * 2.6592600345611572)  # log(1 / 0.07)
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's ``TextTransformer.init_parameters``."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = (width**-0.5) * ((2 * layers) ** -0.5)
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward_layers(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(penultimate, last, pooled)`` for token ids ``[B, 77]``.

        penultimate: ``[B, 77, width]`` input of the last block (sgm's "penultimate") (SDXL te2 crossattn; SD2's
        default adds ``ln_final``); last: ``[B, 77, width]`` after every block (no ``ln_final``);
        pooled: ``ln_final(last)`` at the argmax token (EOS) ``@ text_projection`` → ``[B, embed_dim]``.
        """
        x = self.token_embedding(tokens) + self.positional_embedding
        x = x.permute(1, 0, 2)
        blocks = self.transformer.resblocks
        penultimate = x
        for i, r in enumerate(blocks):
            x = r(x, attn_mask=self.attn_mask)
            if i == len(blocks) - 2:
                penultimate = x
        last = x.permute(1, 0, 2)
        penultimate = penultimate.permute(1, 0, 2)
        o = self.ln_final(last)
        pooled = o[torch.arange(o.shape[0], device=o.device), tokens.argmax(dim=-1)] @ self.text_projection
        return penultimate, last, pooled

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's ``CLIP.encode_text``: pooled projection ``[B, embed_dim]``."""
        return self.forward_layers(tokens)[2]
