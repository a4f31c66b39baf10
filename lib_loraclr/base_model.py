"""Build the base model a merge runs on from a checkpoint FILE (never from a live WebUI model, which may
hold patched LoRA deltas): the bundled tiny checkpoints, or a full SD1.x or SDXL-family checkpoint rebuilt
from the real classes (ldm UNet, transformers CLIP-L; for SDXL the sgm UNet layout and the OpenCLIP bigG
text tower)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lib_loraclr.errors import LoraclrError, NonFiniteWeightsError
from lib_loraclr.validate import MAX_BASE_PARAMS, check_input_file


class BaseModelError(LoraclrError):
    """The base checkpoint cannot be used for a merge."""


#: Builds a UNet from its sizes: ``factory(UNetConfig) -> nn.Module`` for SD1 (``factory(SDXLUNetSpec)``
#: for SDXL) whose module names follow ldm's / sgm's layout (``input_blocks`` / ``middle_block`` /
#: ``output_blocks`` / ``out``, ``attn1``/``attn2`` with ``to_q``/``to_k``/``to_v``/``to_out.0``; SDXL also
#: ``label_emb.0.{0,2}``) and whose ``forward(x, timesteps=…, context=…)`` (SDXL: ``y=…`` too) returns ε.
UNetFactory = Callable[[Any], torch.nn.Module]


def load_base(
    path: str | os.PathLike[str],
    tokenizer: Any = None,
    unet_factory: UNetFactory | None = None,
    *,
    half_storage: bool = True,
) -> torch.nn.Module:
    """A base model the pipeline can drive: a tiny reference checkpoint, a full SD1.x or a full SDXL-family
    checkpoint (SDXL, Pony, Illustrious, …), recognised from its tensor names and shapes.

    Full checkpoints are rebuilt on the meta device from the real classes and their tensors assigned one by
    one (no second copy of the weights): SD1 = ldm UNet + transformers CLIP-L, as float32; SDXL = the sgm
    UNet (`lib_loraclr.models.sdxl_unet`), CLIP-L and the OpenCLIP bigG text tower, as `SDXLModel`. The VAE is
    not needed. Other architectures (SD2, SDXL refiner, SD3, Flux, …) raise BaseModelError.
    ``tokenizer``: a CLIP tokenizer to use (the WebUI's own); default: generated offline from open_clip's BPE.
    ``unet_factory``: builds the UNet instead of the library's class (a host without the ``ldm`` package
    passes its own, see `UNetFactory`): called with a `UNetConfig` for SD1 and an `SDXLUNetSpec` for SDXL,
    on the meta device; every UNet weight of the file must fit it exactly (missing or extra keys raise
    BaseModelError). Tiny reference checkpoints always use their own classes.
    ``half_storage`` (SDXL only): fp16/bf16 weights of plain Linear/Conv2d layers stay in the file's dtype
    and compute in float32 (`lib_loraclr.models.half`; about 7 instead of 14 GB for SDXL in fp16); the
    merge turns the layers its LoRAs target back into float32 before adding deltas.
    """
    from safetensors import safe_open

    from lib_loraclr.models.sd import CONFIG_METADATA_KEY, load_tiny_checkpoint
    from lib_loraclr.safeio import read_safetensors_metadata

    p = check_input_file(path, "base checkpoint")  # InputFileError: missing, a folder, unreadable
    if p.suffix != ".safetensors":
        raise BaseModelError(f"{p.name}: only .safetensors checkpoints are read (no pickles)")
    meta = read_safetensors_metadata(p)  # validates the header first (clear errors for bad files)
    if CONFIG_METADATA_KEY in meta:
        _check_tiny_checkpoint(p, meta[CONFIG_METADATA_KEY])  # before allocating anything
        return _check_finite_weights(p, load_tiny_checkpoint(p))
    with safe_open(str(p), framework="pt") as f:
        kind = checkpoint_kind(f.keys())
    if kind == "sd1":
        return _load_sd1(p, tokenizer, unet_factory)
    if kind == "sdxl":
        return _load_sdxl(p, tokenizer, unet_factory, half_storage=half_storage)
    if kind == "sdxl_refiner":
        raise BaseModelError(
            f"{p.name} is an SDXL refiner (one OpenCLIP text encoder, no CLIP-L); concept LoRAs are trained on "
            "an SDXL base model: pick that checkpoint as the merge base"
        )
    raise BaseModelError(
        f"{p.name} is not an SD1.x checkpoint in the original (ldm) key layout nor an SDXL-family one (sgm "
        "layout); the headless merge supports SD1.x, SDXL (Pony, Illustrious, …) and the bundled tiny models"
    )


_SD1_TE = "cond_stage_model.transformer."
_XL_TE1 = "conditioner.embedders.0.transformer."
_XL_TE2 = "conditioner.embedders.1.model."
_UNET = "model.diffusion_model."
#: tensors a checkpoint may hold or lack: unused by the merge, filled with their fixed values when absent
_OPTIONAL_SDXL = (_XL_TE2 + "logit_scale",)


def checkpoint_kind(keys: Any) -> str:
    """``"sd1"`` | ``"sdxl"`` | ``"sdxl_refiner"`` | ``"other"`` from a full checkpoint's tensor names.

    sd1: ldm UNet with attention at ``input_blocks.1`` and CLIP-L at ``cond_stage_model.transformer``;
    sdxl: sgm UNet with the ``label_emb`` vector input, CLIP-L at ``conditioner.embedders.0.transformer``
    and OpenCLIP at ``conditioner.embedders.1.model``; sdxl_refiner: OpenCLIP alone at
    ``conditioner.embedders.0.model``. SD2 (``cond_stage_model.model``), SD3, Flux, … are "other".
    """
    names = set(keys)
    if (
        _SD1_TE + "text_model.embeddings.token_embedding.weight" in names
        and _UNET + "input_blocks.1.1.proj_in.weight" in names
    ):
        return "sd1"
    if _UNET + "label_emb.0.0.weight" in names:
        if _XL_TE1 + "text_model.embeddings.token_embedding.weight" in names and (
            _XL_TE2 + "token_embedding.weight" in names
        ):
            return "sdxl"
        if "conditioner.embedders.0.model.token_embedding.weight" in names:
            return "sdxl_refiner"
    return "other"


def _read_sizes(
    f: Any,
    p: Path,
    parts: tuple[str, ...],
    from_shapes: Callable[[dict[str, tuple[int, ...]]], dict],
    what: str,
) -> tuple[list[str], dict[str, tuple[int, ...]], dict]:
    """``(names, shapes, config dict)`` of an open safetensors file's tensors under ``parts``, the sizes read
    from the shapes by ``from_shapes``; BaseModelError when they cannot be read (a damaged file)."""
    names = [n for n in f.keys() if n.startswith(parts)]  # noqa: SIM118 (safe_open is not iterable)
    shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
    try:
        return names, shapes, from_shapes(shapes)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise BaseModelError(
            f"{p.name}: the weights are incomplete or mis-shaped (reading the sizes failed at {e}); "
            f"the checkpoint is damaged or not {what}. Download it again"
        ) from None


def _load_sd1(p: Path, tokenizer: Any, unet_factory: UNetFactory | None) -> torch.nn.Module:
    """A full SD1.x checkpoint as `SD1Model` (float32), see `load_base`."""
    from safetensors import safe_open

    from lib_loraclr.models.sd import SD1Config, SD1Model

    parts = (_UNET, _SD1_TE)
    with safe_open(str(p), framework="pt") as f:
        names, shapes, sizes = _read_sizes(f, p, parts, sd1_config_from_shapes, "SD1.x")
        cfg = SD1Config.from_dict(sizes)
        # Build on the meta device and assign the file's tensors (one fp32 copy of the weights in memory,
        # converted tensor by tensor): about 4 GB for SD1.5 instead of three copies.
        with torch.device("meta"):
            model = SD1Model(cfg, tokenizer=tokenizer, unet_factory=unet_factory)
        _check_shapes(p, model.state_dict(), shapes, extra_ok=unet_factory is None, prefixes=parts)
        sd = {n: _as_float(f.get_tensor(n)) for n in names}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    del sd
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing:
        raise BaseModelError(f"{p.name} lacks {len(missing)} weights of an SD1 model, e.g. {missing[:3]}")
    unexpected = [u for u in unexpected if not u.endswith("position_ids")]
    if unet_factory is not None and unexpected:
        raise BaseModelError(
            f"the host's UNet does not fit {p.name}: {len(unexpected)} weights have no place "
            f"in it, e.g. {unexpected[:3]}"
        )
    _fill_meta_buffers(model)
    return _check_finite_weights(p, model.eval())


def _load_sdxl(
    p: Path, tokenizer: Any, unet_factory: UNetFactory | None, *, half_storage: bool
) -> torch.nn.Module:
    """A full SDXL-family checkpoint as `SDXLModel`, see `load_base`. Every UNet and text-encoder tensor
    of the file must have its place in the model and every weight of the model must be in the file."""
    from safetensors import safe_open

    from lib_loraclr.models.half import HALF_DTYPES, half_storable, store_half
    from lib_loraclr.models.sd import SDXLConfig, SDXLModel

    parts = (_UNET, _XL_TE1, _XL_TE2)
    with safe_open(str(p), framework="pt") as f:
        names, shapes, sizes = _read_sizes(f, p, parts, sdxl_config_from_shapes, "an SDXL base model")
        cfg = SDXLConfig.from_dict(sizes)
        with torch.device("meta"):
            model = SDXLModel(cfg, tokenizer=tokenizer, unet_factory=unet_factory)
        expected = model.state_dict()
        for k in _OPTIONAL_SDXL:  # shape-checked when present, filled below when absent
            if k in shapes and tuple(shapes[k]) != tuple(expected[k].shape):
                raise BaseModelError(
                    f"{p.name}: tensor {k!r} has shape {list(shapes[k])} but its model needs "
                    f"{list(expected[k].shape)}; the checkpoint is damaged or mixes two models"
                )
        required = {k: v for k, v in expected.items() if k not in _OPTIONAL_SDXL}
        present = {k: s for k, s in shapes.items() if k not in _OPTIONAL_SDXL}
        _check_shapes(p, required, present, extra_ok=False, prefixes=parts)
        halves = half_storable(model) if half_storage else set()
        keep = {f"{m}.{leaf}" for m in halves for leaf in ("weight", "bias")}
        sd = {}
        for n in names:  # tensor by tensor: the fp32 copy of one tensor at a time beside the model
            t = f.get_tensor(n)
            sd[n] = t if (n in keep and t.dtype in HALF_DTYPES) else _as_float(t)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    del sd
    missing = [m for m in missing if not m.endswith("position_ids") and m not in _OPTIONAL_SDXL]
    unexpected = [u for u in unexpected if not u.endswith("position_ids")]  # a buffer in some versions
    if missing or unexpected:  # _check_shapes has named them already; a host class may differ in buffers
        raise BaseModelError(
            f"{p.name} does not fit an SDXL model: missing {missing[:3]}, no place for {unexpected[:3]}"
        )
    store_half(model, halves)
    _fill_meta_buffers(model)
    return _check_finite_weights(p, model.eval())


def _fill_meta_buffers(model: torch.nn.Module) -> None:
    """Give values to what a checkpoint does not store (still on the meta device after loading): the noise
    schedule, ``position_ids``, OpenCLIP's causal ``attn_mask`` and ``logit_scale``. BaseModelError for
    anything else."""
    from lib_loraclr.models.openclip_text import causal_mask
    from lib_loraclr.models.sd import sd_alphas_cumprod

    for mod_name, mod in model.named_modules():  # non-persistent buffers are not in the file
        for b_name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                full = f"{mod_name}.{b_name}" if mod_name else b_name
                if b_name == "alphas_cumprod":
                    value = sd_alphas_cumprod()
                elif b_name == "position_ids":
                    value = torch.arange(buf.shape[-1]).expand(buf.shape)
                elif b_name == "attn_mask":
                    value = causal_mask(buf.shape[-1])
                else:
                    raise BaseModelError(f"internal: buffer {full} was not initialised")
                mod.register_buffer(b_name, value.to(buf.dtype), persistent=False)
        for p_name, param in list(mod.named_parameters(recurse=False)):
            if param.is_meta:
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if p_name != "logit_scale":
                    raise BaseModelError(f"internal: weight {full} was not loaded")
                mod.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)), requires_grad=False)
    for mod in model.modules():  # files store position_ids as int64, some as float: assign=True keeps theirs
        ids = getattr(mod, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_floating_point():
            mod.position_ids = ids.round().long()  # stays a (persistent or not) buffer


#: a tiny config's integers and lists stay below these (checked before the model is built even on meta)
_MAX_CONFIG_INT = 16384
_MAX_CONFIG_COUNT = 128  # layers, res blocks, transformer depth, heads
_COUNT_FIELDS = ("layers", "num_res_blocks", "transformer_depth", "num_heads", "heads")
_MAX_CONFIG_LIST = 16


def _check_config_values(p: Path, key: str, obj: object, where: str = "") -> None:
    """Refuse absurd numbers in a tiny config (a million layers, a 10⁹-channel UNet) before building it."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_config_values(p, key, v, f"{where}.{k}" if where else str(k))
        return
    if isinstance(obj, list):
        if len(obj) > _MAX_CONFIG_LIST:
            raise BaseModelError(
                f"{p.name}: metadata {key!r} field {where} lists {len(obj)} values "
                f"(at most {_MAX_CONFIG_LIST}); the checkpoint is damaged. Save it again"
            )
        for i, v in enumerate(obj):
            _check_config_values(p, key, v, f"{where}[{i}]")
        return
    if isinstance(obj, bool) or not isinstance(obj, (int, float)):
        return
    leaf = where.rsplit(".", 1)[-1].split("[")[0]
    ceiling = _MAX_CONFIG_COUNT if leaf in _COUNT_FIELDS else _MAX_CONFIG_INT
    if not math.isfinite(obj) or abs(obj) > ceiling:
        raise BaseModelError(
            f"{p.name}: metadata {key!r} field {where} = {obj!r} is out of range (at most "
            f"{ceiling}); the checkpoint is damaged or not a tiny model. Save it again"
        )


def _check_tiny_checkpoint(p: Path, raw_config: str) -> None:
    """The config metadata of a tiny checkpoint parsed, bounded and matched against the tensors present
    (names and shapes), with no weight allocated. Raises BaseModelError naming the key."""
    from safetensors import safe_open

    from lib_loraclr.models.sd import CONFIG_METADATA_KEY, SD1Config, SD1Model, SDXLConfig, SDXLModel

    key = CONFIG_METADATA_KEY
    try:
        cfg = json.loads(raw_config)
    except json.JSONDecodeError as e:
        raise BaseModelError(
            f"{p.name}: metadata {key!r} is not valid JSON ({e.msg} at character {e.pos}); "
            "the checkpoint is damaged. Save or download it again"
        ) from None
    if not isinstance(cfg, dict):
        raise BaseModelError(f"{p.name}: metadata {key!r} must be a JSON object, got {type(cfg).__name__}")
    kind = cfg.get("kind", "sd1")
    if kind not in ("sd1", "sdxl"):
        raise BaseModelError(f"{p.name}: metadata {key!r} has kind {kind!r}; tiny models are 'sd1' or 'sdxl'")
    _check_config_values(p, key, cfg)
    try:
        with torch.device("meta"):
            model = (
                SD1Model(SD1Config.from_dict(cfg)) if kind == "sd1" else SDXLModel(SDXLConfig.from_dict(cfg))
            )
    except (
        TypeError,
        ValueError,
        AssertionError,
        KeyError,
        IndexError,
        ZeroDivisionError,
        RuntimeError,
    ) as e:
        raise BaseModelError(
            f"{p.name}: metadata {key!r} does not describe a buildable model ({type(e).__name__}: "
            f"{e}); the checkpoint is damaged. Save it again"
        ) from None
    with safe_open(str(p), framework="pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118
    _check_shapes(p, model.state_dict(), shapes, extra_ok=False)


def _check_shapes(
    p: Path,
    expected: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    extra_ok: bool,
    prefixes: tuple[str, ...] = (),
) -> None:
    """The model's state (built on meta) against the file's tensors: size ceiling, missing, extra and
    mis-shaped tensors, each named. Raises BaseModelError."""
    want = {
        k: tuple(v.shape)
        for k, v in expected.items()
        if not k.endswith("position_ids") and (not prefixes or k.startswith(prefixes))
    }
    total = sum(math.prod(s) for s in want.values())
    if total > MAX_BASE_PARAMS:
        raise BaseModelError(
            f"{p.name}: its config asks for a model of {total:.3g} numbers, more than the "
            f"{MAX_BASE_PARAMS:.3g} of any supported base; the checkpoint is damaged"
        )
    missing = sorted(k for k in want if k not in shapes)
    if missing:
        raise BaseModelError(
            f"{p.name} lacks {len(missing)} tensor(s) its model needs, e.g. {missing[0]!r}; the "
            "checkpoint is incomplete or damaged. Download or save it again"
        )
    for k, s in want.items():
        if tuple(shapes[k]) != s:
            raise BaseModelError(
                f"{p.name}: tensor {k!r} has shape {list(shapes[k])} but its model needs "
                f"{list(s)}; the checkpoint is damaged or mixes two models"
            )
    if not extra_ok:
        extra = sorted(
            k
            for k in shapes
            if k not in want and not k.endswith("position_ids") and (not prefixes or k.startswith(prefixes))
        )
        if extra:
            raise BaseModelError(
                f"{p.name} holds {len(extra)} tensor(s) its model has no place for, e.g. "
                f"{extra[0]!r}; the checkpoint does not match its config"
            )


def _check_finite_weights(p: Path, model: torch.nn.Module) -> torch.nn.Module:
    """NonFiniteWeightsError naming the first weight of ``model`` that holds NaN or Inf."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteWeightsError(
                f"{p.name}: weight {name} holds {n_bad} NaN/Inf value(s); the base "
                "checkpoint is broken. Download or save it again"
            )
    return model


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """Weights to fp32; integer tensors (``position_ids``) keep their dtype (an embedding needs int64)."""
    return t.float() if t.is_floating_point() else t


def sd1_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """UNet and text-encoder sizes of an SD1-layout checkpoint read off its weight shapes.

    Assumes SD1's layout rules (2 res blocks per level, 8 heads, spatial transformers with 1×1 conv
    ``proj_in``); the sizes (channels, levels, attention levels, context width, text width/depth) come from
    the file, so SD1.5 and the tiny SD1-layout models load the same way.
    """
    u = "model.diffusion_model."
    mc = shapes[u + "input_blocks.0.0.weight"][0]
    levels = 1 + sum(1 for n in shapes if n.startswith(u + "input_blocks.") and n.endswith(".0.op.weight"))
    mult = [shapes[f"{u}input_blocks.{1 + 3 * i}.0.out_layers.3.weight"][0] // mc for i in range(levels)]
    attn = [2**i for i in range(levels) if f"{u}input_blocks.{1 + 3 * i}.1.proj_in.weight" in shapes]
    ctx = shapes[
        f"{u}input_blocks.{1 + 3 * (attn[0].bit_length() - 1)}.1.transformer_blocks.0.attn2.to_k.weight"
    ][1]
    t = "cond_stage_model.transformer.text_model."
    hidden = shapes[t + "embeddings.token_embedding.weight"][1]
    layers = 1 + max(int(n.split(".")[5]) for n in shapes if n.startswith(t + "encoder.layers."))
    return {
        "unet": {
            "in_channels": shapes[u + "input_blocks.0.0.weight"][1],
            "out_channels": shapes[u + "out.2.weight"][0],
            "model_channels": mc,
            "channel_mult": mult,
            "attention_resolutions": attn,
            "num_heads": 8,
            "context_dim": ctx,
        },
        "text": {
            "hidden_size": hidden,
            "layers": layers,
            "heads": max(1, hidden // 64),
            "intermediate": shapes[t + "encoder.layers.0.mlp.fc1.weight"][0],
            "max_position_embeddings": shapes[t + "embeddings.position_embedding.weight"][0],
        },
    }


def sdxl_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """`SDXLConfig` fields of an sgm-layout checkpoint read off its weight shapes.

    Assumes SDXL's layout rules (64-channel attention heads for the UNet and both text encoders, CLIP-L's
    quick-GELU); everything else comes from the file: levels, res blocks per level, attention levels and
    their transformer depth, context width (te1 + te2 widths), the ``y`` vector width (te2 projection +
    6 size embeddings), text widths and depths. SDXL base gives 320 channels, mult [1, 2, 4], depths
    [0, 2, 10], context 2048, adm 2816, CLIP-L 768 × 12, bigG 1280 × 32.
    """
    u = _UNET
    mc = shapes[u + "input_blocks.0.0.weight"][0]
    levels = 1 + sum(1 for n in shapes if n.startswith(u + "input_blocks.") and n.endswith(".0.op.weight"))
    n_in = _count(shapes, u + "input_blocks.")
    nrb = (n_in - levels) // levels  # input blocks: conv_in, then per level nrb res blocks (+ a downsample)
    if nrb < 1 or 1 + levels * nrb + levels - 1 != n_in:
        raise ValueError(f"{n_in} input blocks for {levels} levels")
    first = [1 + (nrb + 1) * i for i in range(levels)]
    mult = [shapes[f"{u}input_blocks.{b}.0.out_layers.3.weight"][0] // mc for b in first]
    depth = []
    for b in first:
        depth.append(_count(shapes, f"{u}input_blocks.{b}.1.transformer_blocks."))
    attn = [2**i for i in range(levels) if depth[i]]
    lvl = depth.index(next(d for d in depth if d))
    ctx = shapes[f"{u}input_blocks.{first[lvl]}.1.transformer_blocks.0.attn2.to_k.weight"][1]
    adm = shapes[u + "label_emb.0.0.weight"][1]
    t1, t2 = _XL_TE1 + "text_model.", _XL_TE2
    hidden = shapes[t1 + "embeddings.token_embedding.weight"][1]
    width = shapes[t2 + "token_embedding.weight"][1]
    embed = shapes[t2 + "text_projection"][1]
    if ctx != hidden + width:
        raise ValueError(f"context width {ctx} != CLIP-L {hidden} + OpenCLIP {width}")
    if (adm - embed) % 6 or adm <= embed:
        raise ValueError(f"vector width {adm} is not the OpenCLIP projection {embed} + 6 size embeddings")
    return {
        "unet": {
            "in_channels": shapes[u + "input_blocks.0.0.weight"][1],
            "out_channels": shapes[u + "out.2.weight"][0],
            "model_channels": mc,
            "channel_mult": mult,
            "num_res_blocks": nrb,
            "attention_resolutions": attn,
            "transformer_depth": depth,
            "num_head_channels": 64,
        },
        "te1": {
            "hidden_size": hidden,
            "layers": _count(shapes, t1 + "encoder.layers."),
            "heads": max(1, hidden // 64),
            "intermediate": shapes[t1 + "encoder.layers.0.mlp.fc1.weight"][0],
            "max_position_embeddings": shapes[t1 + "embeddings.position_embedding.weight"][0],
        },
        "te2": {
            "width": width,
            "layers": _count(shapes, t2 + "transformer.resblocks."),
            "heads": max(1, width // 64),
            "embed_dim": embed,
        },
        "size_embed_dim": (adm - embed) // 6,
    }


def _count(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    """1 + the highest index N of the names ``prefix + "N.…"`` (0 when none): a module list's length."""
    idx = [int(n[len(prefix) :].split(".", 1)[0]) for n in shapes if n.startswith(prefix)]
    return 1 + max(idx) if idx else 0
