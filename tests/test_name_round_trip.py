"""kohya ↔ canonical names round-trip exactly for every module of every layout the project builds, and the
loaders that ignore some modules (kohya sd-scripts, diffusers) are named by ``inspect`` and the merge report.

Layouts: the tiny SD1 and SDXL models, the measuring world (attention at the lowest resolution too, so its
first up level's upsampler is ``output_blocks.2.2.conv``, not SD1's ``output_blocks.2.1.conv``), and the
FULL SD1.5, SD2 and SDXL module trees (meta device). Every Linear, Conv2d, GroupNorm and LayerNorm and
every fused OpenCLIP ``in_proj`` row block of the UNet and text encoders is a key.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lib_loraclr.deltas import DeltaSet, LoraModule
from lib_loraclr.inspect import format_summary, inspect_file
from lib_loraclr.keymap import (
    OUTSIDE_KOHYA_BLOCKS,
    UNET_PREFIX,
    canonical_to_diffusers,
    canonical_to_kohya,
    diffusers_to_canonical,
    format_loader_gaps,
    is_canonical,
    kohya_loader_gaps,
    kohya_to_canonical,
    loader_gaps,
    resolve_module,
)
from lib_loraclr.readers import read_lora
from lib_loraclr.writers import write_kohya_lora

WORLD_UPSAMPLER = UNET_PREFIX + "output_blocks.2.2.conv"
ROOTS = ("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.")


def _tiny_sd1() -> nn.Module:
    from lib_loraclr.models.sd import build_tiny_sd1

    return build_tiny_sd1(0)


def _tiny_sdxl() -> nn.Module:
    from lib_loraclr.models.sd import build_tiny_sdxl

    return build_tiny_sdxl(0)


def _world() -> nn.Module:
    from lib_loraclr.world.model import build_world_model

    return build_world_model(0)


def _sd15() -> nn.Module:
    from lib_loraclr.models.full_trees import full_sd15_tree

    return full_sd15_tree()


def _sd2() -> nn.Module:
    from lib_loraclr.models.full_trees import full_sd2_tree

    return full_sd2_tree()


def _sdxl() -> nn.Module:
    from lib_loraclr.models.full_trees import full_sdxl_tree

    return full_sdxl_tree()


#: layout → (builder, arch, number of keys it has; counted once, so a lost module fails the test)
LAYOUTS: dict[str, tuple[Callable[[], nn.Module], str, int]] = {
    "tiny-sd1": (_tiny_sd1, "sd1", 406),
    "tiny-sdxl": (_tiny_sdxl, "sdxl", 460),
    "world": (_world, "sd1", 267),
    "full-sd15": (_sd15, "sd1", 488),
    "full-sd2": (_sd2, "sd2", 584),
    "full-sdxl": (_sdxl, "sdxl", 1404),
}


@functools.cache
def _keys(layout: str) -> tuple[str, ...]:
    """Canonical keys of every Linear / Conv2d / norm module and every fused in_proj row block."""
    tree = LAYOUTS[layout][0]()
    keys: list[str] = []
    for name, mod in tree.named_modules():
        if not name.startswith(ROOTS):
            continue
        if isinstance(mod, nn.MultiheadAttention):
            keys += [f"{name}.in_proj:{p}" for p in "qkv"]
        elif isinstance(mod, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)):
            keys.append(name)
    return tuple(keys)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kohya_names_round_trip_exactly_for_every_module(layout: str) -> None:
    arch, expected = LAYOUTS[layout][1], LAYOUTS[layout][2]
    keys = _keys(layout)
    assert len(keys) == expected
    names = {}
    for k in keys:
        assert is_canonical(k), k
        name = canonical_to_kohya(k, arch)
        assert kohya_to_canonical(name, arch) == k, (k, name)
        names[name] = k
    assert len(names) == len(keys)  # no two modules share a file name


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_diffusers_names_round_trip_where_they_exist(layout: str) -> None:
    arch = LAYOUTS[layout][1]
    missing = []
    for k in _keys(layout):
        try:
            d = canonical_to_diffusers(k, arch)
        except ValueError:
            missing.append(k)
            continue
        assert diffusers_to_canonical(d, arch) == k, (k, d)
    # every module has a diffusers name except the world's upsampler (no diffusers name reads back as it)
    assert missing == ([WORLD_UPSAMPLER] if layout == "world" else [])


def test_world_upsampler_is_written_by_its_ldm_name_and_read_back() -> None:
    assert canonical_to_kohya(WORLD_UPSAMPLER, "sd1") == "lora_unet_output_blocks_2_2_conv"
    assert kohya_to_canonical("lora_unet_output_blocks_2_2_conv", "sd1") == WORLD_UPSAMPLER
    # SD1.5's own upsampler keeps its diffusers name (what kohya writes and A1111 converts back)
    sd1 = UNET_PREFIX + "output_blocks.2.1.conv"
    assert canonical_to_kohya(sd1, "sd1") == "lora_unet_up_blocks_0_upsamplers_0_conv"
    assert kohya_to_canonical("lora_unet_up_blocks_0_upsamplers_0_conv", "sd1") == sd1


def test_world_locon_file_written_for_the_world_reads_back_onto_its_modules(tmp_path: Path) -> None:
    """The bug of issue 15: a LoCon file the project wrote for its own world base came back under a module
    the world does not have (``output_blocks.2.1.conv``), so the merge refused it."""
    model = _world()
    g = torch.Generator().manual_seed(0)
    mods = {}
    for k in (
        WORLD_UPSAMPLER,
        UNET_PREFIX + "output_blocks.2.0.in_layers.2",
        UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    ):
        w = resolve_module(model, k)[0].weight
        down = torch.randn(4, *w.shape[1:], generator=g) * 0.1
        up = torch.randn(w.shape[0], 4, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.1
        mods[k] = LoraModule(key=k, down=down, up=up, alpha=4.0)
    path = tmp_path / "world_locon.safetensors"
    write_kohya_lora(DeltaSet(modules=mods, arch="sd1"), path, arch="sd1", dtype=torch.float32)
    back = read_lora(path)
    assert set(back.modules) == set(mods) and back.unmapped == []
    for k, m in back.modules.items():
        module, _ = resolve_module(model, k)
        assert tuple(module.weight.shape) == tuple(m.shape), k
        torch.testing.assert_close(m.delta(), mods[k].delta(), rtol=1e-6, atol=1e-7)
    # the world's upsampler is not a kohya (diffusers-named) SD1 module: kohya's loaders ignore it
    assert loader_gaps(back.modules, "sd1") == {"kohya sd-scripts": [WORLD_UPSAMPLER]}


def test_outside_block_modules_are_named_for_kohya_and_diffusers() -> None:
    outside = [UNET_PREFIX + p for p in OUTSIDE_KOHYA_BLOCKS]
    inside = [
        UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
        UNET_PREFIX + "input_blocks.3.0.op",
        UNET_PREFIX + "output_blocks.2.1.conv",
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1",
    ]
    assert sorted(kohya_loader_gaps(outside + inside, "sd1")) == sorted(outside)
    gaps = loader_gaps(outside + inside, "sdxl")
    assert gaps == {"kohya sd-scripts": sorted(outside), "diffusers": sorted(outside)}
    assert loader_gaps(inside, "sd1") == {}
    lines = format_loader_gaps(
        {"kohya sd-scripts": [UNET_PREFIX + "input_blocks.0.0", UNET_PREFIX + "out.2"]}
    )
    expected = (
        "kohya sd-scripts ignores 2 modules (never builds these modules; its generator and merge_lora.py skip "
        "them): input_blocks.0.0 (conv_in), out.2 (conv_out)"
    )
    assert lines == [expected]


def test_inspect_names_the_loaders_that_ignore_modules(tmp_path: Path) -> None:
    model = _tiny_sd1()
    keys = [
        UNET_PREFIX + "input_blocks.0.0",
        UNET_PREFIX + "out.2",
        UNET_PREFIX + "time_embed.0",
        UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    ]
    g = torch.Generator().manual_seed(1)
    deltas = {k: torch.randn(*resolve_module(model, k)[0].weight.shape, generator=g) * 0.01 for k in keys}
    path = tmp_path / "locon_full.safetensors"
    write_kohya_lora(deltas, path, arch="sd1", rank=2)
    s = inspect_file(path)
    assert s["loader_gaps"] == {"kohya sd-scripts": sorted(keys[:3]), "diffusers": sorted(keys[:3])}
    json.dumps(s)  # stays JSON-serialisable
    text = format_summary(s)
    assert "loader gaps" in text
    assert "kohya sd-scripts ignores 3 modules" in text and "input_blocks.0.0 (conv_in)" in text
    assert "time_embed.0 (time_embedding.linear_1)" in text and "diffusers ignores 3 modules" in text
    # a plain attention LoRA has no gaps
    plain = tmp_path / "plain.safetensors"
    write_kohya_lora({keys[3]: deltas[keys[3]]}, plain, arch="sd1", rank=2)
    assert inspect_file(plain)["loader_gaps"] == {} and "loader gaps" not in format_summary(
        inspect_file(plain)
    )
