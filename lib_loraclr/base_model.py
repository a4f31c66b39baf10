"""Build the base model a merge runs on from a checkpoint FILE (never from a live WebUI model, which may
hold patched LoRA deltas): the bundled tiny checkpoints, or a full SD1.x checkpoint rebuilt from the real
classes (ldm UNet, transformers CLIP-L)."""

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


#: Builds an SD1 UNet from its sizes: ``factory(UNetConfig) -> nn.Module`` whose module names follow
#: ldm's layout (``input_blocks`` / ``middle_block`` / ``output_blocks`` / ``out``, ``attn1``/``attn2`` with
#: ``to_q``/``to_k``/``to_v``/``to_out.0``) and whose ``forward(x, timesteps=…, context=…)`` returns ε.
UNetFactory = Callable[[Any], torch.nn.Module]


def load_base(
    path: str | os.PathLike[str], tokenizer: Any = None, unet_factory: UNetFactory | None = None
) -> torch.nn.Module:
    """A base model the pipeline can drive: a tiny reference checkpoint, or a full SD1.x checkpoint.

    Full SD1 checkpoints are rebuilt from the real classes (ldm UNet, transformers CLIP-L) on the CPU;
    the VAE is not needed. Other architectures raise BaseModelError with what to do instead.
    ``tokenizer``: a CLIP tokenizer to use (the WebUI's own); default: generated offline from open_clip's BPE.
    ``unet_factory``: builds the UNet of a full SD1 checkpoint instead of ldm's ``UNetModel`` (a host
    without the ``ldm`` package passes its own class, see `UNetFactory`); it is called on the meta device
    and every UNet weight of the file must fit it exactly (missing or extra keys raise BaseModelError).
    Tiny reference checkpoints always use their own classes.
    """
    from safetensors import safe_open

    from lib_loraclr.models.sd import (
        CONFIG_METADATA_KEY,
        SD1Config,
        SD1Model,
        load_tiny_checkpoint,
        sd_alphas_cumprod,
    )
    from lib_loraclr.safeio import read_safetensors_metadata

    p = check_input_file(path, "base checkpoint")  # InputFileError: missing, a folder, unreadable
    if p.suffix != ".safetensors":
        raise BaseModelError(f"{p.name}: only .safetensors checkpoints are read (no pickles)")
    meta = read_safetensors_metadata(p)  # validates the header first (clear errors for bad files)
    if CONFIG_METADATA_KEY in meta:
        _check_tiny_checkpoint(p, meta[CONFIG_METADATA_KEY])  # before allocating anything
        return _check_finite_weights(p, load_tiny_checkpoint(p))
    parts = ("model.diffusion_model.", "cond_stage_model.transformer.")
    with safe_open(str(p), framework="pt") as f:
        names = [n for n in f.keys() if n.startswith(parts)]  # noqa: SIM118 (safe_open is not iterable)
        k = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
        if k not in names or "model.diffusion_model.input_blocks.1.1.proj_in.weight" not in names:
            raise BaseModelError(
                f"{p.name} is not an SD1.x checkpoint in the original (ldm) key layout; the headless merge "
                "supports SD1.x and the bundled tiny models"
            )
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
        try:
            cfg = SD1Config.from_dict(sd1_config_from_shapes(shapes))
        except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
            raise BaseModelError(
                f"{p.name}: the SD1 weights are incomplete or mis-shaped (reading the sizes failed at {e}); "
                "the checkpoint is damaged or not SD1.x. Download it again"
            ) from None
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
    for mod_name, mod in model.named_modules():  # non-persistent buffers are not in the file
        for b_name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                full = f"{mod_name}.{b_name}" if mod_name else b_name
                if b_name == "alphas_cumprod":
                    value = sd_alphas_cumprod()
                elif b_name == "position_ids":
                    value = torch.arange(buf.shape[-1]).expand(buf.shape)
                else:
                    raise BaseModelError(f"internal: buffer {full} was not initialised")
                mod.register_buffer(b_name, value.to(buf.dtype), persistent=False)
    for mod in model.modules():  # files store position_ids as int64, some as float: assign=True keeps theirs
        ids = getattr(mod, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_floating_point():
            mod.position_ids = ids.round().long()  # stays a (persistent or not) buffer
    return _check_finite_weights(p, model.eval())


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
