"""Build the base model a merge runs on from a checkpoint FILE (never from a live WebUI model, which may
hold patched LoRA deltas): the bundled tiny checkpoints, or a full SD1.x checkpoint rebuilt from the real
classes (ldm UNet, transformers CLIP-L)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lib_loraclr.errors import LoraclrError


class BaseModelError(LoraclrError):
    """The base checkpoint cannot be used for a merge."""


def load_base(path: str | os.PathLike[str], tokenizer: Any = None) -> torch.nn.Module:
    """A base model the pipeline can drive: a tiny reference checkpoint, or a full SD1.x checkpoint.

    Full SD1 checkpoints are rebuilt from the real classes (ldm UNet, transformers CLIP-L) on the CPU;
    the VAE is not needed. Other architectures raise BaseModelError with what to do instead.
    ``tokenizer``: a CLIP tokenizer to use (the WebUI's own); default: generated offline from open_clip's BPE.
    """
    from lib_loraclr.safeio import read_safetensors
    from lib_loraclr.tiny.models import CONFIG_METADATA_KEY, TinySD, TinySDConfig, load_tiny_checkpoint

    p = Path(path)
    if not p.exists():
        raise BaseModelError(f"base checkpoint {p} does not exist")
    if p.suffix != ".safetensors":
        raise BaseModelError(f"{p.name}: only .safetensors checkpoints are read (no pickles)")
    tensors, meta = read_safetensors(p)
    if CONFIG_METADATA_KEY in meta:
        return load_tiny_checkpoint(p)
    k = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    if k not in tensors or "model.diffusion_model.input_blocks.1.1.proj_in.weight" not in tensors:
        raise BaseModelError(
            f"{p.name} is not an SD1.x checkpoint in the original (ldm) key layout; the headless merge "
            "supports SD1.x and the bundled tiny models (use the WebUI tab for other models)"
        )
    cfg = TinySDConfig.from_dict({
        "unet": {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_heads": 8, "context_dim": 768},
        "text": {"hidden_size": 768, "layers": 12, "heads": 12, "intermediate": 3072},
    })
    model = TinySD(cfg, tokenizer=tokenizer)
    sd = {n: t.float() for n, t in tensors.items()
          if n.startswith(("model.diffusion_model.", "cond_stage_model.transformer."))}
    missing, _ = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing:
        raise BaseModelError(f"{p.name} lacks {len(missing)} weights of an SD1 model, e.g. {missing[:3]}")
    return model.eval()
