"""Build the base model a merge runs on from a checkpoint FILE (never from a live WebUI model, which may
hold patched LoRA deltas): the bundled tiny checkpoints, or a full SD1.x checkpoint rebuilt from the real
classes (ldm UNet, transformers CLIP-L)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lib_loraclr.errors import LoraclrError


class BaseModelError(LoraclrError):
    """The base checkpoint cannot be used for a merge."""


#: Builds an SD1 UNet from its sizes: ``factory(TinyUNetConfig) -> nn.Module`` whose module names follow
#: ldm's layout (``input_blocks`` / ``middle_block`` / ``output_blocks`` / ``out``, ``attn1``/``attn2`` with
#: ``to_q``/``to_k``/``to_v``/``to_out.0``) and whose ``forward(x, timesteps=…, context=…)`` returns ε.
UNetFactory = Callable[[Any], torch.nn.Module]


def load_base(path: str | os.PathLike[str], tokenizer: Any = None,
              unet_factory: UNetFactory | None = None) -> torch.nn.Module:
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

    from lib_loraclr.safeio import read_safetensors_metadata
    from lib_loraclr.tiny.models import (
        CONFIG_METADATA_KEY,
        TinySD,
        TinySDConfig,
        load_tiny_checkpoint,
        sd_alphas_cumprod,
    )

    p = Path(path)
    if not p.exists():
        raise BaseModelError(f"base checkpoint {p} does not exist")
    if p.suffix != ".safetensors":
        raise BaseModelError(f"{p.name}: only .safetensors checkpoints are read (no pickles)")
    meta = read_safetensors_metadata(p)  # validates the header first (clear errors for bad files)
    if CONFIG_METADATA_KEY in meta:
        return load_tiny_checkpoint(p)
    parts = ("model.diffusion_model.", "cond_stage_model.transformer.")
    with safe_open(str(p), framework="pt") as f:
        names = [n for n in f.keys() if n.startswith(parts)]  # noqa: SIM118 (safe_open is not iterable)
        k = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
        if k not in names or "model.diffusion_model.input_blocks.1.1.proj_in.weight" not in names:
            raise BaseModelError(
                f"{p.name} is not an SD1.x checkpoint in the original (ldm) key layout; the headless merge "
                "supports SD1.x and the bundled tiny models"
            )
        cfg = TinySDConfig.from_dict(sd1_config_from_shapes({n: tuple(f.get_slice(n).get_shape()) for n in names}))
        # Build on the meta device and assign the file's tensors (one fp32 copy of the weights in memory,
        # converted tensor by tensor): about 4 GB for SD1.5 instead of three copies.
        with torch.device("meta"):
            model = TinySD(cfg, tokenizer=tokenizer, unet_factory=unet_factory)
        sd = {n: _as_float(f.get_tensor(n)) for n in names}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    del sd
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing:
        raise BaseModelError(f"{p.name} lacks {len(missing)} weights of an SD1 model, e.g. {missing[:3]}")
    unexpected = [u for u in unexpected if not u.endswith("position_ids")]
    if unet_factory is not None and unexpected:
        raise BaseModelError(f"the host's UNet does not fit {p.name}: {len(unexpected)} weights have no place "
                             f"in it, e.g. {unexpected[:3]}")
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
    return model.eval()


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
    ctx = shapes[f"{u}input_blocks.{1 + 3 * (attn[0].bit_length() - 1)}.1.transformer_blocks.0.attn2.to_k.weight"][1]
    t = "cond_stage_model.transformer.text_model."
    hidden = shapes[t + "embeddings.token_embedding.weight"][1]
    layers = 1 + max(int(n.split(".")[5]) for n in shapes if n.startswith(t + "encoder.layers."))
    return {
        "unet": {"in_channels": shapes[u + "input_blocks.0.0.weight"][1], "out_channels": shapes[u + "out.2.weight"][0],
                 "model_channels": mc, "channel_mult": mult, "attention_resolutions": attn, "num_heads": 8,
                 "context_dim": ctx},
        "text": {"hidden_size": hidden, "layers": layers, "heads": max(1, hidden // 64),
                 "intermediate": shapes[t + "encoder.layers.0.mlp.fc1.weight"][0],
                 "max_position_embeddings": shapes[t + "embeddings.position_embedding.weight"][0]},
    }
