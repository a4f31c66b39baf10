"""Every name map of the project, in one place.

Canonical keys (docs/DESIGN.md) are module paths in the WebUI's (A1111) model object, e.g.
``model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k`` or
``conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj:q`` (``:q|:k|:v`` selects a row
block of OpenCLIP's fused ``in_proj_weight``). This module maps them to and from

* kohya names (``lora_unet_…``, ``lora_te_…``, ``lora_te1_…``, ``lora_te2_…``), reading both UNet
  namings kohya writes: diffusers-style (``lora_unet_down_blocks_0_attentions_0_…``, converted with the
  rules of A1111's ``convert_diffusers_name_to_compvis``) and ldm/sgm-style (``lora_unet_input_blocks_1_1_…``,
  A1111's ``lora_unet`` → ``diffusion_model`` fallback), including LoCon resnet/sampler/conv names;
* diffusers / PEFT module names (``unet.down_blocks.0…to_k``, ``text_encoder.text_model…q_proj``,
  ``text_encoder_2.…``, attention-processor names ``attn1.processor.to_q_lora``);
* module paths inside bare sub-models (the ldm ``UNetModel`` alone, a ``CLIPTextModel`` alone, …).

The UNet rules assume the SD layout with two layers per level (SD1.x, SD2.x, SDXL). Names are parsed by
explicit grammars, so an unknown name maps to ``None`` (to be reported), never to a guessed module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from .deltas import UNET_PREFIX

TE_SD1_PREFIX = "cond_stage_model.transformer."  # transformers CLIPTextModel (SD1.x)
TE_SD2_PREFIX = "cond_stage_model.model."  # OpenCLIP ViT-H text tower (SD2.x)
TE_SDXL1_PREFIX = "conditioner.embedders.0.transformer."  # CLIP ViT-L (transformers)
TE_SDXL2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG

#: Canonical roots of the bare sub-models, by short name.
SUBMODEL_ROOTS = {
    "unet": UNET_PREFIX,
    "te": TE_SD1_PREFIX,
    "sd2_te": TE_SD2_PREFIX,
    "te1": TE_SDXL1_PREFIX,
    "te2": TE_SDXL2_PREFIX,
}

ARCHS = ("sd1", "sd2", "sdxl")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")

# --------------------------------------------------------------------------------------------------
# grammar pieces (underscore form, as kohya writes them)
_ATTN_SUFFIX = (
    r"(?P<attn>norm|proj_in|proj_out|transformer_blocks_(?P<tb>\d+)_"
    r"(?P<tbs>attn[12]_to_(?:q|k|v|out_0)|ff_net_0_proj|ff_net_2|norm[123]))"
)
_RESNET_DIFFUSERS = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_RESNET_LDM = {
    "in_layers_0": "in_layers.0",
    "in_layers_2": "in_layers.2",
    "out_layers_0": "out_layers.0",
    "out_layers_3": "out_layers.3",
    "emb_layers_1": "emb_layers.1",
    "skip_connection": "skip_connection",
}
_RESNET_LDM_TO_DIFFUSERS = {v: k for k, v in _RESNET_DIFFUSERS.items()}
_TB_SUFFIX_DOTTED = {
    "ff_net_0_proj": "ff.net.0.proj",
    "ff_net_2": "ff.net.2",
    "norm1": "norm1",
    "norm2": "norm2",
    "norm3": "norm3",
}

_RE_ATTN = re.compile(_ATTN_SUFFIX + "$")
_RE_D_DOWN = re.compile(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)$")
_RE_D_DOWNSAMPLE = re.compile(r"down_blocks_(\d+)_downsamplers_0_conv$")
_RE_D_MID = re.compile(r"mid_block_(attentions|resnets)_(\d+)_(.+)$")
_RE_D_UP = re.compile(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)$")
_RE_D_UPSAMPLE = re.compile(r"up_blocks_(\d+)_upsamplers_0_conv$")
_RE_D_TIME = re.compile(r"time_embedding_linear_([12])$")
_RE_D_ADD = re.compile(r"add_embedding_linear_([12])$")
_RE_L_IO = re.compile(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_RE_L_MID = re.compile(r"middle_block_(\d)_(.+)$")
_RE_L_TIME = re.compile(r"time_embed_([02])$")
_RE_L_LABEL = re.compile(r"label_emb_0_([02])$")
_RE_L_OUT = re.compile(r"out_([02])$")

_RE_HF_LAYER = re.compile(
    r"text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12]|layer_norm[12])$"
)
_HF_TO_OPENCLIP = {
    "self_attn_q_proj": "attn.in_proj:q",
    "self_attn_k_proj": "attn.in_proj:k",
    "self_attn_v_proj": "attn.in_proj:v",
    "self_attn_out_proj": "attn.out_proj",
    "mlp_fc1": "mlp.c_fc",
    "mlp_fc2": "mlp.c_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
}
_OPENCLIP_TO_HF = {v: k for k, v in _HF_TO_OPENCLIP.items()}
_HF_DOTTED = {
    "self_attn_q_proj": "self_attn.q_proj",
    "self_attn_k_proj": "self_attn.k_proj",
    "self_attn_v_proj": "self_attn.v_proj",
    "self_attn_out_proj": "self_attn.out_proj",
    "mlp_fc1": "mlp.fc1",
    "mlp_fc2": "mlp.fc2",
    "layer_norm1": "layer_norm1",
    "layer_norm2": "layer_norm2",
}
_HF_UNDERSCORED = {v: k for k, v in _HF_DOTTED.items()}

# canonical (dotted) grammars
_RE_C_HF = re.compile(
    r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]|layer_norm[12])$"
)
_RE_C_OPENCLIP = re.compile(
    r"transformer\.resblocks\.(\d+)\.(attn\.in_proj:[qkv]|attn\.out_proj|mlp\.c_fc|mlp\.c_proj|ln_1|ln_2)$"
)
_RE_C_ATTN = re.compile(
    r"(norm|proj_in|proj_out|transformer_blocks\.\d+\."
    r"(?:attn[12]\.to_(?:q|k|v|out\.0)|ff\.net\.0\.proj|ff\.net\.2|norm[123]))$"
)
_RE_C_IO = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_RE_C_MID = re.compile(r"middle_block\.(\d)\.(.+)$")
_RESNET_C = set(_RESNET_LDM.values())


def _check_arch(arch: str) -> str:
    if arch not in (*ARCHS, "unknown"):
        raise ValueError(f"unknown architecture {arch!r}; expected one of sd1, sd2, sdxl, unknown")
    return arch


# --------------------------------------------------------------------------------------------------
# UNet: underscore names → ldm dotted path (below model.diffusion_model.)


def _attn_dotted(suffix: str) -> str | None:
    m = _RE_ATTN.match(suffix)
    if not m:
        return None
    if m.group("tb") is None:
        return m.group("attn")
    tbs = m.group("tbs")
    if tbs.startswith("attn"):
        # attn1_to_q → attn1.to_q ; attn2_to_out_0 → attn2.to_out.0
        head, proj = tbs[:5], tbs[6:]
        proj = "to_out.0" if proj == "to_out_0" else proj
        tail = f"{head}.{proj}"
    else:
        tail = _TB_SUFFIX_DOTTED[tbs]
    return f"transformer_blocks.{m.group('tb')}.{tail}"


def _diffusers_unet_rest_to_ldm(rest: str, arch: str) -> str | None:
    if rest == "conv_in":
        return "input_blocks.0.0"
    if rest == "conv_out":
        return "out.2"
    if rest == "conv_norm_out":
        return "out.0"
    if m := _RE_D_TIME.match(rest):
        return f"time_embed.{2 * int(m.group(1)) - 2}"
    if m := _RE_D_ADD.match(rest):
        return f"label_emb.0.{2 * int(m.group(1)) - 2}"
    if m := _RE_D_DOWNSAMPLE.match(rest):
        return f"input_blocks.{3 + 3 * int(m.group(1))}.0.op"
    if m := _RE_D_UPSAMPLE.match(rest):
        i = int(m.group(1))
        # SD1/SD2: up_blocks.0 has no attention, so its upsampler is the 2nd layer of output_blocks.2;
        # SDXL: up_blocks.0 and .1 both have attention, so the upsampler is always the 3rd layer.
        sub = 2 if (arch == "sdxl" or i > 0) else 1
        return f"output_blocks.{2 + 3 * i}.{sub}.conv"
    for rx, kind in ((_RE_D_DOWN, "down"), (_RE_D_MID, "mid"), (_RE_D_UP, "up")):
        m = rx.match(rest)
        if not m:
            continue
        if kind == "mid":
            block_type, j, suffix = m.group(1), int(m.group(2)), m.group(3)
        else:
            i, block_type, j, suffix = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        if block_type == "resnets":
            s = _RESNET_DIFFUSERS.get(suffix)
            sub = 0
        else:
            s = _attn_dotted(suffix)
            sub = 1
        if s is None:
            return None
        if kind == "down":
            if j > 1:
                return None
            return f"input_blocks.{1 + 3 * i + j}.{sub}.{s}"
        if kind == "mid":
            if block_type == "attentions":
                return f"middle_block.1.{s}" if j == 0 else None
            return f"middle_block.{2 * j}.{s}" if j <= 1 else None
        if j > 2:
            return None
        return f"output_blocks.{3 * i + j}.{sub}.{s}"
    return None


def _ldm_suffix(sub: int, suffix: str, where: str) -> str | None:
    if sub == 0:
        if suffix in _RESNET_LDM:
            return _RESNET_LDM[suffix]
        if suffix == "op" and where == "input":
            return "op"
        return None
    if suffix == "conv" and where == "output":
        return "conv"
    if sub == 1 or where == "middle":
        return _attn_dotted(suffix)
    return None


def _ldm_unet_rest_to_ldm(rest: str) -> str | None:
    if rest == "input_blocks_0_0":
        return "input_blocks.0.0"
    if m := _RE_L_TIME.match(rest):
        return f"time_embed.{m.group(1)}"
    if m := _RE_L_LABEL.match(rest):
        return f"label_emb.0.{m.group(1)}"
    if m := _RE_L_OUT.match(rest):
        return f"out.{m.group(1)}"
    if m := _RE_L_IO.match(rest):
        where = "input" if m.group(1) == "input_blocks" else "output"
        n, sub, suffix = int(m.group(2)), int(m.group(3)), m.group(4)
        if where == "input" and n == 0:
            return None
        s = _ldm_suffix(sub, suffix, where)
        return None if s is None else f"{m.group(1)}.{n}.{sub}.{s}"
    if m := _RE_L_MID.match(rest):
        sub, suffix = int(m.group(1)), m.group(2)
        if sub in (0, 2):
            s = _RESNET_LDM.get(suffix)
        elif sub == 1:
            s = _attn_dotted(suffix)
        else:
            s = None
        return None if s is None else f"middle_block.{sub}.{s}"
    return None


def unet_rest_to_ldm(rest: str, arch: str = "sd1") -> str | None:
    """UNet name after ``lora_unet_`` (either naming) → ldm/sgm dotted path, or None if unknown."""
    if rest.startswith(
        ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
    ):
        return _ldm_unet_rest_to_ldm(rest)
    return _diffusers_unet_rest_to_ldm(rest, arch)


# --------------------------------------------------------------------------------------------------
# UNet: ldm dotted path → diffusers dotted path


def ldm_to_diffusers_unet(path: str) -> str | None:
    """ldm/sgm UNet path (``input_blocks.1.1.proj_in``) → diffusers path (``down_blocks.0.attentions.0.proj_in``).

    None when the module has no diffusers counterpart or the path is not a known UNet module.
    """
    simple = {
        "input_blocks.0.0": "conv_in",
        "out.2": "conv_out",
        "out.0": "conv_norm_out",
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1",
        "label_emb.0.2": "add_embedding.linear_2",
    }
    if path in simple:
        return simple[path]
    if m := _RE_C_IO.match(path):
        where, n, sub, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if where == "input_blocks":
            if n == 0:
                return None
            i, j = divmod(n - 1, 3)
            if j == 2:
                return f"down_blocks.{i}.downsamplers.0.conv" if (sub == 0 and suffix == "op") else None
            if sub == 0 and suffix in _RESNET_C:
                return f"down_blocks.{i}.resnets.{j}.{_RESNET_LDM_TO_DIFFUSERS[suffix]}"
            if sub == 1 and _RE_C_ATTN.match(suffix):
                return f"down_blocks.{i}.attentions.{j}.{suffix}"
            return None
        i, j = divmod(n, 3)
        if suffix == "conv" and sub in (1, 2):
            return f"up_blocks.{i}.upsamplers.0.conv" if j == 2 else None
        if sub == 0 and suffix in _RESNET_C:
            return f"up_blocks.{i}.resnets.{j}.{_RESNET_LDM_TO_DIFFUSERS[suffix]}"
        if sub == 1 and _RE_C_ATTN.match(suffix):
            return f"up_blocks.{i}.attentions.{j}.{suffix}"
        return None
    if m := _RE_C_MID.match(path):
        sub, suffix = int(m.group(1)), m.group(2)
        if sub in (0, 2) and suffix in _RESNET_C:
            return f"mid_block.resnets.{sub // 2}.{_RESNET_LDM_TO_DIFFUSERS[suffix]}"
        if sub == 1 and _RE_C_ATTN.match(suffix):
            return f"mid_block.attentions.0.{suffix}"
    return None


def _is_ldm_unet_path(path: str) -> bool:
    return unet_rest_to_ldm(path.replace(".", "_")) == path


def _diffusers_name_if_exact(path: str, arch: str) -> str | None:
    """The diffusers path of an ldm UNet path when reading it back (our rules, which are A1111's
    ``convert_diffusers_name_to_compvis``) gives the same module; else None.

    The diffusers grammar fixes the SD layout: SD1/SD2's ``up_blocks.0`` has no attention, so its upsampler
    is read back as ``output_blocks.2.1.conv``. A UNet with attention at the lowest resolution (the measuring
    world: ``output_blocks.2.2.conv``) has no diffusers name that reads back; callers then use the ldm name,
    which A1111, Forge and ComfyUI read for every layout.
    """
    d = ldm_to_diffusers_unet(path)
    if d is None or unet_rest_to_ldm(d.replace(".", "_"), arch) != path:
        return None
    return d


# --------------------------------------------------------------------------------------------------
# public: kohya ↔ canonical


def kohya_to_canonical(kohya_module_name: str, arch: str = "sd1") -> str | None:
    """kohya module name (the part of a key before the first ``.``) → canonical key, or None.

    ``arch`` decides what ``lora_te_`` means (SD1: transformers CLIP; SD2: OpenCLIP, q/k/v into the fused
    ``in_proj``; SDXL: no such names, None) and where SDXL's diffusers-style upsamplers sit. ``"unknown"``
    reads names with the SD1 rules.
    """
    arch = _check_arch(arch)
    name = kohya_module_name
    if name.startswith("lora_unet_"):
        p = unet_rest_to_ldm(name[len("lora_unet_") :], arch)
        return None if p is None else UNET_PREFIX + p
    for prefix, part in (("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te")):  # noqa: B007 - read after the break
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            break
    else:
        return None
    openclip = part == "te2" or (part == "te" and arch == "sd2")
    root = {"te1": TE_SDXL1_PREFIX, "te2": TE_SDXL2_PREFIX}.get(part)
    if part == "te":
        if arch == "sdxl":
            return None
        root = TE_SD2_PREFIX if arch == "sd2" else TE_SD1_PREFIX
    assert root is not None
    if rest == "text_model_final_layer_norm":
        return root + ("ln_final" if openclip else "text_model.final_layer_norm")
    m = _RE_HF_LAYER.match(rest)
    if not m:
        return None
    layer, sub = m.group(1), m.group(2)
    if openclip:
        return f"{root}transformer.resblocks.{layer}.{_HF_TO_OPENCLIP[sub]}"
    return f"{root}text_model.encoder.layers.{layer}.{_HF_DOTTED[sub]}"


def _te_hf_rest(key: str) -> tuple[str, str] | None:
    """Canonical TE key → (part, HF underscore rest) with part in te/te1/te2, or None."""
    for root, part, openclip in (
        (TE_SD1_PREFIX, "te", False),
        (TE_SD2_PREFIX, "te", True),
        (TE_SDXL1_PREFIX, "te1", False),
        (TE_SDXL2_PREFIX, "te2", True),
    ):
        if not key.startswith(root):
            continue
        rest = key[len(root) :]
        if openclip:
            if rest == "ln_final":
                return part, "text_model_final_layer_norm"
            m = _RE_C_OPENCLIP.match(rest)
            if not m:
                return None
            return part, f"text_model_encoder_layers_{m.group(1)}_{_OPENCLIP_TO_HF[m.group(2)]}"
        if rest == "text_model.final_layer_norm":
            return part, "text_model_final_layer_norm"
        m = _RE_C_HF.match(rest)
        if not m:
            return None
        return part, f"text_model_encoder_layers_{m.group(1)}_{_HF_UNDERSCORED[m.group(2)]}"
    return None


#: Forge's text encoders (``forge_objects.clip.cond_stage_model.<name>.transformer``, transformers names)
#: ↔ canonical prefixes: SD1 ``clip_l``, SD2 ``clip_h`` (OpenCLIP ViT-H), SDXL ``clip_l`` + ``clip_g`` (bigG)
FORGE_TEXT_ENCODERS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd1": (("clip_l", TE_SD1_PREFIX),),
    "sd2": (("clip_h", TE_SD2_PREFIX),),
    "sdxl": (("clip_l", TE_SDXL1_PREFIX), ("clip_g", TE_SDXL2_PREFIX)),
}


def te_hf_module_path(key: str) -> str | None:
    """Path of a canonical text-encoder key inside a transformers-named CLIP text model, or None (a UNet
    key, or a TE key with no such module).

    Forge / ComfyUI (``ldm_patched``) build every text encoder with transformers names and separate q/k/v
    Linears, SDXL's OpenCLIP bigG and SD2's ViT-H included, so the fused OpenCLIP selectors map to those:
    ``conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj:q`` →
    ``text_model.encoder.layers.3.self_attn.q_proj``; ``…mlp.c_fc`` → ``…mlp.fc1``;
    ``cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj`` → itself without the prefix.
    """
    hit = _te_hf_rest(key)
    if hit is None:
        return None
    rest = hit[1]
    if rest == "text_model_final_layer_norm":
        return "text_model.final_layer_norm"
    m = _RE_HF_LAYER.match(rest)
    return f"text_model.encoder.layers.{m.group(1)}.{_HF_DOTTED[m.group(2)]}" if m else None


def canonical_part(key: str) -> str:
    """``"unet"``, ``"te"`` (SD1/SD2), ``"te1"`` or ``"te2"`` (SDXL) for a canonical key; ``"?"`` otherwise."""
    if key.startswith(UNET_PREFIX):
        return "unet"
    if key.startswith((TE_SD1_PREFIX, TE_SD2_PREFIX)):
        return "te"
    if key.startswith(TE_SDXL1_PREFIX):
        return "te1"
    if key.startswith(TE_SDXL2_PREFIX):
        return "te2"
    return "?"


def canonical_arch(key: str) -> str | None:
    """The architecture a canonical key implies by itself (TE keys), or None (UNet keys are shared)."""
    if key.startswith(TE_SD1_PREFIX):
        return "sd1"
    if key.startswith(TE_SD2_PREFIX):
        return "sd2"
    if key.startswith((TE_SDXL1_PREFIX, TE_SDXL2_PREFIX)):
        return "sdxl"
    return None


def is_canonical(key: str) -> bool:
    """True if ``key`` is a canonical key this module knows how to name in every format."""
    if key.startswith(UNET_PREFIX):
        return _is_ldm_unet_path(key[len(UNET_PREFIX) :])
    return _te_hf_rest(key) is not None


def canonical_to_kohya(key: str, arch: str, unet_style: str | None = None) -> str:
    """Canonical key → kohya module name, as loaders expect it.

    SD1/SD2 UNet: diffusers-style names (``lora_unet_down_blocks_0_attentions_0_…``; what kohya writes and
    what A1111, Forge, ComfyUI *and* diffusers load), falling back to ldm names for modules diffusers lacks;
    SDXL UNet: sgm names (``lora_unet_input_blocks_4_1_…``). ``unet_style`` ("diffusers" | "ldm") overrides.
    TE: ``lora_te_`` (SD1/SD2), ``lora_te1_``/``lora_te2_`` (SDXL), always with transformers names
    (OpenCLIP ``attn.in_proj:q`` → ``self_attn_q_proj``).

    Raises:
        ValueError: ``key`` is not a canonical key, or ``arch`` is not sd1/sd2/sdxl.
    """
    if arch not in ARCHS:
        raise ValueError(f"canonical_to_kohya needs arch sd1, sd2 or sdxl, got {arch!r}")
    if key.startswith(UNET_PREFIX):
        path = key[len(UNET_PREFIX) :]
        if not _is_ldm_unet_path(path):
            raise ValueError(f"{key!r} is not a known UNet module")
        style = unet_style or ("ldm" if arch == "sdxl" else "diffusers")
        if style == "diffusers":
            d = _diffusers_name_if_exact(path, arch)
            if d is not None:
                return "lora_unet_" + d.replace(".", "_")
        return "lora_unet_" + path.replace(".", "_")
    te = _te_hf_rest(key)
    if te is None:
        raise ValueError(f"{key!r} is not a canonical key (see docs/DESIGN.md)")
    part, rest = te
    return {"te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}[part] + rest


# --------------------------------------------------------------------------------------------------
# diffusers / PEFT names

_UNET_TOP = (
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding.",
    "add_embedding.",
)


def _normalise_diffusers_path(path: str, te: bool) -> str:
    """Attention-processor and old Mix-of-Show spellings → plain module paths."""
    path = path.replace(".processor.", ".")
    path = path.removesuffix(".processor")
    if te:
        path = re.sub(r"\.to_([qkv])_lora$", r".\1_proj", path)
        path = re.sub(r"\.to_out_lora$", ".out_proj", path)
        path = re.sub(r"\.((?:q|k|v|out)_proj|fc1|fc2)_lora$", r".\1", path)
    else:
        path = re.sub(r"\.(to_[qkv])_lora$", r".\1", path)
        path = re.sub(r"\.to_out_lora$", ".to_out.0", path)
        path = re.sub(r"\.(to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2)_lora$", r".\1", path)
    return path


def diffusers_to_canonical(name: str, arch: str = "sd1", component: str | None = None) -> str | None:
    """diffusers / PEFT module name → canonical key, or None.

    ``name`` is a dotted module path with its component prefix (``unet.``, ``text_encoder.``,
    ``text_encoder_2.``; a leading ``base_model.model.`` is ignored), or without one when ``component``
    ("unet" | "text_encoder" | "text_encoder_2") says where it belongs. Processor-style names
    (``attn1.processor.to_q_lora``, ``to_out_lora``) are understood.
    """
    arch = _check_arch(arch)
    path = name.removeprefix("base_model.model.")
    comp = component
    if comp is None:
        for c in ("unet", "text_encoder_2", "text_encoder"):
            if path.startswith(c + "."):
                comp, path = c, path[len(c) + 1 :]
                break
        else:
            if path.startswith(_UNET_TOP):
                comp = "unet"
            elif path.startswith("text_model."):
                comp = "text_encoder"
            else:
                return None
    if comp == "unet":
        path = _normalise_diffusers_path(path, te=False)
        return kohya_to_canonical("lora_unet_" + path.replace(".", "_"), arch)
    if comp in ("text_encoder", "text_encoder_2"):
        path = _normalise_diffusers_path(path, te=True)
        prefix = "lora_te2_" if comp == "text_encoder_2" else "lora_te1_" if arch == "sdxl" else "lora_te_"
        return kohya_to_canonical(prefix + path.replace(".", "_"), arch)
    return None


def canonical_to_diffusers(key: str, arch: str) -> str:
    """Canonical key → diffusers module name with its component prefix.

    ``model.diffusion_model.input_blocks.1.1.proj_in`` → ``unet.down_blocks.0.attentions.0.proj_in``;
    ``conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj:q`` →
    ``text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj``.

    Raises:
        ValueError: no diffusers counterpart.
    """
    if arch not in ARCHS:
        raise ValueError(f"canonical_to_diffusers needs arch sd1, sd2 or sdxl, got {arch!r}")
    if key.startswith(UNET_PREFIX):
        d = _diffusers_name_if_exact(key[len(UNET_PREFIX) :], arch)
        if d is None:
            raise ValueError(f"{key!r} has no diffusers UNet counterpart (in the standard {arch} layout)")
        return "unet." + d
    te = _te_hf_rest(key)
    if te is None:
        raise ValueError(f"{key!r} is not a canonical key")
    part, rest = te
    comp = "text_encoder_2" if part == "te2" else "text_encoder"
    if rest == "text_model_final_layer_norm":
        return f"{comp}.text_model.final_layer_norm"
    m = _RE_HF_LAYER.match(rest)
    assert m is not None
    return f"{comp}.text_model.encoder.layers.{m.group(1)}.{_HF_DOTTED[m.group(2)]}"


#: UNet modules outside the blocks kohya sd-scripts wraps (``Transformer2DModel``, ``ResnetBlock2D``,
#: ``Downsample2D``, ``Upsample2D``), as ldm paths below ``model.diffusion_model.`` → their diffusers names.
#: kohya never builds LoRA modules for them, so its image generator, ``merge_lora.py`` and
#: ``create_network_from_weights`` skip their weights (an INFO line at most); diffusers' kohya loader
#: (0.31) cannot name them either. A1111, Forge and ComfyUI load them.
OUTSIDE_KOHYA_BLOCKS: dict[str, str] = {
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}

#: loader name → what it does with the modules :func:`loader_gaps` lists for it
LOADER_GAP_NOTES: dict[str, str] = {
    "kohya sd-scripts": "never builds these modules; its generator and merge_lora.py skip them",
    "diffusers": "cannot name these modules (SD1/SD2: skipped with a warning; SDXL: the file fails to load)",
}


def diffusers_kohya_gaps(keys: Iterable[str]) -> list[str]:
    """Canonical keys whose kohya names diffusers' kohya loader (0.31) cannot name.

    ``conv_in``/``conv_out``/``time_embedding``/``add_embedding`` LoRAs: in SD1/SD2 files diffusers skips them
    with a warning; in SDXL (sgm-named) files its block mapper raises, so the whole file fails to load there.
    A1111, Forge and ComfyUI load them. Callers that target diffusers can leave these modules out.
    """
    return [k for k in keys if k.startswith(UNET_PREFIX) and k[len(UNET_PREFIX) :] in OUTSIDE_KOHYA_BLOCKS]


def kohya_loader_gaps(keys: Iterable[str], arch: str) -> list[str]:
    """Canonical keys kohya sd-scripts' loaders ignore in a kohya file for ``arch``.

    The UNet modules outside kohya's blocks (:data:`OUTSIDE_KOHYA_BLOCKS`: ``conv_in``, ``conv_out``,
    ``conv_norm_out``, ``time_embed``/``time_embedding``, ``label_emb``/``add_embedding``), and for SD1/SD2
    (where kohya's UNet has diffusers module names) any UNet module written under an ldm name because the
    model's layout has no diffusers name that reads back (e.g. the measuring world's ``output_blocks.2.2.conv``).
    """
    out = []
    for k in keys:
        if not k.startswith(UNET_PREFIX):
            continue
        path = k[len(UNET_PREFIX) :]
        ldm_named = (
            arch in ("sd1", "sd2") and is_canonical(k) and _diffusers_name_if_exact(path, arch) is None
        )
        if path in OUTSIDE_KOHYA_BLOCKS or ldm_named:
            out.append(k)
    return out


def loader_gaps(keys: Iterable[str], arch: str) -> dict[str, list[str]]:
    """``{loader: [canonical keys it ignores]}`` for a kohya file of ``arch`` holding ``keys`` (only loaders
    that ignore something; see :data:`LOADER_GAP_NOTES` for what each does)."""
    ks = list(keys)
    gaps = {"kohya sd-scripts": kohya_loader_gaps(ks, arch), "diffusers": diffusers_kohya_gaps(ks)}
    return {name: sorted(v) for name, v in gaps.items() if v}


def gap_label(key: str) -> str:
    """A short readable name of a canonical UNet key for messages: ``out.2 (conv_out)``."""
    path = key.removeprefix(UNET_PREFIX)
    d = OUTSIDE_KOHYA_BLOCKS.get(path)
    return f"{path} ({d})" if d else path


def format_loader_gaps(gaps: dict[str, list[str]], limit: int = 6) -> list[str]:
    """One line per loader of :func:`loader_gaps`: ``kohya sd-scripts ignores 2 modules (…): out.2 (conv_out), …``."""
    lines = []
    for name, keys in gaps.items():
        shown = ", ".join(gap_label(k) for k in keys[:limit])
        more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
        n = len(keys)
        lines.append(
            f"{name} ignores {n} module{'s' if n != 1 else ''} ({LOADER_GAP_NOTES.get(name, '')}): "
            f"{shown}{more}"
        )
    return lines


# --------------------------------------------------------------------------------------------------
# sub-models and module resolution


def canonical_to_module_path(key: str, root: str) -> str | None:
    """Path of a canonical key inside a bare sub-model, or None if the key is not under it.

    ``root`` is a canonical prefix (``"model.diffusion_model."``, ``"cond_stage_model.transformer."``, …)
    or a short name from :data:`SUBMODEL_ROOTS` (``"unet"``, ``"te"``, ``"sd2_te"``, ``"te1"``, ``"te2"``).
    Fused keys keep their selector: ``transformer.resblocks.0.attn.in_proj:q``.
    """
    prefix = SUBMODEL_ROOTS.get(root, root)
    if prefix and not prefix.endswith("."):
        prefix += "."
    if not key.startswith(prefix):
        return None
    return key[len(prefix) :]


def module_path_to_canonical(path: str, root: str) -> str:
    """Inverse of :func:`canonical_to_module_path`."""
    prefix = SUBMODEL_ROOTS.get(root, root)
    if prefix and not prefix.endswith("."):
        prefix += "."
    return prefix + path


_FUSED = {"q": 0, "k": 1, "v": 2}


def split_fused(key: str) -> tuple[str, str | None]:
    """``"….attn.in_proj:q"`` → ``("….attn", "q")`` (the MultiheadAttention's path); else ``(key, None)``."""
    if ":" not in key:
        return key, None
    path, part = key.rsplit(":", 1)
    if part not in _FUSED or (not path.endswith(".in_proj") and path != "in_proj"):
        raise KeyError(f"unknown fused-row selector in {key!r} (expected …in_proj:q, :k or :v)")
    return path[: -len(".in_proj")] if path.endswith(".in_proj") else "", part


def fused_rows(part: str, total_rows: int) -> slice:
    """Row block of ``part`` ("q" | "k" | "v") in a fused ``in_proj_weight`` with ``total_rows`` rows."""
    d = total_rows // 3
    i = _FUSED[part]
    return slice(i * d, (i + 1) * d)


def resolve_module(model: nn.Module, key: str, root: str = "") -> tuple[nn.Module, slice | None]:
    """The module a canonical key targets in ``model`` and, for ``…in_proj:q|k|v``, the row slice of its
    ``in_proj_weight`` (else None).

    ``model``'s module paths are canonical keys below ``root`` (``""`` for a whole WebUI model object;
    e.g. ``"unet"`` or ``"model.diffusion_model."`` for the ldm UNet alone).

    Raises:
        KeyError: the key is not under ``root`` or the module does not exist.
    """
    path = canonical_to_module_path(key, root) if root else key
    if path is None:
        raise KeyError(f"{key!r} is not inside the sub-model rooted at {root!r}")
    mpath, part = split_fused(path)
    try:
        module = model.get_submodule(mpath) if mpath else model
    except AttributeError as e:
        raise KeyError(f"the model has no module {mpath!r} (for key {key!r})") from e
    if part is None:
        return module, None
    w = getattr(module, "in_proj_weight", None)
    if not isinstance(w, torch.Tensor):
        raise KeyError(f"{mpath!r} has no fused in_proj_weight (for key {key!r})")
    return module, fused_rows(part, w.shape[0])


def weight_key_to_canonical(state_key: str) -> list[str]:
    """Canonical key(s) of a state-dict weight key (3 keys for a fused ``in_proj_weight``)."""
    if state_key.endswith("in_proj_weight"):
        base = state_key[: -len("in_proj_weight")]
        return [f"{base}in_proj:{p}" for p in "qkv"]
    if state_key.endswith(".weight"):
        return [state_key[: -len(".weight")]]
    return []


def conv_kernel_size(key: str, arch: str) -> int | None:
    """Kernel size of the target weight for conv modules of the SD UNet (3 or 1), None for linear layers.

    ``proj_in``/``proj_out`` are 1×1 convs in SD1 and linear layers in SD2/SDXL (``use_linear_in_transformer``).
    Used to give shapeless formats (LoHa, ED-LoRA) the module's true weight shape.
    """
    if not key.startswith(UNET_PREFIX):
        return None
    path = key[len(UNET_PREFIX) :]
    last = path.rsplit(".", 1)[-1]
    if (
        path in ("input_blocks.0.0", "out.2")
        or path.endswith((".in_layers.2", ".out_layers.3", ".op"))
        or last == "conv"
    ):
        return 3
    if path.endswith(".skip_connection"):
        return 1
    if last in ("proj_in", "proj_out"):
        return 1 if arch in ("sd1", "unknown") else None
    return None
