"""Files we write load in diffusers (through PEFT) with the same deltas; diffusers/PEFT files read right.

Three independent checks of the name maps:
1. diffusers' own ldm→diffusers checkpoint converter, run on the FULL SD1.5 / SDXL UNet key lists, names every
   UNet weight exactly as :func:`canonical_to_diffusers` does;
2. a kohya file written by :func:`write_kohya_lora` for a tiny diffusers UNet + CLIP (SD1 and SDXL layouts,
   built from config, no download) is loaded by diffusers' kohya converter + PEFT, and every applied ΔW equals
   ours;
3. a PEFT-format file made by PEFT itself reads back into the same ΔW.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_pipeline import (
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lib_loraclr.deltas import DeltaSet, LoraModule
from lib_loraclr.keymap import (
    UNET_PREFIX,
    canonical_to_diffusers,
    diffusers_kohya_gaps,
    diffusers_to_canonical,
)
from lib_loraclr.readers import read_lora
from lib_loraclr.writers import write_kohya_lora

#: modules diffusers 0.31's kohya converter cannot name (it turns ``conv_in`` into ``conv.in``); A1111, Forge
#: and ComfyUI load them. SD1 files: diffusers skips them with a warning; SDXL files: its sgm block mapper
#: raises, so these modules are left out of the SDXL file (keymap.diffusers_kohya_gaps names them).
DIFFUSERS_KOHYA_GAPS = {
    "unet.conv_in",
    "unet.conv_out",
    "unet.time_embedding.linear_1",
    "unet.time_embedding.linear_2",
    "unet.add_embedding.linear_1",
    "unet.add_embedding.linear_2",
}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_checkpoint_converter_agrees_on_every_unet_weight(arch: str) -> None:
    from lib_loraclr.models.full_trees import full_sd15_tree, full_sdxl_tree

    tree = full_sd15_tree() if arch == "sd1" else full_sdxl_tree()
    ldm_keys = [UNET_PREFIX + k for k in tree.model.diffusion_model.state_dict()]
    config = {"layers_per_block": 2}
    if arch == "sdxl":
        config["addition_embed_type"] = "text_time"
    converted = convert_ldm_unet_checkpoint({k: k for k in ldm_keys}, config)  # values carry the ldm key
    weights = {ldm: diff for diff, ldm in converted.items() if ldm.endswith(".weight")}
    assert len(weights) > 300
    bad = []
    for ldm, diff in weights.items():
        key = ldm[: -len(".weight")]
        ours = canonical_to_diffusers(key, arch)
        if ours != "unet." + diff[: -len(".weight")]:
            bad.append(f"{key}: ours {ours}, diffusers {diff}")
        if diffusers_to_canonical(ours, arch) != key:
            bad.append(f"{ours} does not read back to {key}")
    assert not bad, "\n".join(bad[:20])


# --------------------------------------------------------------------------------------------------
# tiny diffusers models


def _tiny_unet(arch: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    if arch == "sd1":
        return UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            cross_attention_dim=64,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=96,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 2, 3],
        attention_head_dim=[2, 4, 4],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=96,
    )


def _tiny_clip(width: int, projection: bool = False) -> nn.Module:
    torch.manual_seed(1)
    cfg = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=width,
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _components(arch: str) -> dict[str, nn.Module]:
    comps: dict[str, nn.Module] = {"unet": _tiny_unet(arch), "text_encoder": _tiny_clip(32)}
    if arch == "sdxl":
        comps["text_encoder_2"] = _tiny_clip(64, projection=True)
    return comps


def _random_deltas(comps: dict[str, nn.Module], arch: str) -> tuple[DeltaSet, dict[str, str]]:
    """Random rank-3 LoRA (alpha 1.5, multiplier 0.7) on every Linear/Conv2d we can name."""
    g = torch.Generator().manual_seed(2)
    mods: dict[str, LoraModule] = {}
    names: dict[str, str] = {}
    for comp, model in comps.items():
        for name, m in model.named_modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            full = f"{comp}.{name}"
            key = diffusers_to_canonical(full, arch)
            if key is None:
                continue
            w = m.weight
            r = 3
            if w.dim() == 4:
                down = torch.randn(r, *w.shape[1:], generator=g) * 0.1
                up = torch.randn(w.shape[0], r, 1, 1, generator=g) * 0.1
            else:
                down = torch.randn(r, w.shape[1], generator=g) * 0.1
                up = torch.randn(w.shape[0], r, generator=g) * 0.1
            mods[key] = LoraModule(key=key, down=down, up=up, alpha=1.5, multiplier=0.7)
            names[key] = full
    return DeltaSet(modules=mods, arch=arch), names


def _peft_deltas(comps: dict[str, nn.Module], adapter: str) -> dict[str, torch.Tensor]:
    out = {}
    for comp, model in comps.items():
        for name, m in model.named_modules():
            if isinstance(m, LoraLayer) and adapter in m.lora_A:
                out[f"{comp}.{name}"] = m.get_delta_weight(adapter).detach()
    return out


@pytest.mark.skipif(
    not __import__("diffusers").utils.USE_PEFT_BACKEND,
    reason="diffusers' PEFT backend needs transformers >= 4.34 (A1111 1.10 pins 4.30.2)",
)
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_written_kohya_file_loads_in_diffusers_with_equal_deltas(tmp_path: Path, arch: str, caplog) -> None:
    comps = _components(arch)
    ds, names = _random_deltas(comps, arch)
    assert len(ds) > 100
    gaps = diffusers_kohya_gaps(ds.modules)
    assert {names[k] for k in gaps} == DIFFUSERS_KOHYA_GAPS & set(names.values())
    if arch == "sdxl":
        for k in gaps:
            del ds.modules[k]
    path = tmp_path / f"ours_{arch}.safetensors"
    write_kohya_lora(ds, path, arch=arch, dtype=torch.float32)

    mixin = StableDiffusionLoraLoaderMixin if arch == "sd1" else StableDiffusionXLLoraLoaderMixin
    kwargs = {"unet_config": comps["unet"].config} if arch == "sdxl" else {}
    state_dict, alphas = mixin.lora_state_dict(str(tmp_path), weight_name=path.name, **kwargs)
    with caplog.at_level(logging.WARNING):
        mixin.load_lora_into_unet(state_dict, alphas, comps["unet"], adapter_name="ours")
        mixin.load_lora_into_text_encoder(
            state_dict, alphas, comps["text_encoder"], prefix="text_encoder", adapter_name="ours"
        )
        if arch == "sdxl":
            mixin.load_lora_into_text_encoder(
                state_dict, alphas, comps["text_encoder_2"], prefix="text_encoder_2", adapter_name="ours"
            )
    applied = _peft_deltas(comps, "ours")

    expected = {names[k]: m.delta() for k, m in ds.modules.items()}
    missing = set(expected) - set(applied)
    assert missing == set(expected) & DIFFUSERS_KOHYA_GAPS, sorted(missing)
    assert not set(applied) - set(expected)
    n_te2 = 0
    for full, delta in applied.items():
        ours = expected[full]
        assert delta.shape == ours.shape, full
        torch.testing.assert_close(delta, ours, rtol=1e-5, atol=1e-6, msg=full)
        n_te2 += full.startswith("text_encoder_2.")
    assert len(applied) >= len(expected) - len(DIFFUSERS_KOHYA_GAPS)
    if arch == "sdxl":
        assert n_te2 == 12  # 2 layers × q, k, v, out, fc1, fc2 through the fused OpenCLIP canonical keys


def test_peft_made_file_reads_to_the_same_deltas(tmp_path: Path) -> None:
    comps = {"unet": _tiny_unet("sd1"), "text_encoder": _tiny_clip(32)}
    targets = {
        "unet": [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "proj_in",
            "proj_out",
            "ff.net.0.proj",
            "ff.net.2",
            "conv1",
            "conv2",
            "conv_shortcut",
            "time_emb_proj",
        ],
        "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    }
    sd: dict[str, torch.Tensor] = {}
    for comp, model in comps.items():
        # lora_alpha == r: diffusers 0.31 files carry no alpha, loaders use scale 1
        cfg = LoraConfig(r=4, lora_alpha=4, target_modules=targets[comp], init_lora_weights=False)
        inject_adapter_in_model(cfg, model, adapter_name="default")
        sd.update({f"{comp}.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()})
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(path))
    ds = read_lora(path)
    assert ds.fmt == "peft" and ds.arch == "sd1" and ds.unmapped == []
    peft = _peft_deltas(comps, "default")
    assert len(ds) == len(peft) > 100
    for key, mod in ds.modules.items():
        full = canonical_to_diffusers(key, "sd1")
        torch.testing.assert_close(mod.delta(), peft[full], rtol=1e-5, atol=1e-6, msg=full)
