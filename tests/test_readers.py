"""Readers: every supported format gives the right ΔW; every unsupported or broken input a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_loraclr.arch import detect_arch, detect_checkpoint_arch
from lib_loraclr.errors import (
    ArchitectureMismatchError,
    LoraFormatError,
    NonFiniteWeightsError,
    ShapeMismatchError,
    UnmappedKeysError,
)
from lib_loraclr.metadata import trigger_words
from lib_loraclr.readers import check_compatible, deltas_from_state_dict, read_lora, weight_shapes

UNET = "model.diffusion_model."
K_ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
C_ATTN = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
K_CONV = "lora_unet_down_blocks_1_resnets_0_conv1"
C_CONV = UNET + "input_blocks.4.0.in_layers.2"
K_PROJ = "lora_unet_mid_block_attentions_0_proj_in"
C_PROJ = UNET + "middle_block.1.proj_in"
K_TE = "lora_te_text_model_encoder_layers_3_mlp_fc1"
C_TE = "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1"


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lora(
    sd: dict,
    name: str,
    out: int,
    inp: int,
    r: int,
    k: int | None = None,
    alpha: float | None = None,
    seed: int = 0,
) -> None:
    g = _g(seed)
    if k is None:
        sd[f"{name}.lora_down.weight"] = torch.randn(r, inp, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(out, r, generator=g)
    else:
        sd[f"{name}.lora_down.weight"] = torch.randn(r, inp, k, k, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(out, r, 1, 1, generator=g)
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(alpha)


def _sd1_kohya() -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    _lora(sd, K_ATTN, 320, 768, 4, alpha=2.0, seed=1)
    _lora(sd, K_CONV, 640, 320, 4, k=3, alpha=1.0, seed=2)
    _lora(sd, K_PROJ, 1280, 1280, 8, k=1, seed=3)  # no alpha: scale 1
    _lora(sd, K_TE, 3072, 768, 4, alpha=4.0, seed=4)
    return sd


def _save(tmp_path: Path, sd: dict, name: str = "x.safetensors", meta: dict | None = None) -> Path:
    p = tmp_path / name
    save_file(sd, str(p), metadata=meta)
    return p


def test_kohya_lora_and_locon(tmp_path: Path) -> None:
    sd = _sd1_kohya()
    ds = read_lora(_save(tmp_path, sd))
    assert ds.arch == "sd1" and ds.fmt == "kohya" and ds.unmapped == []
    assert set(ds.modules) == {C_ATTN, C_CONV, C_PROJ, C_TE}
    up, down = sd[f"{K_ATTN}.lora_up.weight"], sd[f"{K_ATTN}.lora_down.weight"]
    torch.testing.assert_close(ds[C_ATTN].delta(), up @ down * (2.0 / 4), rtol=0, atol=0)
    # 3x3 conv: ΔW[o, i, kh, kw] = Σ_r up[o, r] down[r, i, kh, kw]
    up, down = sd[f"{K_CONV}.lora_up.weight"], sd[f"{K_CONV}.lora_down.weight"]
    ref = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * (1.0 / 4)
    torch.testing.assert_close(ds[C_CONV].delta(), ref, rtol=1e-5, atol=1e-5)
    assert ds[C_CONV].delta().shape == (640, 320, 3, 3) and ds[C_CONV].kind == "locon"
    assert ds[C_PROJ].alpha is None and ds[C_PROJ].scale == 1.0
    assert ds[C_PROJ].delta().shape == (1280, 1280, 1, 1)
    assert ds[C_TE].delta().shape == (3072, 768)


def test_ldm_named_unet_keys_read_like_diffusers_named(tmp_path: Path) -> None:
    sd = _sd1_kohya()
    renamed = {
        k.replace(K_ATTN, "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k")
        .replace(K_CONV, "lora_unet_input_blocks_4_0_in_layers_2")
        .replace(K_PROJ, "lora_unet_middle_block_1_proj_in"): v
        for k, v in sd.items()
    }
    a, b = (
        read_lora(_save(tmp_path, sd, "a.safetensors")),
        read_lora(_save(tmp_path, renamed, "b.safetensors")),
    )
    assert set(a.modules) == set(b.modules)
    for k in a.modules:
        assert torch.equal(a[k].delta(), b[k].delta())


def test_locon_cp_mid_folds_exactly() -> None:
    g = _g(5)
    r, cin, cout = 3, 8, 6
    down, mid, up = (
        torch.randn(r, cin, 1, 1, generator=g),
        torch.randn(r, r, 3, 3, generator=g),
        torch.randn(cout, r, 1, 1, generator=g),
    )
    sd = {
        f"{K_CONV}.lora_down.weight": down,
        f"{K_CONV}.lora_mid.weight": mid,
        f"{K_CONV}.lora_up.weight": up,
        f"{K_CONV}.alpha": torch.tensor(1.5),
    }
    ds = deltas_from_state_dict(sd, arch="sd1")
    m = ds[C_CONV]
    # A1111's rebuild_cp_decomposition: einsum('n m k l, i n, m j -> i j k l', mid, up, down)
    ref = torch.einsum("nmkl,in,mj->ijkl", mid, up.flatten(1), down.flatten(1)) * (1.5 / r)
    torch.testing.assert_close(m.delta(), ref, rtol=1e-5, atol=1e-6)
    assert m.rank == r and m.kind == "locon"


def test_peft_and_diffusers_names() -> None:
    g = _g(6)
    a, b = torch.randn(4, 768, generator=g), torch.randn(320, 4, generator=g)
    ta, tb = torch.randn(2, 768, generator=g), torch.randn(768, 2, generator=g)
    peft = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": a,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": b,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": ta,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": tb,
    }
    ds = deltas_from_state_dict(peft)
    assert ds.fmt == "peft" and ds.arch == "sd1"
    q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    assert set(ds.modules) == {C_ATTN, q}
    torch.testing.assert_close(ds[C_ATTN].delta(), b @ a)
    old = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": a,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight": b,
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": ta,
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": tb,
    }
    ds2 = deltas_from_state_dict(old)
    assert set(ds2.modules) == {C_ATTN, q} and ds2.fmt == "diffusers"
    dot = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": a,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight": b,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": ta,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": torch.randn(3072, 2),
    }
    ds3 = deltas_from_state_dict(dot)
    assert set(ds3.modules) == {C_ATTN, "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1"}


def test_sdxl_peft_text_encoder_2_maps_to_fused_openclip_rows() -> None:
    sd = {
        "text_encoder_2.text_model.encoder.layers.5.self_attn.k_proj.lora_A.weight": torch.randn(2, 1280),
        "text_encoder_2.text_model.encoder.layers.5.self_attn.k_proj.lora_B.weight": torch.randn(1280, 2),
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v.lora_A.weight": torch.randn(2, 2048),
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v.lora_B.weight": torch.randn(640, 2),
    }
    ds = deltas_from_state_dict(sd)
    assert ds.arch == "sdxl"
    assert set(ds.modules) == {
        "conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj:k",
        UNET + "input_blocks.4.1.transformer_blocks.1.attn2.to_v",
    }


def test_edlora_pth_with_embeddings(tmp_path: Path) -> None:
    g = _g(7)
    params = {
        "new_concept_embedding": {
            "<cat1>": torch.randn(16, 768, generator=g),
            "<cat2>": torch.randn(16, 768),
        },
        "text_encoder": {
            "text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight": torch.randn(
                32, 768, generator=g
            ),
            "text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight": torch.randn(768, 32, generator=g),
        },
        "unet": {
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_down.weight": torch.randn(
                32, 768
            ),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_up.weight": torch.randn(320, 32),
            # Mix-of-Show stores the 1x1-conv proj_in LoRA as linear factors
            "down_blocks.0.attentions.0.proj_in.lora_down.weight": torch.randn(32, 320),
            "down_blocks.0.attentions.0.proj_in.lora_up.weight": torch.randn(320, 32),
        },
    }
    p = tmp_path / "concept.pth"
    torch.save({"params": params}, p)
    ds = read_lora(p)
    assert ds.fmt == "edlora" and ds.arch == "sd1" and ds.unmapped == []
    assert set(ds.embeddings) == {"<cat1>", "<cat2>"} and ds.embeddings["<cat1>"].shape == (16, 768)
    assert ds[UNET + "input_blocks.1.1.proj_in"].delta().shape == (320, 320, 1, 1)
    u = params["unet"]
    torch.testing.assert_close(
        ds[C_ATTN].delta(),
        u["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_up.weight"]
        @ u["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_down.weight"],
    )
    assert ds[C_ATTN].alpha is None  # Mix-of-Show applies its own alpha at load time; scale 1 here


def test_loha_linear_conv_and_cp() -> None:
    g = _g(8)
    r = 4
    lin = {
        f"{K_ATTN}.hada_w1_a": torch.randn(320, r, generator=g),
        f"{K_ATTN}.hada_w1_b": torch.randn(r, 768, generator=g),
        f"{K_ATTN}.hada_w2_a": torch.randn(320, r, generator=g),
        f"{K_ATTN}.hada_w2_b": torch.randn(r, 768, generator=g),
        f"{K_ATTN}.alpha": torch.tensor(2.0),
    }
    conv = {
        f"{K_CONV}.hada_w1_a": torch.randn(640, r, generator=g),
        f"{K_CONV}.hada_w1_b": torch.randn(r, 320 * 9, generator=g),
        f"{K_CONV}.hada_w2_a": torch.randn(640, r, generator=g),
        f"{K_CONV}.hada_w2_b": torch.randn(r, 320 * 9, generator=g),
    }
    ds = deltas_from_state_dict({**lin, **conv}, arch="sd1")
    assert ds.fmt == "lycoris"
    ref = (
        (lin[f"{K_ATTN}.hada_w1_a"] @ lin[f"{K_ATTN}.hada_w1_b"])
        * (lin[f"{K_ATTN}.hada_w2_a"] @ lin[f"{K_ATTN}.hada_w2_b"])
        * (2.0 / r)
    )
    torch.testing.assert_close(ds[C_ATTN].delta(), ref)
    refc = (
        (conv[f"{K_CONV}.hada_w1_a"] @ conv[f"{K_CONV}.hada_w1_b"])
        * (conv[f"{K_CONV}.hada_w2_a"] @ conv[f"{K_CONV}.hada_w2_b"])
    ).reshape(640, 320, 3, 3)
    torch.testing.assert_close(ds[C_CONV].delta(), refc)
    assert ds[C_CONV].kind == "loha"
    # CP (Tucker) LoHa: each half = einsum('i j k l, j r, i p -> p r k l', t, w_b, w_a)
    t1, t2 = torch.randn(r, r, 3, 3, generator=g), torch.randn(r, r, 3, 3, generator=g)
    w1a, w1b, w2a, w2b = (
        torch.randn(r, 640, generator=g),
        torch.randn(r, 320, generator=g),
        torch.randn(r, 640, generator=g),
        torch.randn(r, 320, generator=g),
    )
    cp = {
        f"{K_CONV}.hada_t1": t1,
        f"{K_CONV}.hada_t2": t2,
        f"{K_CONV}.hada_w1_a": w1a,
        f"{K_CONV}.hada_w1_b": w1b,
        f"{K_CONV}.hada_w2_a": w2a,
        f"{K_CONV}.hada_w2_b": w2b,
    }
    d = deltas_from_state_dict(cp, arch="sd1")[C_CONV].delta()
    h1 = torch.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
    h2 = torch.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
    torch.testing.assert_close(d, h1 * h2)
    assert d.shape == (640, 320, 3, 3)


def test_lokr_linear_and_conv() -> None:
    g = _g(9)
    w1 = torch.randn(4, 8, generator=g)
    w2a, w2b = torch.randn(80, 2, generator=g), torch.randn(2, 96, generator=g)
    sd = {
        f"{K_ATTN}.lokr_w1": w1,
        f"{K_ATTN}.lokr_w2_a": w2a,
        f"{K_ATTN}.lokr_w2_b": w2b,
        f"{K_ATTN}.alpha": torch.tensor(1.0),
    }
    cw1, cw2 = torch.randn(4, 4, generator=g), torch.randn(160, 80, 3, 3, generator=g)
    sd.update({f"{K_CONV}.lokr_w1": cw1, f"{K_CONV}.lokr_w2": cw2})
    ds = deltas_from_state_dict(sd, arch="sd1")
    torch.testing.assert_close(ds[C_ATTN].delta(), torch.kron(w1, w2a @ w2b) * 0.5)
    ref = torch.kron(cw1[:, :, None, None], cw2)  # A1111 make_kron for 4-D w2
    torch.testing.assert_close(ds[C_CONV].delta(), ref)
    assert ds[C_CONV].delta().shape == (640, 320, 3, 3) and ds[C_CONV].kind == "lokr"


def test_full_diff_module() -> None:
    d = torch.randn(320, 768)
    ds = deltas_from_state_dict({f"{K_ATTN}.diff": d}, arch="sd1")
    assert torch.equal(ds[C_ATTN].delta(), d) and ds[C_ATTN].kind == "full"


@pytest.mark.parametrize(
    ("suffixes", "shape", "name"),
    [
        ((".oft_blocks",), (4, 80, 80), "OFT"),
        ((".oft_blocks",), (2, 4, 80, 80), "BOFT"),
        ((".oft_diag",), (4, 80, 80), "OFT"),
        ((".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight"), (4, 4), "GLoRA"),
        ((".on_input",), (1,), "IA"),
        ((".lora_down.weight", ".lora_up.weight", ".dora_scale"), None, "DoRA"),
    ],
)
def test_unsupported_lycoris_types_are_named(tmp_path: Path, suffixes, shape, name) -> None:
    sd: dict[str, torch.Tensor] = {}
    if shape is None:
        _lora(sd, K_ATTN, 320, 768, 4)
        sd[f"{K_ATTN}.dora_scale"] = torch.ones(1, 768)
    else:
        for s in suffixes:
            sd[K_ATTN + s] = torch.randn(*shape)
    with pytest.raises(LoraFormatError, match=f"x.safetensors: .*{name}.* not supported"):
        read_lora(_save(tmp_path, sd))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_name_the_key(tmp_path: Path, bad: float) -> None:
    sd = _sd1_kohya()
    sd[f"{K_CONV}.lora_up.weight"][3, 1, 0, 0] = bad
    with pytest.raises(NonFiniteWeightsError, match=rf"x\.safetensors: tensor {K_CONV}\.lora_up\.weight"):
        read_lora(_save(tmp_path, sd))
    sd = _sd1_kohya()
    sd[f"{K_ATTN}.alpha"] = torch.tensor(bad)
    with pytest.raises(NonFiniteWeightsError, match=f"{K_ATTN}.alpha"):
        deltas_from_state_dict(sd)


def test_rank_mismatch(tmp_path: Path) -> None:
    sd = _sd1_kohya()
    sd[f"{K_ATTN}.lora_up.weight"] = torch.randn(320, 5)
    with pytest.raises(
        ShapeMismatchError, match=rf"{K_ATTN}: rank mismatch, lora_down has rank 4 .* lora_up has rank 5"
    ):
        read_lora(_save(tmp_path, sd))


def test_missing_half(tmp_path: Path) -> None:
    sd = _sd1_kohya()
    del sd[f"{K_TE}.lora_up.weight"]
    with pytest.raises(LoraFormatError, match=f"{K_TE} has lora_down but no lora_up"):
        read_lora(_save(tmp_path, sd))


def test_unknown_keys_are_reported_not_dropped(tmp_path: Path) -> None:
    sd = _sd1_kohya()
    sd["lora_unet_made_up_module.lora_down.weight"] = torch.randn(4, 4)
    sd["lora_unet_made_up_module.lora_up.weight"] = torch.randn(4, 4)
    sd["something_else"] = torch.zeros(2)
    ds = read_lora(_save(tmp_path, sd))
    assert len(ds) == 4
    assert sorted(ds.unmapped) == [
        "lora_unet_made_up_module.lora_down.weight",
        "lora_unet_made_up_module.lora_up.weight",
        "something_else",
    ]


def test_unknown_key_family_only(tmp_path: Path) -> None:
    sd = {
        "lora_transformer_single_blocks_0_attn_to_q.lora_down.weight": torch.randn(4, 8),
        "lora_transformer_single_blocks_0_attn_to_q.lora_up.weight": torch.randn(8, 4),
    }
    with pytest.raises(
        LoraFormatError, match=r"none of its 2 tensors is a LoRA weight we recognise.*lora_transformer"
    ):
        read_lora(_save(tmp_path, sd))
    ck = {UNET + "input_blocks.1.1.proj_in.weight": torch.randn(4, 4)}
    with pytest.raises(LoraFormatError, match="full model checkpoint"):
        read_lora(_save(tmp_path, ck, "ckpt.safetensors"))


def test_sdxl_lora_for_sd1_model(tmp_path: Path) -> None:
    sd: dict[str, torch.Tensor] = {}
    _lora(sd, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048, 4, alpha=4.0)
    _lora(sd, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, 4, alpha=4.0)
    _lora(sd, "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280, 4, alpha=4.0)
    p = _save(tmp_path, sd, "xl.safetensors")
    ds = read_lora(p)
    assert ds.arch == "sdxl"
    with pytest.raises(
        ArchitectureMismatchError, match=r"xl\.safetensors is a SDXL LoRA, but SD1\.x was expected"
    ):
        read_lora(p, arch="sd1")
    sd1_model = {C_ATTN + ".weight": (320, 768), C_TE + ".weight": (3072, 768)}
    with pytest.raises(ArchitectureMismatchError, match=r"is a SDXL LoRA but the model is SD1\.x"):
        check_compatible(ds, sd1_model)


def test_check_compatible_shapes_and_missing() -> None:
    ds = deltas_from_state_dict(_sd1_kohya())
    shapes = {
        C_ATTN + ".weight": (320, 768),
        C_CONV + ".weight": (640, 320, 3, 3),
        C_PROJ + ".weight": (1280, 1280),  # linear proj_in (SD2-style) accepts a 1x1 conv delta
        C_TE + ".weight": (3072, 768),
    }
    assert check_compatible(ds, shapes, arch="sd1") == []
    bad = dict(shapes)
    bad[C_ATTN + ".weight"] = (320, 1024)
    with pytest.raises(
        ShapeMismatchError,
        match=r"to_k: the LoRA delta has shape \(320, 768\) but the model's weight "
        r"has shape \(320, 1024\)",
    ):
        check_compatible(ds, bad, arch="sd1")
    part = dict(shapes)
    del part[C_TE + ".weight"]
    with pytest.raises(UnmappedKeysError) as ei:
        check_compatible(ds, part, arch="sd1")
    assert ei.value.keys == [C_TE]
    assert check_compatible(ds, part, arch="sd1", strict=False) == [C_TE]


def test_check_compatible_with_module_and_fused_rows() -> None:
    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2)

    m = torch.nn.Module()
    m.cond_stage_model = torch.nn.Module()  # type: ignore[attr-defined]
    m.cond_stage_model.model = torch.nn.Module()  # type: ignore[attr-defined]
    m.cond_stage_model.model.transformer = torch.nn.Module()  # type: ignore[attr-defined]
    m.cond_stage_model.model.transformer.resblocks = torch.nn.ModuleList([Attn()])  # type: ignore[attr-defined]
    shapes = weight_shapes(m)
    assert shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj:v"] == (16, 16)
    sd = {
        "lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_down.weight": torch.randn(2, 16),
        "lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_up.weight": torch.randn(16, 2),
    }
    ds = deltas_from_state_dict(sd, arch="sd2")
    assert check_compatible(ds, m, arch="sd2") == []


def test_detect_arch_rules() -> None:
    assert detect_arch(["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]) == "sdxl"
    k = f"{K_ATTN}.lora_down.weight"
    assert detect_arch([k], {k: (4, 768)}) == "sd1"
    assert detect_arch([k], {k: (4, 1024)}) == "sd2"
    assert detect_arch([k], {k: (4, 2048)}) == "sdxl"
    t = f"{K_TE}.lora_down.weight"
    assert detect_arch([t], {t: (4, 1024)}) == "sd2"
    assert (
        detect_arch(["lora_unet_input_blocks_7_1_transformer_blocks_3_attn1_to_q.lora_up.weight"]) == "sdxl"
    )
    assert detect_arch(["x.lora_up.weight"], metadata={"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert detect_arch(["x.lora_up.weight"], metadata={"ss_v2": "True"}) == "sd2"
    assert (
        detect_arch(["x.lora_up.weight"], metadata={"modelspec.architecture": "stable-diffusion-v1/lora"})
        == "sd1"
    )
    assert detect_arch(["x.lora_up.weight"]) == "unknown"
    assert detect_checkpoint_arch({"conditioner.embedders.1.model.ln_final.weight": (1280,)}) == "sdxl"
    assert detect_checkpoint_arch({C_ATTN + ".weight": (320, 1024)}) == "sd2"


def test_trigger_words() -> None:
    freq = '{"10_sks dog": {"sks": 20, "dog": 20, "grass": 3}, "5_other": {"sks": 5, "sitting": 4}}'
    assert trigger_words({"ss_tag_frequency": freq}, limit=3) == ["sks", "dog", "sitting"]
    assert trigger_words({"loraclr_trigger": '["ohwx", "cat"]', "ss_tag_frequency": freq}) == ["ohwx", "cat"]
    assert trigger_words({"modelspec.trigger_phrase": "a, b"}) == ["a", "b"]
    assert trigger_words({"ss_tag_frequency": "not json"}) == []
    ds = deltas_from_state_dict(_sd1_kohya(), {"ss_tag_frequency": freq})
    assert ds.trigger_words()[:2] == ["sks", "dog"]
