"""The measuring world's model: a tiny SD1-architecture text-to-image model in pixel space.

Real classes: the ``ldm`` ``UNetModel`` (1 input/output channel, 8×8·k pixels, model_channels 32,
channel_mult [1, 2], attention at both levels, context_dim 64) and a transformers ``CLIPTextModel``
(hidden 64, 2 layers, 4 heads, 77 positions, the full 49,408-token CLIP vocabulary) with the real CLIP
tokenizer. Module paths are the SD1 checkpoint's (``model.diffusion_model.…``,
``cond_stage_model.transformer.text_model.…``), so DeltaSet keys, ``lib_loraclr.apply.patched`` and the
readers/writers treat it like a real SD1 model.

``WorldSD`` is a small stand-in with ``SD1Model``'s interface (``apply_model``, ``get_learned_conditioning``,
``alphas_cumprod``); ``build_world_model`` uses ``lib_loraclr.models.sd.SD1Model`` when it can build this
configuration, else ``WorldSD``. Both have identical state-dict keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

UNET_CONFIG: dict = {
    "image_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "model_channels": 32,
    "num_res_blocks": 2,
    "attention_resolutions": [1, 2],
    "channel_mult": [1, 2],
    "num_heads": 4,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 64,
    "legacy": False,
}
TEXT_CONFIG: dict = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
MAX_LENGTH = 77
LINEAR_START, LINEAR_END, TIMESTEPS = 0.00085, 0.012, 1000


def sd1_alphas_cumprod() -> torch.Tensor:
    """SD1's "scaled linear" DDPM schedule: ᾱ_t for t = 0…999 (float32 ``[1000]``)."""
    betas = torch.linspace(LINEAR_START**0.5, LINEAR_END**0.5, TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class _Wrapper(nn.Module):
    def __init__(self, attr: str, module: nn.Module) -> None:
        super().__init__()
        setattr(self, attr, module)


class WorldSD(nn.Module):
    """``model.diffusion_model`` (ldm UNet) + ``cond_stage_model.transformer`` (CLIPTextModel).

    ``apply_model(x [b,1,8,8k], t [b] (0…999), cond [b,77,64]) → ε̂``; ``get_learned_conditioning(prompts)``
    → ``[b, 77, 64]`` (the final-layer-normed last hidden state, prompts padded with EOS to 77 tokens).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        from ldm.modules.diffusionmodules.openaimodel import UNetModel
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(seed)
        self.model = _Wrapper("diffusion_model", UNetModel(**UNET_CONFIG))
        te = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        self.cond_stage_model = _Wrapper("transformer", te)
        self.register_buffer("alphas_cumprod", sd1_alphas_cumprod(), persistent=False)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        from lib_loraclr.models.tokenizer import clip_tokenizer

        tok = clip_tokenizer()(
            list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        )
        return tok.input_ids

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.cond_stage_model.transformer(
            input_ids=ids.to(self.alphas_cumprod.device)
        ).last_hidden_state

    def get_learned_conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(prompts))

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model.diffusion_model(x, t, context=cond)


def build_world_model(seed: int = 0) -> WorldSD:
    """A freshly initialised world model (random weights, fixed by ``seed``)."""
    return WorldSD(seed)
