"""SD1Model: SD1 checkpoint layout from the real classes, deterministic init, safetensors round trip."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.models.sd import (
    SD1Config,
    TinyCheckpointError,
    build_tiny_sd1,
    load_tiny_checkpoint,
    save_tiny_checkpoint,
    sd_alphas_cumprod,
)

SD1_ATTN2 = (
    [f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)]
    + ["middle_block.1"]
    + [f"output_blocks.{i}.1" for i in range(3, 12)]
)


@pytest.fixture(scope="module")
def model():
    return build_tiny_sd1(seed=0)


def test_sd1_key_layout(model):
    keys = list(model.state_dict())
    assert all(
        k.startswith(("model.diffusion_model.", "cond_stage_model.transformer.text_model.")) for k in keys
    )
    to_k = sorted(k for k in keys if k.endswith("attn2.to_k.weight"))
    want = sorted(f"model.diffusion_model.{b}.transformer_blocks.0.attn2.to_k.weight" for b in SD1_ATTN2)
    assert to_k == want and len(to_k) == 16
    for k in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.out.2.weight",
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert k in keys, k
    # proj_in / proj_out are 1x1 convs in SD1 (use_linear_in_transformer False)
    assert model.state_dict()["model.diffusion_model.input_blocks.1.1.proj_out.weight"].dim() == 4
    assert model.parameterization == "eps"


def test_schedule(model):
    ac = model.alphas_cumprod
    assert ac.shape == (1000,) and "alphas_cumprod" not in model.state_dict()
    assert ac[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    sigma = ((1 - ac) / ac).sqrt()  # SD's well-known sigma range 0.0292 … 14.6146
    assert sigma[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert sigma[-1].item() == pytest.approx(14.6146, abs=1e-3)
    torch.testing.assert_close(ac, sd_alphas_cumprod())


def test_deterministic_init_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_sd1(seed=5)
    after = torch.rand(3)
    assert torch.equal(before, after)
    b = build_tiny_sd1(seed=5)
    c = build_tiny_sd1(seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.diffusion_model.out.2.weight"], sc["model.diffusion_model.out.2.weight"])


def test_no_zero_output_layers(model):
    sd = model.state_dict()
    zero = [k for k, v in sd.items() if k.endswith(".weight") and v.dim() >= 2 and not bool(v.any())]
    assert zero == []


def test_apply_model_depends_on_cond_and_proj_out(model):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a photo of a cat", "a photo of a cat"])
        other = model.get_learned_conditioning(["sks", "sks"])
        e = model.apply_model(x, t, cond)
        assert e.shape == (2, 4, 16, 16)
        assert (e - model.apply_model(x, t, other)).abs().max() > 1e-4
        torch.testing.assert_close(model.apply_model(x, t, {"c_crossattn": [cond]}), e)
        w = model.model.diffusion_model.output_blocks[5][1].proj_out.weight
        saved = w.clone()
        w.add_(0.05)
        try:
            assert (model.apply_model(x, t, cond) - e).abs().max() > 1e-4
        finally:
            w.copy_(saved)
        torch.testing.assert_close(model.apply_model(x, t, cond), e, rtol=0, atol=0)


def test_learned_conditioning_shape(model):
    with torch.no_grad():
        c = model.get_learned_conditioning(["a cat", "a BREAK b"])
    assert c.shape == (2, 154, 64)


def test_checkpoint_round_trip(model, tmp_path):
    path = save_tiny_checkpoint(model, tmp_path / "tiny.safetensors")
    loaded = load_tiny_checkpoint(path)
    sa, sb = model.state_dict(), loaded.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.config == model.config
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(sa)
        assert "loraclr_tiny_config" in f.metadata()
    with pytest.raises(FileExistsError):
        save_tiny_checkpoint(model, path)
    assert not list(tmp_path.glob("*.tmp"))


def test_custom_config_round_trip(tmp_path):
    cfg = SD1Config(clip_skip=2)
    cfg.unet.channel_mult = [1, 2]
    cfg.unet.attention_resolutions = [1, 2]
    m = build_tiny_sd1(seed=1, config=cfg)
    loaded = load_tiny_checkpoint(save_tiny_checkpoint(m, tmp_path / "m.safetensors"))
    assert loaded.config.unet.channel_mult == [1, 2] and loaded.prompt_encoder.clip_skip == 2
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.get_learned_conditioning(["a cat"]), m.get_learned_conditioning(["a cat"]), rtol=0, atol=0
        )


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(p))
    with pytest.raises(TinyCheckpointError, match="loraclr_tiny_config"):
        load_tiny_checkpoint(p)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(TinyCheckpointError):
        load_tiny_checkpoint(bad)


# ------------------------------------------------------------------------------------------------ SDXL


@pytest.fixture(scope="module")
def xl():
    from lib_loraclr.models.sd import build_tiny_sdxl

    return build_tiny_sdxl(seed=0)


def test_sdxl_key_layout(xl):
    keys = list(xl.state_dict())
    prefixes = (
        "model.diffusion_model.",
        "conditioner.embedders.0.transformer.text_model.",
        "conditioner.embedders.1.model.",
    )
    assert all(k.startswith(prefixes) for k in keys)
    to_k = sorted(k.split(".transformer_blocks.")[0] for k in keys if k.endswith("attn2.to_k.weight"))
    blocks = [
        "input_blocks.4.1",
        "input_blocks.5.1",
        "input_blocks.7.1",
        "input_blocks.8.1",
        "middle_block.1",
    ]
    blocks += [f"output_blocks.{i}.1" for i in range(6)]
    assert sorted(set(to_k)) == sorted(f"model.diffusion_model.{b}" for b in blocks)
    assert len(to_k) == 22  # depth 2 in every SDXL attention block (SDXL base: 2 / 10 → 70)
    for k in (
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.label_emb.0.2.weight",
        "model.diffusion_model.input_blocks.4.1.proj_in.weight",
        "model.diffusion_model.input_blocks.7.0.skip_connection.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_fc.weight",
        "conditioner.embedders.1.model.text_projection",
    ):
        assert k in keys, k
    sd = xl.state_dict()
    assert sd["model.diffusion_model.input_blocks.4.1.proj_in.weight"].dim() == 2  # linear, as SDXL
    assert sd["model.diffusion_model.label_emb.0.0.weight"].shape == (128, 160)
    assert sd["model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"].shape[1] == 128


def test_sdxl_full_depth_option():
    from lib_loraclr.models.sd import SDXLConfig, SDXLModel

    cfg = SDXLConfig()
    cfg.unet.transformer_depth = [1, 2, 10]
    m = SDXLModel(cfg)
    assert len([n for n, _ in m.named_modules() if n.endswith(".attn2")]) == 70


def test_sdxl_conditioning(xl):
    with torch.no_grad():
        c = xl.get_learned_conditioning(["a photo of sks", "a cat BREAK dog"])
        assert c["crossattn"].shape == (2, 154, 128) and c["vector"].shape == (2, 160)
        one = xl.get_learned_conditioning(["a photo of sks"])
        torch.testing.assert_close(one["crossattn"], c["crossattn"][:1, :77], rtol=1e-5, atol=1e-5)
        te1 = xl.conditioner.embedders[0].transformer
        ids = torch.tensor(xl.te1_encoder.chunk_ids("a photo of sks"))
        # sgm's layer "hidden": hidden_states[-2], no final norm
        h = te1(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(one["crossattn"][..., :64], h, rtol=1e-5, atol=1e-6)
        te2 = xl.conditioner.embedders[1].model
        ids2 = ids.clone()
        ids2[0, 6:] = 0  # BOS a photo of sks EOS; A1111 pads OpenCLIP chunks with 0 after the first EOS
        pen, _, pooled = te2.forward_layers(ids2)
        torch.testing.assert_close(one["crossattn"][..., 64:], pen, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one["vector"][:, :64], pooled, rtol=1e-5, atol=1e-6)
        from ldm.modules.diffusionmodules.util import timestep_embedding

        size = timestep_embedding(torch.tensor([1024.0, 1024.0]), 16).reshape(1, 32)
        torch.testing.assert_close(one["vector"][:, 64:96], size)
        assert one["vector"][:, 96:128].abs().sum() > 0  # crop (0, 0): cos(0) = 1
        small = xl.get_learned_conditioning(["a photo of sks"], original_size=(512, 512))
        assert (small["vector"][:, 64:96] - one["vector"][:, 64:96]).abs().max() > 0.1
        neg = xl.get_learned_conditioning(["", ""], is_negative_prompt=True)
        assert neg["crossattn"].abs().sum() == 0 and neg["vector"][:, :64].abs().sum() == 0
        assert neg["vector"][:, 64:].abs().sum() > 0


def test_sdxl_apply_model_and_round_trip(xl, tmp_path):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([20.0, 600.0])
    with torch.no_grad():
        c = xl.get_learned_conditioning(["a photo of sks", "a cat"])
        e = xl.apply_model(x, t, c)
        assert e.shape == (2, 4, 8, 8)
        c2 = dict(c, vector=c["vector"].flip(0))
        assert (xl.apply_model(x, t, c2) - e).abs().max() > 1e-4  # the vector matters (label_emb)
        torch.testing.assert_close(
            xl.apply_model(x, t, {"c_crossattn": [c["crossattn"]], "c_adm": c["vector"]}), e
        )
        with pytest.raises(TypeError):
            xl.apply_model(x, t, c["crossattn"])
    loaded = load_tiny_checkpoint(save_tiny_checkpoint(xl, tmp_path / "xl.safetensors"))
    assert type(loaded).__name__ == "SDXLModel" and loaded.config == xl.config
    sa, sb = xl.state_dict(), loaded.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        torch.testing.assert_close(loaded.apply_model(x, t, c), e, rtol=0, atol=0)


def test_deepcopy_keeps_encoder_bound_to_its_text_model(model):
    import copy

    dup = copy.deepcopy(model)
    assert dup.prompt_encoder.text_model is dup.cond_stage_model.transformer
    assert dup.prompt_encoder.text_model is not model.cond_stage_model.transformer


def test_load_takes_files_with_or_without_clip_position_ids(tmp_path):
    """transformers < 4.31 (A1111 1.10's 4.30.2) saves CLIP's ``position_ids`` buffer and expects it; newer
    versions do neither. A tiny checkpoint from either loads under both; any other missing or extra key is
    refused with its name."""
    from safetensors.torch import load_file, save_file

    from lib_loraclr.safeio import read_safetensors_metadata

    m = build_tiny_sd1(seed=3)
    src = save_tiny_checkpoint(m, tmp_path / "m.safetensors")
    tensors, meta = load_file(str(src)), read_safetensors_metadata(src)
    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    with_ids = tmp_path / "with_ids.safetensors"
    save_file({**tensors, pid: torch.arange(77).unsqueeze(0)}, str(with_ids), metadata=meta)
    without = tmp_path / "without.safetensors"
    save_file({k: v for k, v in tensors.items() if k != pid}, str(without), metadata=meta)
    for p in (with_ids, without):
        with torch.no_grad():
            torch.testing.assert_close(
                load_tiny_checkpoint(p).get_learned_conditioning(["a cat"]),
                m.get_learned_conditioning(["a cat"]),
                rtol=0,
                atol=0,
            )
    gone = next(k for k in tensors if k.endswith("attn2.to_k.weight"))
    broken = tmp_path / "broken.safetensors"
    save_file(
        {**{k: v for k, v in tensors.items() if k != gone}, "extra.weight": torch.zeros(1)},
        str(broken),
        metadata=meta,
    )
    with pytest.raises(
        TinyCheckpointError, match=r"missing keys \['" + gone.replace(".", r"\.") + r"'\].*extra\.weight"
    ):
        load_tiny_checkpoint(broken)
