"""Tiny Stable Diffusion models with the real checkpoint module layout, built from the real classes.

`SD1Model` mirrors an SD1 ``LatentDiffusion`` object as the WebUI holds it (latent space only, no VAE):

- ``model.diffusion_model``            — ldm ``UNetModel`` (``ldm.modules.diffusionmodules.openaimodel``)
- ``cond_stage_model.transformer``     — transformers ``CLIPTextModel`` (transformers-4 names ``text_model.*``)
- ``alphas_cumprod``                   — SD's schedule, ``betas = linspace(√0.00085, √0.012, 1000)²``
- ``apply_model(x, t, cond) -> eps``   — what ``k_diffusion.external.CompVisDenoiser`` calls
- ``get_learned_conditioning(prompts)`` — ``[B, 77·k, D]`` via `lib_loraclr.text.PromptEncoder`

``state_dict()`` keys are exactly SD1 checkpoint keys (``model.diffusion_model.*``,
``cond_stage_model.transformer.text_model.*``); ``alphas_cumprod`` is a non-persistent buffer.
The default config has SD1's exact module layout (16 ``attn2``: input_blocks 1,2,4,5,7,8, middle_block.1,
output_blocks 3–11) with 32 base channels and a 64-d, 2-layer text encoder.

`SDXLModel` mirrors sgm's ``DiffusionEngine`` module names (see its docstring).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ..errors import LoraclrError
from ..text import OpenClipPromptEncoder, PromptEncoder

CONFIG_METADATA_KEY = "loraclr_tiny_config"


class TinyCheckpointError(LoraclrError, ValueError):
    """A file is not a tiny reference checkpoint written by `save_tiny_checkpoint`."""


def sd_alphas_cumprod() -> torch.Tensor:
    """SD1/SD2/SDXL ``alphas_cumprod`` ``[1000]`` (float32): scaled-linear betas 0.00085 → 0.012."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


@dataclass
class UNetConfig:
    """Arguments of ldm's ``UNetModel`` (defaults: SD1 module layout, tiny channels)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [4, 2, 1])
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int = 1
    use_linear_in_transformer: bool = False
    context_dim: int = 64


@dataclass
class TextConfig:
    """A small transformers ``CLIPTextConfig`` (real 49,408-token vocabulary)."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"

    def to_clip_config(self) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.hidden_act,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )


@dataclass
class SD1Config:
    """Config of `SD1Model`: UNet, text encoder and CLIP skip (1 = last layer)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    text: TextConfig = field(default_factory=TextConfig)
    clip_skip: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "sd1", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SD1Config:
        return cls(
            unet=UNetConfig(**d.get("unet", {})),
            text=TextConfig(**d.get("text", {})),
            clip_skip=int(d.get("clip_skip", 1)),
        )


def _build_ldm_unet(cfg: UNetConfig) -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(
        image_size=32,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        model_channels=cfg.model_channels,
        attention_resolutions=list(cfg.attention_resolutions),
        num_res_blocks=cfg.num_res_blocks,
        channel_mult=list(cfg.channel_mult),
        num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels,
        use_spatial_transformer=True,
        transformer_depth=cfg.transformer_depth,
        context_dim=cfg.context_dim,
        use_checkpoint=False,
        legacy=False,
        use_linear_in_transformer=cfg.use_linear_in_transformer,
    )


def integrated_unet_kwargs(cfg: UNetConfig | SDXLUNetSpec) -> dict[str, Any]:
    """Arguments of Forge's ``backend.nn.unet.IntegratedUNet2DConditionModel`` (same module names and call
    as ldm's ``UNetModel``) for the SD1-layout UNet ``cfg`` describes (sizes read from a checkpoint's shapes).

    Forge describes attention per res block (``transformer_depth``: one entry per input res block,
    ``transformer_depth_output``: one per output block, popped from the end) instead of ldm's
    ``attention_resolutions`` (level ``i`` has attention when ``2**i`` is listed). An `SDXLUNetSpec` gives
    Forge's SDXL arguments (per-level depths, 64-channel heads, linear ``proj_in``, the ``y`` vector
    embedding ``label_emb``)."""
    if isinstance(cfg, SDXLUNetSpec):
        return _integrated_sdxl_kwargs(cfg)
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


def _integrated_sdxl_kwargs(spec: SDXLUNetSpec) -> dict[str, Any]:
    """`integrated_unet_kwargs` for an SDXL-layout UNet (SDXL base: depths [0, 2, 10], middle 10)."""
    u = spec.unet
    levels = len(u.channel_mult)
    depth = [u.transformer_depth[i] if 2**i in u.attention_resolutions else 0 for i in range(levels)]
    return {
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "model_channels": u.model_channels,
        "num_res_blocks": [u.num_res_blocks] * levels,
        "channel_mult": list(u.channel_mult),
        "num_heads": -1,
        "num_head_channels": u.num_head_channels,
        "use_spatial_transformer": True,
        "context_dim": spec.context_dim,
        "use_linear_in_transformer": True,
        "transformer_depth": [d for d in depth for _ in range(u.num_res_blocks)],
        "transformer_depth_middle": max(1, depth[-1]),
        "transformer_depth_output": [d for d in depth for _ in range(u.num_res_blocks + 1)],
        "num_classes": "sequential",
        "adm_in_channels": spec.adm_in_channels,
        "use_checkpoint": False,
    }


def default_latent_size(cfg: UNetConfig) -> int:
    """Smallest latent side ≥ 8 whose deepest UNet level is at least 2×2.

    ldm's GroupNorm32 has 32 groups: at 1×1 with 32 channels each group holds a single value, so the
    norm erases the signal and torch refuses a batch of one ("Expected more than 1 value per channel").
    The SD1 layout (4 levels) therefore needs 16×16 latents; 2-level configs work at 8×8.
    """
    return max(8, 2 ** (len(cfg.channel_mult) - 1) * 2)


def randomize_zero_outputs(module: nn.Module, std: float = 0.02) -> list[str]:
    """Give every all-zero weight of a Linear/Conv (ldm's ``zero_module`` layers: UNet ``out.2``, every
    ``proj_out``, ResBlock ``out_layers.3``) small normal values, so that every layer (and every LoRA on
    it) affects the output. Uses the global torch RNG. Returns the module names changed."""
    changed = []
    with torch.no_grad():
        for name, sub in module.named_modules():
            w = getattr(sub, "weight", None)
            if isinstance(sub, (nn.Linear, nn.Conv2d, nn.Conv1d)) and w is not None and not bool(w.any()):
                w.normal_(0.0, std)
                changed.append(name)
    return changed


def _offset_final_norm(text_model: nn.Module) -> None:
    """Random init leaves the final layer norm's output with mean ≈ 0, which makes the WebUI's emphasis
    mean-restore (``z · mean(z) / mean(z·w)``) ill-conditioned; real CLIP's bias gives a clear mean."""
    with torch.no_grad():
        text_model.text_model.final_layer_norm.bias.normal_(0.25, 0.5)


class DiffusionWrapper(nn.Module):
    """Holds the UNet at ``.diffusion_model`` like ldm's ``DiffusionWrapper``."""

    def __init__(self, diffusion_model: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model


class CondStage(nn.Module):
    """Holds the text encoder at ``.transformer`` like ldm's ``FrozenCLIPEmbedder``."""

    def __init__(self, transformer: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer


def _context_from_cond(cond: Any) -> torch.Tensor:
    """Cross-attention context from a tensor, a list of tensors (concatenated along tokens, as ldm's
    ``DiffusionWrapper``) or a dict with ``c_crossattn`` / ``crossattn``."""
    if isinstance(cond, dict):
        for key in ("c_crossattn", "crossattn"):
            if key in cond:
                return _context_from_cond(cond[key])
        raise KeyError(f"conditioning dict needs 'c_crossattn' or 'crossattn', got {sorted(cond)}")
    if isinstance(cond, (list, tuple)):
        return torch.cat(list(cond), dim=1)
    return cond


class SD1Model(nn.Module):
    """Tiny SD1 ``LatentDiffusion`` stand-in (see the module docstring); ε-prediction."""

    parameterization = "eps"

    def __init__(
        self, config: SD1Config | None = None, tokenizer: Any = None, unet_factory: Any = None
    ) -> None:
        """``unet_factory(UNetConfig) -> nn.Module``: another UNet class with ldm's module names and
        ``forward(x, timesteps=…, context=…)`` (e.g. a host's own), instead of ldm's ``UNetModel``."""
        super().__init__()
        from .tokenizer import clip_tokenizer

        self.config = config or SD1Config()
        if self.config.text.hidden_size != self.config.unet.context_dim:
            raise ValueError(
                f"text hidden_size {self.config.text.hidden_size} != UNet context_dim {self.config.unet.context_dim}"
            )
        self.tokenizer = tokenizer if tokenizer is not None else clip_tokenizer()
        build = unet_factory if unet_factory is not None else _build_ldm_unet
        self.model = DiffusionWrapper(build(self.config.unet))
        text_model = CLIPTextModel(self.config.text.to_clip_config())
        self.cond_stage_model = CondStage(text_model, self.tokenizer)
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod(), persistent=False)
        self.prompt_encoder = PromptEncoder(self.tokenizer, text_model, clip_skip=self.config.clip_skip)

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Default latent ``(C, H, W)`` for sampling; see `default_latent_size`."""
        s = default_latent_size(self.config.unet)
        return (self.config.unet.in_channels, s, s)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """ε prediction ``[B, C, H, W]`` for latents ``x``, timesteps ``t`` ``[B]`` (float ok) and
        conditioning ``[B, T, D]`` (or ``{"c_crossattn": [tensor]}`` / a list, as ldm accepts)."""
        return self.model.diffusion_model(x, timesteps=t, context=_context_from_cond(cond))

    def get_learned_conditioning(self, prompts: list[str]) -> torch.Tensor:
        """``[B, 77·k, D]`` for the prompts, WebUI conventions (emphasis, BREAK, chunks, clip skip)."""
        return self.prompt_encoder.encode(list(prompts))


def build_tiny_sd1(seed: int = 0, config: SD1Config | None = None, nonzero_outputs: bool = True) -> SD1Model:
    """A randomly initialised `SD1Model` (deterministic per ``seed``; the global RNG is left untouched).

    ``nonzero_outputs``: give ldm's zero-initialised layers small random weights (see
    `randomize_zero_outputs`), so that attention layers and LoRAs on them change the output, and the
    text encoder's final layer norm a bias with mean 0.25 (so that emphasis behaves as in real CLIP).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD1Model(config)
        if nonzero_outputs:
            randomize_zero_outputs(model.model.diffusion_model)
            _offset_final_norm(model.cond_stage_model.transformer)
    return model.eval()


def save_tiny_checkpoint(model: nn.Module, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write ``model.state_dict()`` as safetensors (SD checkpoint key layout) with the config JSON in
    the metadata key ``loraclr_tiny_config``. Atomic (temp file + rename); refuses to overwrite an
    existing file unless ``overwrite``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError("save_tiny_checkpoint needs a SD1Model or SDXLModel model")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {CONFIG_METADATA_KEY: json.dumps(config.to_dict()), "format": "pt"}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_tiny_checkpoint(path: str | os.PathLike[str]) -> SD1Model | SDXLModel:
    """Load a checkpoint written by `save_tiny_checkpoint` (`SD1Model` or `SDXLModel`), eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for bad files
        raise TinyCheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if CONFIG_METADATA_KEY not in metadata:
        raise TinyCheckpointError(
            f"{path}: no '{CONFIG_METADATA_KEY}' metadata; not a tiny reference checkpoint"
        )
    cfg = json.loads(metadata[CONFIG_METADATA_KEY])
    kind = cfg.get("kind", "sd1")
    model: SD1Model | SDXLModel
    if kind == "sd1":
        model = SD1Model(SD1Config.from_dict(cfg))
    elif kind == "sdxl":
        model = SDXLModel(SDXLConfig.from_dict(cfg))
    else:
        raise TinyCheckpointError(f"{path}: unknown tiny model kind {kind!r}")
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    # CLIP's position_ids: a persistent buffer (saved, expected) in transformers < 4.31, such as A1111 1.10's
    # 4.30.2; not saved by newer ones. The file may come from either; the buffer's value is fixed (0 … 76).
    missing = [k for k in missing if not k.endswith(".position_ids")]
    unexpected = [k for k in unexpected if not k.endswith(".position_ids")]
    if missing or unexpected:
        raise TinyCheckpointError(
            f"{path}: does not fit the {kind} model it describes: missing keys {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
        )
    return model.eval()


# ---------------------------------------------------------------------------------------------- SDXL


@dataclass
class SDXLUNetConfig:
    """`SDXLUNetModel` arguments. SDXL base: model_channels 320, num_head_channels 64,
    transformer_depth [1, 2, 10], context_dim 2048, adm_in_channels 2816."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [4, 2])
    transformer_depth: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_head_channels: int = 16


@dataclass(frozen=True)
class SDXLUNetSpec:
    """What a host's SDXL UNet builder (``unet_factory``) gets: the UNet config plus the widths that
    come from the text encoders (``context_dim`` = te1 + te2 hidden widths, ``adm_in_channels`` = the
    ``y`` vector: te2 pooled + 6 size embeddings)."""

    unet: SDXLUNetConfig
    context_dim: int
    adm_in_channels: int


@dataclass
class OpenClipConfig:
    """`OpenClipTextModel` sizes (SDXL te2 = ViT-bigG: width 1280, 32 layers, 20 heads, embed 1280)."""

    width: int = 64
    layers: int = 2
    heads: int = 4
    embed_dim: int = 64


@dataclass
class SDXLConfig:
    """Config of `SDXLModel`. ``size_embed_dim``: sgm's per-number size embedding (SDXL: 256)."""

    unet: SDXLUNetConfig = field(default_factory=SDXLUNetConfig)
    te1: TextConfig = field(default_factory=TextConfig)
    te2: OpenClipConfig = field(default_factory=OpenClipConfig)
    size_embed_dim: int = 16

    @property
    def context_dim(self) -> int:
        return self.te1.hidden_size + self.te2.width

    @property
    def adm_in_channels(self) -> int:
        return self.te2.embed_dim + 6 * self.size_embed_dim

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "sdxl", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SDXLConfig:
        return cls(
            unet=SDXLUNetConfig(**d.get("unet", {})),
            te1=TextConfig(**d.get("te1", {})),
            te2=OpenClipConfig(**d.get("te2", {})),
            size_embed_dim=int(d.get("size_embed_dim", 16)),
        )


class Embedder(nn.Module):
    """Holds one text encoder like sgm's embedders (``.transformer`` for CLIP-L, ``.model`` for OpenCLIP)."""


class Conditioner(nn.Module):
    """sgm ``GeneralConditioner`` stand-in: ``embedders`` = [CLIP-L, OpenCLIP, 3 size embedders]."""

    def __init__(self, embedders: list[nn.Module]) -> None:
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


def _vector_from_cond(cond: dict[str, Any]) -> torch.Tensor:
    for key in ("vector", "c_adm", "y"):
        if key in cond:
            v = cond[key]
            return torch.cat(list(v), dim=0) if isinstance(v, (list, tuple)) else v
    raise KeyError(f"SDXL conditioning needs a 'vector', got keys {sorted(cond)}")


class SDXLModel(nn.Module):
    """Tiny SDXL ``DiffusionEngine`` stand-in with sgm's module names (latent space only).

    - ``model.diffusion_model``: `SDXLUNetModel` (ldm classes, sgm names; ``label_emb.0.{0,2}``);
    - ``conditioner.embedders.0.transformer``: transformers ``CLIPTextModel`` (te1; hidden_states[-2],
      no final norm, as sgm's ``layer="hidden"``);
    - ``conditioner.embedders.1.model``: `OpenClipTextModel` (te2; penultimate, no ``ln_final``; pooled);
    - ``conditioner.embedders.2..4``: size embedders (original size, crop top-left, target size).

    Differences from SDXL base, all sizes: 32 base channels, head channels 16, transformer depth
    [-, 2, 2] instead of [-, 2, 10] (``transformer_blocks.0/1`` exist everywhere SDXL has attention;
    pass ``transformer_depth=[1, 2, 10]`` for all 70 ``attn2`` names), 64-d 2-layer text encoders,
    16-d size embeddings (adm 160 instead of 2816).
    """

    parameterization = "eps"
    is_sdxl = True

    def __init__(
        self, config: SDXLConfig | None = None, tokenizer: Any = None, unet_factory: Any = None
    ) -> None:
        """``unet_factory(SDXLUNetSpec) -> nn.Module``: another UNet class with sgm's module names and
        ``forward(x, timesteps=…, context=…, y=…)`` (e.g. a host's own) instead of `SDXLUNetModel`."""
        super().__init__()
        from .full_trees import SizeEmbedder
        from .openclip_text import OpenClipTextModel
        from .tokenizer import clip_tokenizer

        self.config = cfg = config or SDXLConfig()
        self.tokenizer = tokenizer if tokenizer is not None else clip_tokenizer()
        spec = SDXLUNetSpec(cfg.unet, cfg.context_dim, cfg.adm_in_channels)
        self.model = DiffusionWrapper(
            unet_factory(spec) if unet_factory is not None else _build_sdxl_unet(spec)
        )
        te1 = CLIPTextModel(cfg.te1.to_clip_config())
        te2 = OpenClipTextModel(
            width=cfg.te2.width, layers=cfg.te2.layers, heads=cfg.te2.heads, embed_dim=cfg.te2.embed_dim
        )
        e0, e1 = Embedder(), Embedder()
        e0.transformer = te1
        e1.model = te2
        sizes = [SizeEmbedder(cfg.size_embed_dim) for _ in range(3)]
        self.conditioner = Conditioner([e0, e1, *sizes])
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod(), persistent=False)
        self.te1_encoder = PromptEncoder(self.tokenizer, te1, clip_skip=2, final_norm_on_skip=False)
        self.te2_encoder = OpenClipPromptEncoder(self.tokenizer, te2, layer="penultimate", final_norm=False)
        self.prompt_encoder = self.te1_encoder  # token positions are the same for both encoders

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = max(8, 2 ** (len(self.config.unet.channel_mult) - 1) * 2)
        return (self.config.unet.in_channels, s, s)

    def get_learned_conditioning(
        self,
        prompts: list[str],
        original_size: tuple[int, int] = (1024, 1024),
        crop_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] = (1024, 1024),
        is_negative_prompt: bool = False,
    ) -> dict[str, torch.Tensor]:
        """``{"crossattn": [B, 77·k, d1 + d2], "vector": [B, adm]}`` like A1111's SDXL model.

        vector = [te2 pooled, emb(original_size), emb(crop), emb(target_size)] (sizes as (h, w)).
        All-empty negative prompts give zero text embeddings, as A1111 does for SDXL.
        """
        prompts = list(prompts)
        z1 = self.te1_encoder.encode(prompts)
        z2, pooled = self.te2_encoder.encode_with_pooled(prompts)
        assert pooled is not None
        b = len(prompts)
        if is_negative_prompt and all(p == "" for p in prompts):
            z1, z2, pooled = torch.zeros_like(z1), torch.zeros_like(z2), torch.zeros_like(pooled)
        sizes = []
        for emb, value in zip(
            self.conditioner.embedders[2:], (original_size, crop_coords_top_left, target_size)
        ):
            x = torch.tensor([list(value)] * b, dtype=torch.float32, device=pooled.device)
            sizes.append(emb(x).to(pooled.dtype))
        return {"crossattn": torch.cat([z1, z2], dim=2), "vector": torch.cat([pooled, *sizes], dim=1)}

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """ε ``[B, C, H, W]``; ``cond`` = ``{"crossattn": [B, T, D], "vector": [B, adm]}`` (also accepts
        ``c_crossattn`` / ``c_adm`` keys and lists, as the WebUI's wrappers pass)."""
        if not isinstance(cond, dict):
            raise TypeError("SDXLModel.apply_model needs a dict with 'crossattn' and 'vector'")
        return self.model.diffusion_model(
            x, timesteps=t, context=_context_from_cond(cond), y=_vector_from_cond(cond)
        )


def _build_sdxl_unet(spec: SDXLUNetSpec) -> nn.Module:
    from .sdxl_unet import sdxl_unet

    u = spec.unet
    return sdxl_unet(
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        model_channels=u.model_channels,
        channel_mult=list(u.channel_mult),
        num_res_blocks=u.num_res_blocks,
        attention_resolutions=list(u.attention_resolutions),
        transformer_depth=list(u.transformer_depth),
        num_head_channels=u.num_head_channels,
        context_dim=spec.context_dim,
        adm_in_channels=spec.adm_in_channels,
    )


def build_tiny_sdxl(
    seed: int = 0, config: SDXLConfig | None = None, nonzero_outputs: bool = True
) -> SDXLModel:
    """A randomly initialised `SDXLModel` (deterministic per ``seed``; global RNG untouched).

    ``nonzero_outputs``: small random weights for ldm's zero-initialised layers, and a +0.1 offset on both
    text encoders' position embeddings so that the hidden states have a clear mean (the WebUI's emphasis
    rescales by it; random init leaves it ≈ 0).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SDXLModel(config)
        if nonzero_outputs:
            randomize_zero_outputs(model.model.diffusion_model)
            with torch.no_grad():
                emb0 = model.conditioner.embedders[0].transformer.text_model.embeddings.position_embedding
                emb0.weight.add_(0.1)
                model.conditioner.embedders[1].model.positional_embedding.add_(0.1)
    return model.eval()
