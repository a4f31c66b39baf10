"""Base-architecture detection (SD1 / SD2 / SDXL) for LoRA files and checkpoints.

Evidence, strongest first: key families only SDXL has (``lora_te1_``/``lora_te2_``, ``text_encoder_2.``,
``conditioner.embedders``), the cross-attention context width (768 SD1, 1024 SD2, 2048 SDXL) and the text
encoder width (768 SD1, 1024 SD2) read from tensor shapes, UNet structure (attention at
``input_blocks.1``/``output_blocks.9-11`` exists only in SD1/SD2, ``transformer_blocks.1+`` only in SDXL),
then metadata (``ss_base_model_version``, ``ss_v2``, ``modelspec.architecture``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_CTX_TO_ARCH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_DOWN_MARKERS = (
    "lora_down.weight",
    "lora_A.weight",
    "lora_A.default.weight",
    "lora.down.weight",
    "lora_linear_layer.down.weight",
    "hada_w1_b",
    "hada_w2_b",
    "lokr_w2_b",
)
_RE_SDXL_ONLY_LDM = re.compile(
    r"(input_blocks|output_blocks|middle_block)[._]\d+[._]1[._]transformer_blocks[._][1-9]"
)
_RE_SD12_ONLY_LDM = re.compile(r"(input_blocks[._][12][._]1[._]|output_blocks[._](9|10|11)[._])")
_RE_SD12_ONLY_DIFFUSERS = re.compile(
    r"(down_blocks[._]0[._]attentions|up_blocks[._]3[._]|down_blocks[._]3[._])"
)
_RE_SDXL_ONLY_DIFFUSERS = re.compile(
    r"(down_blocks|up_blocks|mid_block)[._](\d+[._])?attentions[._]\d+[._]transformer_blocks[._][1-9]"
)


def arch_from_metadata(metadata: Mapping[str, str] | None) -> str:
    """Architecture named by kohya / ModelSpec metadata, or ``"unknown"``."""
    if not metadata:
        return "unknown"
    spec = str(metadata.get("modelspec.architecture", "")).lower()
    if spec.startswith("stable-diffusion-xl"):
        return "sdxl"
    if spec.startswith("stable-diffusion-v2"):
        return "sd2"
    if spec.startswith("stable-diffusion-v1"):
        return "sd1"
    base = str(metadata.get("ss_base_model_version", "")).lower()
    if base.startswith("sdxl"):
        return "sdxl"
    if base.startswith("sd_v2"):
        return "sd2"
    if base.startswith("sd_v1"):
        return "sd1"
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return "sd2"
    return "unknown"


def _down_in_dim(key: str, shape: Sequence[int]) -> int | None:
    if key.endswith(_DOWN_MARKERS) and len(shape) >= 2:
        return int(shape[1])
    return None


def detect_arch(
    keys: Iterable[str],
    shapes: Mapping[str, Sequence[int]] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """``"sd1"`` | ``"sd2"`` | ``"sdxl"`` | ``"unknown"`` for a LoRA file's raw keys.

    ``keys``: the file's tensor names (kohya, diffusers/PEFT, ED-LoRA flattened with ``unet.`` /
    ``text_encoder.`` prefixes, or canonical keys); ``shapes``: tensor name → shape (optional, improves
    the answer); ``metadata``: safetensors metadata strings (optional).
    """
    keys = list(keys)
    shapes = shapes or {}
    if any(
        k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "conditioner.embedders"))
        or ".text_encoder_2." in k
        for k in keys
    ):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    # cross-attention context width: attn2 to_k / to_v input dimension
    votes: dict[str, int] = {}
    for k in keys:
        if "attn2" in k and ("to_k" in k or "to_v" in k):
            d = _down_in_dim(k, shapes.get(k, ()))
            if d in _CTX_TO_ARCH:
                votes[_CTX_TO_ARCH[d]] = votes.get(_CTX_TO_ARCH[d], 0) + 1
    if votes:
        return max(votes, key=lambda a: votes[a])
    # text-encoder width (q_proj / fc1 input) for TE-only files
    for k in keys:
        if ("lora_te_" in k or k.startswith(("text_encoder.", "text_model."))) and (
            "q_proj" in k or "fc1" in k or "to_q" in k
        ):
            d = _down_in_dim(k, shapes.get(k, ()))
            if d == 768:
                return "sd1"
            if d == 1024:
                return "sd2"
    joined = "\n".join(keys)
    if _RE_SDXL_ONLY_LDM.search(joined) or _RE_SDXL_ONLY_DIFFUSERS.search(joined):
        return "sdxl"
    meta_arch = arch_from_metadata(metadata)
    if meta_arch != "unknown":
        return meta_arch
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if _RE_SD12_ONLY_LDM.search(joined) or _RE_SD12_ONLY_DIFFUSERS.search(joined):
        return "sd1"  # SD1 or SD2 by structure; SD2 files carry 1024-wide contexts (caught above)
    return "unknown"


def detect_checkpoint_arch(state_dict_keys_and_shapes: Mapping[str, Sequence[int]]) -> str:
    """Architecture of a full checkpoint from its state-dict keys and shapes (tensors work as shapes)."""
    ks = state_dict_keys_and_shapes
    if any(k.startswith("conditioner.embedders.1.") for k in ks):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in ks):
        return "sd2"
    for k, s in ks.items():
        if k.endswith("attn2.to_k.weight"):
            shape = tuple(getattr(s, "shape", s))
            if len(shape) == 2 and int(shape[1]) in _CTX_TO_ARCH:
                return _CTX_TO_ARCH[int(shape[1])]
    if any(k.startswith("cond_stage_model.transformer.") for k in ks):
        return "sd1"
    return "unknown"


#: the ldm/sgm UNet layout of SD1.x, SD2.x and the SDXL family (Pony, Illustrious, …): what CLoRA serves
UNET_PARTS = ("input_blocks", "middle_block", "output_blocks")


def unsupported_network(net: Any) -> str | None:
    """One line saying why CLoRA cannot serve a host's denoising network ``net`` (Flux, SD3, Z-Image and other
    transformer models), or None for a UNet of the SD1/SD2/SDXL layout (or no network found: the adapter
    then reports its own problem)."""
    if net is None or all(hasattr(net, part) for part in UNET_PARTS):
        return None
    return (
        f"CLoRA works with SD1.x, SD2.x and SDXL-family checkpoints; this model ({type(net).__name__}) is not one "
        "(Flux, SD3 and other transformer models are not supported), so the image is made without CLoRA"
    )
