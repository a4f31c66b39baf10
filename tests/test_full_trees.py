"""Full SD1.5 / SD2 / SDXL module trees on the meta device, and the OpenCLIP text-tower replica."""

from __future__ import annotations

import time

import pytest
import torch

from lib_loraclr.models.full_trees import full_sd2_tree, full_sd15_tree, full_sdxl_tree
from lib_loraclr.models.openclip_text import OpenClipTextModel


def _names(tree):
    return {n for n, _ in tree.named_modules()}


def _assert_meta(tree):
    assert all(p.device.type == "meta" for p in tree.parameters())
    assert all(b.device.type == "meta" for b in tree.buffers())


@pytest.fixture(scope="module")
def sd15():
    t0 = time.perf_counter()
    tree = full_sd15_tree()
    return tree, time.perf_counter() - t0


@pytest.fixture(scope="module")
def sd2():
    return full_sd2_tree()


@pytest.fixture(scope="module")
def sdxl():
    return full_sdxl_tree()


def test_sd15_tree(sd15):
    tree, seconds = sd15
    assert seconds < 10  # generous bound on a shared 2-core machine; typically ~1 s after imports
    _assert_meta(tree)
    names = _names(tree)
    attn2 = sorted(n for n in names if n.endswith(".attn2"))
    assert len(attn2) == 16
    te_layers = {
        n.split(".")[5]
        for n in names
        if n.startswith("cond_stage_model.transformer.text_model.encoder.layers.")
    }
    assert len(te_layers) == 12
    for n in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k",
        "model.diffusion_model.input_blocks.1.1.proj_in",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_out.0",
        "model.diffusion_model.input_blocks.4.0.skip_connection",
        "model.diffusion_model.input_blocks.3.0.op",
        "model.diffusion_model.output_blocks.2.1.conv",
        "model.diffusion_model.out.2",
        "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2",
    ):
        assert n in names, n
    sd = tree.state_dict()
    assert sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (
        320,
        768,
    )
    assert sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)
    assert sd["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"].shape == (
        768,
        768,
    )
    n_params = sum(p.numel() for p in tree.parameters())
    assert n_params == pytest.approx(983e6, rel=0.01)  # UNet 859.5 M + CLIP-L text 123 M


def test_sd2_tree(sd2):
    _assert_meta(sd2)
    names = _names(sd2)
    assert len([n for n in names if n.endswith(".attn2")]) == 16
    blocks = {n.split(".")[4] for n in names if n.startswith("cond_stage_model.model.transformer.resblocks.")}
    assert len(blocks) == 24
    attn = sd2.get_submodule("cond_stage_model.model.transformer.resblocks.23.attn")
    assert isinstance(attn, torch.nn.MultiheadAttention) and attn.in_proj_weight.shape == (3072, 1024)
    for n in (
        "cond_stage_model.model.transformer.resblocks.0.attn.out_proj",
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc",
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj",
        "cond_stage_model.model.ln_final",
        "cond_stage_model.model.token_embedding",
    ):
        assert n in names, n
    sd = sd2.state_dict()
    assert sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320)  # linear
    assert sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (
        320,
        1024,
    )
    assert (
        "cond_stage_model.model.text_projection" in sd and "cond_stage_model.model.positional_embedding" in sd
    )
    assert not any(k.startswith("cond_stage_model.model.visual") for k in sd)


def test_sdxl_tree(sdxl):
    _assert_meta(sdxl)
    names = _names(sdxl)
    attn2 = [n for n in names if n.endswith(".attn2")]
    assert len(attn2) == 70
    per_block: dict[str, int] = {}
    for n in attn2:
        block = n.split(".transformer_blocks.")[0].replace("model.diffusion_model.", "")
        per_block[block] = per_block.get(block, 0) + 1
    want = {
        "input_blocks.4.1": 2,
        "input_blocks.5.1": 2,
        "input_blocks.7.1": 10,
        "input_blocks.8.1": 10,
        "middle_block.1": 10,
        "output_blocks.0.1": 10,
        "output_blocks.1.1": 10,
        "output_blocks.2.1": 10,
        "output_blocks.3.1": 2,
        "output_blocks.4.1": 2,
        "output_blocks.5.1": 2,
    }
    assert per_block == want
    te1 = {
        n.split(".")[7]
        for n in names
        if n.startswith("conditioner.embedders.0.transformer.text_model.encoder.layers.")
    }
    te2 = {
        n.split(".")[6] for n in names if n.startswith("conditioner.embedders.1.model.transformer.resblocks.")
    }
    assert len(te1) == 12 and len(te2) == 32
    sd = sdxl.state_dict()
    assert sd["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert sd["model.diffusion_model.label_emb.0.2.weight"].shape == (1280, 1280)
    assert sd["model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"].shape == (
        640,
        2048,
    )
    assert sd["model.diffusion_model.output_blocks.2.1.transformer_blocks.9.attn2.to_v.weight"].shape == (
        1280,
        2048,
    )
    assert sd["model.diffusion_model.input_blocks.4.1.proj_in.weight"].shape == (640, 640)
    assert sd["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (
        3840,
        1280,
    )
    assert sd["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k" not in names
    )  # no level-0 attn
    unet_params = sum(p.numel() for p in sdxl.get_submodule("model.diffusion_model").parameters())
    assert unet_params == pytest.approx(2.567e9, rel=0.005)


def test_replica_matches_real_open_clip_tree(sd2):
    pytest.importorskip("open_clip.model")
    real = full_sd2_tree(use_open_clip=True).get_submodule("cond_stage_model.model")
    replica = full_sd2_tree(use_open_clip=False).get_submodule("cond_stage_model.model")
    assert type(real).__module__.startswith("open_clip")
    assert {n for n, _ in real.named_modules()} == {n for n, _ in replica.named_modules()}
    shapes = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in replica.state_dict().items()}


def test_replica_matches_real_open_clip_numbers():
    oc = pytest.importorskip("open_clip.model")
    CLIP, CLIPTextCfg, CLIPVisionCfg = oc.CLIP, oc.CLIPTextCfg, oc.CLIPVisionCfg

    torch.manual_seed(0)
    real = CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=3),
    ).eval()
    del real.visual
    replica = OpenClipTextModel(width=64, layers=3, heads=4, embed_dim=32).eval()
    replica.load_state_dict(real.state_dict(), strict=True)
    tokens = torch.tensor([[49406, 320, 2368, 49407] + [0] * 73, [49406, 48136, 49407] + [0] * 74])
    with torch.no_grad():
        penultimate, _last, pooled = replica.forward_layers(tokens)
        torch.testing.assert_close(pooled, real.encode_text(tokens), rtol=1e-5, atol=1e-6)
        x = (real.token_embedding(tokens) + real.positional_embedding).permute(1, 0, 2)
        for r in real.transformer.resblocks[:-1]:
            x = r(x, attn_mask=real.attn_mask)
        torch.testing.assert_close(penultimate, x.permute(1, 0, 2), rtol=1e-5, atol=1e-6)
