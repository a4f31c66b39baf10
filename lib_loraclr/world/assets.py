"""Loading the committed world: base model (`SD1Model`), concept LoRAs (`DeltaSet`) and judges.

``assets/base.safetensors`` is a `save_tiny_checkpoint`-style file (SD1 keys, config in the metadata key
``loraclr_tiny_config``) whose weights are stored in fp16 to keep the world small (9.7 MB instead of 13 MB;
the token embedding ``[49408, 64]`` alone is 6 MB); `load_tiny_checkpoint` copies them into the fp32
parameters (re-expansion = a plain cast).
"""

from __future__ import annotations

from pathlib import Path

from lib_loraclr.world.concepts import Concept, load_concepts

ASSETS = Path(__file__).resolve().parent / "assets"
BASE_FILE = ASSETS / "base.safetensors"
LORA_DIR = ASSETS / "loras"


def world_config():
    """The `SD1Config` of the world model (pixel space, 1 channel, 8×8·k images)."""
    from lib_loraclr.models.sd import SD1Config, TextConfig, UNetConfig

    unet = UNetConfig(
        in_channels=1,
        out_channels=1,
        model_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=2,
        attention_resolutions=[1, 2],
        num_heads=4,
        context_dim=64,
    )
    return SD1Config(unet=unet, text=TextConfig(hidden_size=64, layers=2, heads=4, intermediate=256))


def load_base(path: Path | str = BASE_FILE):
    """The base world model as a `SD1Model` (eval mode, fp32, CPU)."""
    from lib_loraclr.models.sd import load_tiny_checkpoint

    return load_tiny_checkpoint(path).float()


def lora_path(name: str, lora_dir: Path | str = LORA_DIR) -> Path:
    return Path(lora_dir) / f"{name}.safetensors"


def load_lora(name: str, lora_dir: Path | str = LORA_DIR):
    """A concept LoRA as a `DeltaSet` (read by the library's kohya reader)."""
    from lib_loraclr.readers import read_lora

    return read_lora(lora_path(name, lora_dir))


def concepts() -> dict[str, Concept]:
    return load_concepts()
