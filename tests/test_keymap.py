"""Key maps against the FULL SD1.5 / SD2 / SDXL module trees (meta device, every real module name).

The kohya key sets are built here the way kohya's trainer names modules: walk the diffusers UNet and the
transformers CLIP text model (built at full size on the meta device, so no weights, no download), take every
Linear/Conv2d inside the blocks kohya targets and join the path with ``_``. SDXL's sgm names follow the SDXL
block layout (transformer depth 1/2/10). Every key must map to an existing module of the full WebUI-style tree
with the same weight shape, and map back to the identical kohya name.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lib_loraclr.keymap import (
    UNET_PREFIX,
    canonical_part,
    canonical_to_diffusers,
    canonical_to_kohya,
    canonical_to_module_path,
    conv_kernel_size,
    diffusers_to_canonical,
    is_canonical,
    kohya_to_canonical,
    module_path_to_canonical,
    resolve_module,
    split_fused,
)

ATTN_LEAVES = ["proj_in", "proj_out"] + [
    f"transformer_blocks_{{b}}_{x}"
    for x in [
        "attn1_to_q",
        "attn1_to_k",
        "attn1_to_v",
        "attn1_to_out_0",
        "attn2_to_q",
        "attn2_to_k",
        "attn2_to_v",
        "attn2_to_out_0",
        "ff_net_0_proj",
        "ff_net_2",
    ]
]
TE_LEAVES = [
    "self_attn_q_proj",
    "self_attn_k_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
    "mlp_fc1",
    "mlp_fc2",
]


@functools.cache
def sd15_tree() -> nn.Module:
    from lib_loraclr.models.full_trees import full_sd15_tree

    return full_sd15_tree()


@functools.cache
def sd2_tree() -> nn.Module:
    from lib_loraclr.models.full_trees import full_sd2_tree

    return full_sd2_tree()


@functools.cache
def sdxl_tree() -> nn.Module:
    from lib_loraclr.models.full_trees import full_sdxl_tree

    return full_sdxl_tree()


@functools.cache
def diffusers_unet(arch: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        if arch == "sd1":
            return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        if arch == "sd2":
            return UNet2DConditionModel(
                sample_size=96,
                cross_attention_dim=1024,
                attention_head_dim=[5, 10, 20, 20],
                use_linear_projection=True,
            )
        return UNet2DConditionModel(
            sample_size=128,
            cross_attention_dim=2048,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=[1, 2, 10],
            attention_head_dim=[5, 10, 20],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )


@functools.cache
def hf_clip(hidden: int, layers: int, heads: int, inter: int) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return CLIPTextModel(
            CLIPTextConfig(
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                intermediate_size=inter,
            )
        )


def kohya_names(
    model: nn.Module, prefix: str, targets: tuple[str, ...], locon: bool
) -> dict[str, tuple[int, ...]]:
    """kohya's naming: every Linear / (1×1 | any, with ``locon``) Conv2d below a module of a target class."""
    out: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if type(module).__name__ not in targets:
            continue
        for child_name, child in module.named_modules():
            is_lin = isinstance(child, nn.Linear)
            is_conv = isinstance(child, nn.Conv2d)
            if not (is_lin or (is_conv and (locon or child.kernel_size == (1, 1)))):
                continue
            out[f"{prefix}_{name}.{child_name}".replace(".", "_")] = tuple(child.weight.shape)
    return out


def kohya_sd_unet(arch: str, locon: bool) -> dict[str, tuple[int, ...]]:
    unet = diffusers_unet(arch)
    names = kohya_names(unet, "lora_unet", ("Transformer2DModel",), False)
    if locon:
        names.update(kohya_names(unet, "lora_unet", ("ResnetBlock2D", "Downsample2D", "Upsample2D"), True))
        for n in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
            names["lora_unet_" + n.replace(".", "_")] = tuple(unet.get_submodule(n).weight.shape)
    return names


def kohya_te(prefix: str, hidden: int, layers: int, heads: int, inter: int) -> dict[str, tuple[int, ...]]:
    return kohya_names(
        hf_clip(hidden, layers, heads, inter),
        prefix,
        ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"),
        False,
    )


def sdxl_sgm_attention_names() -> list[str]:
    """SDXL attention modules as kohya's sdxl trainer names them (sgm layout, 70 transformer blocks)."""
    blocks = (
        [
            ("input_blocks_4_1", 2),
            ("input_blocks_5_1", 2),
            ("input_blocks_7_1", 10),
            ("input_blocks_8_1", 10),
            ("middle_block_1", 10),
        ]
        + [(f"output_blocks_{i}_1", 10) for i in (0, 1, 2)]
        + [(f"output_blocks_{i}_1", 2) for i in (3, 4, 5)]
    )
    names = []
    for blk, depth in blocks:
        names += [f"lora_unet_{blk}_proj_in", f"lora_unet_{blk}_proj_out"]
        for b in range(depth):
            names += [f"lora_unet_{blk}_{leaf.format(b=b)}" for leaf in ATTN_LEAVES[2:]]
    return names


def _module_shape(tree: nn.Module, key: str) -> tuple[int, ...]:
    module, rows = resolve_module(tree, key)
    if rows is None:
        return tuple(module.weight.shape)
    w = module.in_proj_weight
    return tuple(w[rows].shape)


def _check_all(names: dict[str, tuple[int, ...] | None], tree: nn.Module, arch: str) -> None:
    bad = []
    for name, shape in names.items():
        key = kohya_to_canonical(name, arch)
        if key is None:
            bad.append(f"{name}: unmapped")
            continue
        try:
            got = _module_shape(tree, key)
        except KeyError as e:
            bad.append(f"{name} -> {key}: {e}")
            continue
        if shape is not None and got != shape:
            bad.append(f"{name} -> {key}: shape {got} != kohya module shape {shape}")
        if canonical_to_kohya(key, arch) != name:
            bad.append(f"{name} -> {key} -> {canonical_to_kohya(key, arch)}")
    assert not bad, f"{len(bad)} of {len(names)} keys failed:\n" + "\n".join(bad[:20])


def test_sd15_full_lora_key_set_maps_to_every_module_and_back() -> None:
    unet = kohya_sd_unet("sd1", locon=False)
    te = kohya_te("lora_te", 768, 12, 12, 3072)
    assert len(unet) == 192 and len(te) == 72  # the 264 modules of every full SD1.5 kohya LoRA
    _check_all({**unet, **te}, sd15_tree(), "sd1")


def test_sd15_locon_conv_in_out_resnets_samplers_map() -> None:
    names = kohya_sd_unet("sd1", locon=True)
    assert {
        "lora_unet_conv_in",
        "lora_unet_conv_out",
        "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lora_unet_up_blocks_2_resnets_2_conv_shortcut",
        "lora_unet_mid_block_resnets_1_time_emb_proj",
    } <= set(names)
    _check_all(names, sd15_tree(), "sd1")


def test_sd2_key_set_maps_including_openclip_fused_rows() -> None:
    names = {**kohya_sd_unet("sd2", locon=True), **kohya_te("lora_te", 1024, 23, 16, 4096)}
    _check_all(names, sd2_tree(), "sd2")
    key = kohya_to_canonical("lora_te_text_model_encoder_layers_22_self_attn_v_proj", "sd2")
    assert key == "cond_stage_model.model.transformer.resblocks.22.attn.in_proj:v"
    module, rows = resolve_module(sd2_tree(), key)
    assert isinstance(module, nn.MultiheadAttention) and rows == slice(2048, 3072)


def test_sdxl_full_key_set_both_text_encoders() -> None:
    unet = {n: None for n in sdxl_sgm_attention_names()}
    te1 = kohya_te("lora_te1", 768, 12, 12, 3072)
    te2 = kohya_te("lora_te2", 1280, 32, 20, 5120)
    assert len(unet) == 722 and len(te1) == 72 and len(te2) == 192
    _check_all({**unet, **te1, **te2}, sdxl_tree(), "sdxl")
    # the OpenCLIP q/k/v rows have the kohya module's shape
    for name, shape in te2.items():
        assert _module_shape(sdxl_tree(), kohya_to_canonical(name, "sdxl")) == shape


def test_sdxl_diffusers_style_names_map_to_the_same_modules() -> None:
    names = kohya_sd_unet("sdxl", locon=True)
    names.pop("lora_unet_time_embedding_linear_1")
    names.pop("lora_unet_time_embedding_linear_2")
    bad = []
    for name, shape in names.items():
        key = kohya_to_canonical(name, "sdxl")
        if key is None:
            bad.append(name)
            continue
        if _module_shape(sdxl_tree(), key) != shape:
            bad.append(f"{name} -> {key}")
        # writing uses sgm names; those read back to the same key
        assert kohya_to_canonical(canonical_to_kohya(key, "sdxl"), "sdxl") == key
    assert not bad, bad[:10]


@pytest.mark.parametrize("tree_fn", [sd15_tree, sdxl_tree])
def test_every_unet_linear_and_conv_maps_from_its_ldm_name(tree_fn) -> None:
    """A1111's fallback (``lora_unet`` → ``diffusion_model``): ldm/sgm-named keys for every weight layer."""
    tree = tree_fn()
    arch = "sd1" if tree_fn is sd15_tree else "sdxl"
    unet = tree.model.diffusion_model
    count = 0
    for name, m in unet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        count += 1
        kohya = "lora_unet_" + name.replace(".", "_")
        key = kohya_to_canonical(kohya, arch)
        assert key == UNET_PREFIX + name, kohya
        assert is_canonical(key)
        # and the name we write reads back to it
        assert kohya_to_canonical(canonical_to_kohya(key, arch), arch) == key
    assert count > 200


def test_every_te_linear_maps() -> None:
    for tree, arch in ((sd15_tree(), "sd1"), (sd2_tree(), "sd2"), (sdxl_tree(), "sdxl")):
        keys = []
        for name, m in tree.named_modules():
            if name.startswith(UNET_PREFIX[:-1]):
                continue
            if isinstance(m, nn.Linear) and (".layers." in name or ".resblocks." in name):
                keys.append(name)
            if isinstance(m, nn.MultiheadAttention):
                keys += [f"{name}.in_proj:{p}" for p in "qkv"]
        assert len(keys) >= 72
        for k in keys:
            assert is_canonical(k), k
            assert kohya_to_canonical(canonical_to_kohya(k, arch), arch) == k


def test_a1111_diffusers_to_compvis_examples() -> None:
    """Spot checks of the rules in webui.md §5 (input_blocks 1+3i+j, middle 1|2j, output 3i+j, samplers)."""
    cases = {
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn1_to_q": "input_blocks.8.1.transformer_blocks.0.attn1.to_q",
        "lora_unet_down_blocks_3_resnets_1_conv2": "input_blocks.11.0.out_layers.3",
        "lora_unet_mid_block_resnets_1_conv1": "middle_block.2.in_layers.2",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": "middle_block.1.transformer_blocks.0.ff.net.2",
        "lora_unet_up_blocks_1_attentions_2_proj_out": "output_blocks.5.1.proj_out",
        "lora_unet_up_blocks_0_resnets_2_time_emb_proj": "output_blocks.2.0.emb_layers.1",
        "lora_unet_up_blocks_2_upsamplers_0_conv": "output_blocks.8.2.conv",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.2.1.conv",
        "lora_unet_down_blocks_0_downsamplers_0_conv": "input_blocks.3.0.op",
        "lora_unet_time_embedding_linear_1": "time_embed.0",
        "lora_unet_conv_in": "input_blocks.0.0",
        "lora_unet_conv_out": "out.2",
    }
    for kohya, path in cases.items():
        assert kohya_to_canonical(kohya, "sd1") == UNET_PREFIX + path, kohya
    assert (
        kohya_to_canonical("lora_unet_up_blocks_0_upsamplers_0_conv", "sdxl")
        == UNET_PREFIX + "output_blocks.2.2.conv"
    )
    assert (
        kohya_to_canonical("lora_te_text_model_encoder_layers_0_mlp_fc1", "sd2")
        == "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc"
    )
    assert (
        kohya_to_canonical("lora_te2_text_model_encoder_layers_7_mlp_fc2", "sdxl")
        == "conditioner.embedders.1.model.transformer.resblocks.7.mlp.c_proj"
    )
    assert kohya_to_canonical("lora_te_text_model_encoder_layers_0_mlp_fc1", "sdxl") is None


@pytest.mark.parametrize(
    "name",
    [
        "lora_unet_down_blocks_0_attentions_5_proj_in",
        "lora_unet_down_blocks_0_resnets_0_conv9",
        "lora_unet_input_blocks_1_0_proj_in",
        "lora_unet_mid_block_attentions_1_proj_in",
        "lora_unet_something",
        "lora_te_text_model_encoder_layers_0_self_attn_x_proj",
        "lora_transformer_blocks_0_attn_to_q",
        "lora_te3_text_model_encoder_layers_0_mlp_fc1",
        "lora_unet_input_blocks_0_1_proj_in",
        "",
    ],
)
def test_unknown_names_map_to_none(name: str) -> None:
    assert kohya_to_canonical(name, "sd1") is None


def test_diffusers_and_peft_names() -> None:
    c = UNET_PREFIX + "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0"
    for n in [
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "base_model.model.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora",
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out_lora",
    ]:
        assert diffusers_to_canonical(n, "sd1") == c, n
    assert (
        canonical_to_diffusers(c, "sd1")
        == "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
    )
    assert (
        diffusers_to_canonical("text_encoder.text_model.encoder.layers.2.self_attn.to_k_lora", "sd1")
        == "cond_stage_model.transformer.text_model.encoder.layers.2.self_attn.k_proj"
    )
    assert (
        diffusers_to_canonical("text_encoder.text_model.encoder.layers.2.mlp.fc1", "sdxl")
        == "conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc1"
    )
    assert (
        diffusers_to_canonical("text_encoder.text_model.encoder.layers.2.self_attn.q_proj", "sd2")
        == "cond_stage_model.model.transformer.resblocks.2.attn.in_proj:q"
    )
    k2 = "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj:q"
    assert (
        canonical_to_diffusers(k2, "sdxl") == "text_encoder_2.text_model.encoder.layers.31.self_attn.q_proj"
    )
    assert diffusers_to_canonical(canonical_to_diffusers(k2, "sdxl"), "sdxl") == k2
    assert diffusers_to_canonical("vae.decoder.conv_in", "sd1") is None


def test_sub_model_paths_and_resolution() -> None:
    k = UNET_PREFIX + "input_blocks.1.1.proj_in"
    assert canonical_to_module_path(k, "unet") == "input_blocks.1.1.proj_in"
    assert canonical_to_module_path(k, "model.diffusion_model.") == "input_blocks.1.1.proj_in"
    assert canonical_to_module_path(k, "te") is None
    assert module_path_to_canonical("input_blocks.1.1.proj_in", "unet") == k
    te_key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    assert canonical_to_module_path(te_key, "te") == "text_model.encoder.layers.0.self_attn.q_proj"
    tree = sd15_tree()
    m, rows = resolve_module(tree.model.diffusion_model, k, root="unet")
    assert m is tree.model.diffusion_model.input_blocks[1][1].proj_in and rows is None
    m, _ = resolve_module(tree.cond_stage_model.transformer, te_key, root="te")
    assert isinstance(m, nn.Linear)
    with pytest.raises(KeyError, match="no module"):
        resolve_module(tree, UNET_PREFIX + "input_blocks.1.1.nothing")
    with pytest.raises(KeyError):
        resolve_module(tree.model.diffusion_model, te_key, root="unet")
    assert split_fused("a.attn.in_proj:k") == ("a.attn", "k")
    with pytest.raises(KeyError):
        split_fused("a.attn.in_proj:x")
    assert canonical_part(k) == "unet" and canonical_part(te_key) == "te"
    assert canonical_part("conditioner.embedders.1.model.ln_final") == "te2"


def test_conv_kernel_sizes_match_the_tree() -> None:
    for tree, arch in ((sd15_tree(), "sd1"), (sdxl_tree(), "sdxl")):
        for name, m in tree.model.diffusion_model.named_modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            k = conv_kernel_size(UNET_PREFIX + name, arch)
            expect = m.kernel_size[0] if isinstance(m, nn.Conv2d) else None
            assert k == expect, (arch, name)


def test_canonical_to_kohya_refuses_non_canonical() -> None:
    with pytest.raises(ValueError):
        canonical_to_kohya("model.diffusion_model.foo.bar", "sd1")
    with pytest.raises(ValueError):
        canonical_to_kohya(UNET_PREFIX + "input_blocks.1.1.proj_in", "unknown")
    assert (
        canonical_to_kohya(UNET_PREFIX + "input_blocks.1.1.proj_in", "sd1", unet_style="ldm")
        == "lora_unet_input_blocks_1_1_proj_in"
    )
