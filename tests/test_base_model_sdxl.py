"""The merge base from a full SDXL checkpoint (`lib_loraclr.base_model.load_base`): the WebUI's sgm key layout
(UNet ``model.diffusion_model.*``, CLIP-L ``conditioner.embedders.0.transformer.text_model.*``, OpenCLIP
bigG ``conditioner.embedders.1.model.*`` with fused ``in_proj_weight``, the VAE ignored) at reduced sizes,
loaded into a model that computes what the same weights compute; a two-concept merge through
`lib_loraclr.merge.job` on it; and the refusals (a missing tensor, other architectures)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib_loraclr.apply import patched
from lib_loraclr.base_model import BaseModelError, load_base, sdxl_config_from_shapes
from lib_loraclr.keymap import kohya_to_canonical
from lib_loraclr.merge.job import JobConcept, MergeJob, run_job
from lib_loraclr.models.full_trees import full_sdxl_tree
from lib_loraclr.models.half import HalfStoredConv2d, HalfStoredLinear
from lib_loraclr.models.sd import (
    OpenClipConfig,
    SD1Config,
    SD1Model,
    SDXLConfig,
    SDXLModel,
    SDXLUNetConfig,
    SDXLUNetSpec,
    TextConfig,
    _build_sdxl_unet,
    build_tiny_sd1,
    build_tiny_sdxl,
    integrated_unet_kwargs,
)
from lib_loraclr.readers import read_lora
from lib_loraclr.writers import write_kohya_lora

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_factory import attention_keys, random_lora

TE1 = "conditioner.embedders.0.transformer.text_model."
TE2 = "conditioner.embedders.1.model."
#: a few VAE tensors: a WebUI checkpoint holds its VAE, the merge ignores it
VAE = {
    "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3),
    "first_stage_model.decoder.conv_out.bias": torch.zeros(3),
    "first_stage_model.quant_conv.weight": torch.randn(8, 8, 1, 1),
}


def _config(full_layout: bool) -> SDXLConfig:
    """SDXL's module layout at reduced width (32 UNet channels, 64-d text encoders). ``full_layout``: SDXL
    base's exact key set (UNet depths [0, 2, 10] = 70 transformer blocks, CLIP-L 12 and bigG 32 layers);
    else 1 block per attention level and 2 layers per text encoder (fast merges)."""
    depth, l1, l2 = ([0, 2, 10], 12, 32) if full_layout else ([0, 1, 1], 2, 2)
    return SDXLConfig(
        unet=SDXLUNetConfig(attention_resolutions=[2, 4], transformer_depth=depth, num_head_channels=64),
        te1=TextConfig(hidden_size=64, layers=l1, heads=1),
        te2=OpenClipConfig(width=64, layers=l2, heads=1, embed_dim=64),
    )


def _write(model: torch.nn.Module, path: Path, drop: str = "", extra: dict | None = None) -> Path:
    """The model's weights as the WebUI stores an SDXL checkpoint: fp16, the VAE beside, CLIP-L's int64
    ``position_ids``, no tiny-model metadata."""
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if k != drop}
    sd[TE1 + "embeddings.position_ids"] = torch.arange(77)[None]
    save_file({**sd, **VAE, **(extra or {})}, str(path), metadata={"format": "pt"})
    return path


def _reference(model: torch.nn.Module, cfg: SDXLConfig) -> SDXLModel:
    """An `SDXLModel` built directly from ``model``'s weights rounded to fp16 (what the file holds), fp32."""
    ref = SDXLModel(cfg)
    ref.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return ref.eval()


@pytest.fixture(scope="module")
def full_layout(tmp_path_factory):
    cfg = _config(full_layout=True)
    src = build_tiny_sdxl(seed=3, config=cfg)
    path = _write(src, tmp_path_factory.mktemp("xl") / "sdxl_layout.safetensors")
    return src, cfg, path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = _config(full_layout=False)
    src = build_tiny_sdxl(seed=5, config=cfg)
    folder = tmp_path_factory.mktemp("xl_small")
    return src, cfg, _write(src, folder / "base.safetensors"), folder


def test_reduced_checkpoint_has_sdxl_base_key_names(full_layout) -> None:
    _, _, path = full_layout
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    # SDXL base at full size, built on meta (CLIP's position_ids: a saved buffer only in transformers < 4.31)
    real = {k for k in full_sdxl_tree().state_dict() if not k.endswith("position_ids")}
    ours = {k for k in keys if not k.startswith("first_stage_model.") and not k.endswith("position_ids")}
    assert ours == real and len(real) == 2266
    assert TE2 + "transformer.resblocks.31.attn.in_proj_weight" in keys  # bigG's fused q/k/v
    assert "model.diffusion_model.output_blocks.2.1.transformer_blocks.9.attn2.to_k.weight" in keys


def test_sdxl_sizes_read_from_shapes_at_full_size() -> None:
    shapes = {k: tuple(v.shape) for k, v in full_sdxl_tree().state_dict().items()}
    cfg = sdxl_config_from_shapes(shapes)
    assert cfg["unet"] == {
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "channel_mult": [1, 2, 4],
        "num_res_blocks": 2,
        "attention_resolutions": [2, 4],
        "transformer_depth": [0, 2, 10],
        "num_head_channels": 64,
    }
    assert cfg["te1"] == {
        "hidden_size": 768,
        "layers": 12,
        "heads": 12,
        "intermediate": 3072,
        "max_position_embeddings": 77,
    }
    assert cfg["te2"] == {"width": 1280, "layers": 32, "heads": 20, "embed_dim": 1280}
    xl = SDXLConfig.from_dict(cfg)
    assert (xl.context_dim, xl.adm_in_channels, cfg["size_embed_dim"]) == (2048, 2816, 256)


def test_full_layout_loads_with_every_tensor_in_place(full_layout) -> None:
    src, cfg, path = full_layout
    m = load_base(path)
    assert isinstance(m, SDXLModel) and m.config == cfg
    ref = src.state_dict()
    for k, v in m.state_dict().items():  # every tensor holds exactly the file's (fp16) value
        assert torch.equal(v.float(), ref[k].half().float()), k
    # fp16 storage, fp32 compute: plain Linear/Conv2d keep the file's dtype; bigG's attention is float32
    unet = m.model.diffusion_model
    assert type(unet.input_blocks[1][0].in_layers[2]) is HalfStoredConv2d
    assert unet.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert type(unet.middle_block[1].transformer_blocks[9].attn2.to_k) is HalfStoredLinear
    te2 = m.conditioner.embedders[1].model
    assert te2.transformer.resblocks[31].attn.in_proj_weight.dtype == torch.float32
    assert te2.transformer.resblocks[31].attn.out_proj.weight.dtype == torch.float32
    assert te2.logit_scale.dtype == torch.float32 and not te2.attn_mask.is_meta


def test_load_base_computes_what_the_weights_compute(small) -> None:
    src, cfg, path, _ = small
    m = load_base(path)
    assert isinstance(m, SDXLModel) and m.config == cfg
    ref = _reference(src, cfg)
    prompts = ["photo of a sks dog", "ohwx, (red:1.2) car BREAK on a hill"]
    c, c_ref = m.get_learned_conditioning(prompts), ref.get_learned_conditioning(prompts)
    assert c["crossattn"].shape == (2, 154, 128) and c["vector"].shape == (2, 64 + 6 * 16)
    for key in ("crossattn", "vector"):
        torch.testing.assert_close(c[key], c_ref[key], rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900.0, 25.0])
    eps = m.apply_model(x, t, c)
    torch.testing.assert_close(eps, ref.apply_model(x, t, c_ref), rtol=0, atol=0)
    assert eps.dtype == torch.float32 and eps.std() > 0.01
    # the same with float32 storage, and the vector y (pooled te2 + sizes) changes the prediction
    m32 = load_base(path, half_storage=False)
    assert {v.dtype for v in m32.state_dict().values() if v.is_floating_point()} == {torch.float32}
    torch.testing.assert_close(m32.apply_model(x, t, c), eps, rtol=0, atol=0)
    other = {**c, "vector": c["vector"] + 1.0}
    assert (m.apply_model(x, t, other) - eps).abs().max() > 1e-4


def test_bf16_checkpoint_stays_bf16_and_computes_in_float32(small, tmp_path) -> None:
    src, cfg, _, _ = small
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "bf16.safetensors"))
    m = load_base(tmp_path / "bf16.safetensors")
    to_k = m.model.diffusion_model.middle_block[1].transformer_blocks[0].attn2.to_k
    assert type(to_k) is HalfStoredLinear and to_k.weight.dtype == torch.bfloat16
    ref = SDXLModel(cfg)
    ref.load_state_dict({k: v.float() for k, v in sd.items()})
    c = ref.eval().get_learned_conditioning(["photo of a sks"])
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([600.0])
    torch.testing.assert_close(
        m.get_learned_conditioning(["photo of a sks"])["vector"], c["vector"], rtol=0, atol=0
    )
    torch.testing.assert_close(m.apply_model(x, t, c), ref.apply_model(x, t, c), rtol=0, atol=0)


def test_missing_extra_and_misshaped_tensors_are_named(small, tmp_path) -> None:
    src, _, _, _ = small
    gone = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(
        BaseModelError, match=r"lacks 1 tensor.*middle_block\.1\.transformer_blocks\.0\.attn2"
    ):
        load_base(_write(src, tmp_path / "missing.safetensors", drop=gone))
    gone = TE2 + "transformer.resblocks.1.attn.in_proj_weight"
    with pytest.raises(BaseModelError, match=r"resblocks\.1\.attn\.in_proj_weight"):
        load_base(_write(src, tmp_path / "missing_te2.safetensors", drop=gone))
    extra = {TE2 + "transformer.resblocks.0.attn.extra_weight": torch.zeros(3)}
    with pytest.raises(BaseModelError, match=r"holds 1 tensor.*resblocks\.0\.attn\.extra_weight"):
        load_base(_write(src, tmp_path / "extra.safetensors", extra=extra))
    bad = {TE1 + "encoder.layers.0.mlp.fc2.weight": torch.zeros(64, 128)}
    with pytest.raises(BaseModelError, match=r"layers\.0\.mlp\.fc2\.weight' has shape \[64, 128\]"):
        load_base(_write(src, tmp_path / "shape.safetensors", extra=bad))
    # logit_scale is not used by the merge: a checkpoint without it loads (filled with CLIP's initial value)
    m = load_base(_write(src, tmp_path / "no_logit.safetensors", drop=TE2 + "logit_scale"))
    assert m.conditioner.embedders[1].model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_sd1_still_loads_and_other_architectures_are_refused(tmp_path) -> None:
    ref = build_tiny_sd1(seed=4, config=SD1Config(text=TextConfig(heads=1)))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "sd1.safetensors"))
    m = load_base(tmp_path / "sd1.safetensors")
    assert isinstance(m, SD1Model)
    assert {v.dtype for v in m.state_dict().values() if v.is_floating_point()} == {torch.float32}
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    flux = {
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2),
        "model.diffusion_model.img_in.weight": torch.zeros(2, 2),
        "text_encoders.t5xxl.transformer.shared.weight": torch.zeros(2, 2),
    }
    save_file(flux, str(tmp_path / "flux.safetensors"))
    with pytest.raises(BaseModelError, match=r"not an SD1\.x checkpoint .* nor an SDXL-family one"):
        load_base(tmp_path / "flux.safetensors")
    sd2 = {
        "cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(2, 2),
    }
    save_file(sd2, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(BaseModelError, match=r"not an SD1\.x checkpoint"):
        load_base(tmp_path / "sd2.safetensors")
    refiner = {
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2),
        "conditioner.embedders.0.model.token_embedding.weight": torch.zeros(2, 2),
    }
    save_file(refiner, str(tmp_path / "refiner.safetensors"))
    with pytest.raises(BaseModelError, match="SDXL refiner"):
        load_base(tmp_path / "refiner.safetensors")


def _eps(model: torch.nn.Module, prompt: str, deltas: object = None) -> torch.Tensor:
    """ε for one fixed latent and timestep with ``deltas`` added into the weights (text encoders + UNet)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad(), patched(model, deltas if deltas is not None else {}):
        return model.apply_model(x, torch.tensor([500.0]), model.get_learned_conditioning([prompt]))


def test_two_concept_merge_job_on_an_sdxl_checkpoint(small) -> None:
    src, _, base, folder = small
    keys = [
        k for k in attention_keys(src) if not k.endswith(("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"))
    ]
    triggers = ("sks", "ohwx")
    loras = []
    for seed, trig in enumerate(triggers, start=1):
        ds = random_lora(src, keys, seed=seed, arch="sdxl")
        write_kohya_lora(ds, folder / f"{trig}.safetensors", arch="sdxl", metadata={"ss_output_name": trig})
        loras.append(read_lora(folder / f"{trig}.safetensors"))
    out = folder / "merged.safetensors"
    job = MergeJob(
        base=base,
        concepts=tuple(JobConcept(folder / f"{t}.safetensors", t) for t in triggers),
        out=out,
        options={"sample_steps": 1},
    )
    res = run_job(job)
    with safe_open(str(out), framework="pt") as f:
        names = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    canon = {n: kohya_to_canonical(n, "sdxl") for n in names}
    assert None not in canon.values() and set(canon.values()) == set(keys)  # every module, every name known
    assert "lora_te2_text_model_encoder_layers_1_self_attn_q_proj" in names  # bigG's fused q rows
    merged = read_lora(out)
    assert merged.arch == "sdxl" and not merged.unmapped
    for g in ("te", "kv", "unet"):  # the UNet layers were fitted on sampling runs with SDXL's y vector
        for trig in triggers:
            assert res.report["groups"][g]["concepts"][trig]["rel_err"] < 1.0, (g, trig)
    model = load_base(base)  # a fresh base: the job's was promoted to float32 where the LoRAs act
    for i, trig in enumerate(triggers):
        prompt = f"photo of a {trig}"
        own, other = _eps(model, prompt, loras[i]), _eps(model, prompt, loras[1 - i])
        base_eps, merged_eps = _eps(model, prompt), _eps(model, prompt, merged)
        # the merged LoRA moves the base's prediction toward the concept's own LoRA, and ends nearer to it
        # than the other concept's LoRA does (random LoRAs act on every token, so the merge compromises on
        # the shared words "photo of a"; measured: cos 0.83 / 0.44, distance ratio 0.62 / 0.86)
        move, want = (merged_eps - base_eps).flatten(), (own - base_eps).flatten()
        assert move @ want / (move.norm() * want.norm()) > 0.25, trig
        assert (merged_eps - own).norm() < (other - own).norm(), trig
    assert res.report and res.file == out


def test_checkpoint_output_keeps_the_input_key_names(small) -> None:
    src, _, base, folder = small
    keys = [k for k in attention_keys(src, other=False) if "embedders.1" in k or ".attn2." in k]
    ds = random_lora(src, keys, seed=9, arch="sdxl")
    write_kohya_lora(ds, folder / "zwx.safetensors", arch="sdxl")
    out = folder / "merged_ckpt.safetensors"
    job = MergeJob(
        base=base,
        concepts=(JobConcept(folder / "zwx.safetensors", "zwx"),),
        out=out,
        kind="checkpoint",
        method="linear",
    )
    run_job(job)
    with safe_open(str(base), framework="pt") as a, safe_open(str(out), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())  # the VAE included
        k = TE2 + "transformer.resblocks.0.attn.in_proj_weight"
        assert not torch.equal(a.get_tensor(k), b.get_tensor(k))
    m = load_base(out)
    assert isinstance(m, SDXLModel)


def test_host_unet_factory_gets_the_sdxl_spec(small) -> None:
    """A host without ldm (Forge) passes its UNet class through ``unet_factory``: for SDXL it is called with
    an `SDXLUNetSpec`, and its weights come from the file."""
    _, cfg, path, _ = small
    seen = []

    def factory(spec):
        seen.append(spec)
        return _build_sdxl_unet(spec)

    m = load_base(path, unet_factory=factory)
    assert seen == [SDXLUNetSpec(cfg.unet, 128, 160)]
    ref = load_base(path)
    c = ref.get_learned_conditioning(["photo of a sks"])
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([300.0])
    torch.testing.assert_close(m.apply_model(x, t, c), ref.apply_model(x, t, c), rtol=0, atol=0)

    def no_label_emb(spec):
        unet = _build_sdxl_unet(spec)
        del unet.label_emb
        return unet

    with pytest.raises(BaseModelError, match=r"label_emb\.0\.0\.(weight|bias)"):
        load_base(path, unet_factory=no_label_emb)


def test_forge_arguments_for_sdxl_sizes() -> None:
    """What Forge's ``IntegratedUNet2DConditionModel`` needs for SDXL base (its huggingface_guess config):
    per-res-block depths [0, 0, 2, 2, 10, 10], output [0, 0, 0, 2, 2, 2, 10, 10, 10], middle 10, 64-channel
    heads, linear proj_in, ``label_emb`` from the 2816-wide vector. (Built from Forge's own class, these
    arguments give SDXL base's 1680 UNet tensors with the same names and shapes as `SDXLUNetModel`.)"""
    shapes = {k: tuple(v.shape) for k, v in full_sdxl_tree().state_dict().items()}
    xl = SDXLConfig.from_dict(sdxl_config_from_shapes(shapes))
    kw = integrated_unet_kwargs(SDXLUNetSpec(xl.unet, xl.context_dim, xl.adm_in_channels))
    assert kw["transformer_depth"] == [0, 0, 2, 2, 10, 10]
    assert kw["transformer_depth_output"] == [0, 0, 0, 2, 2, 2, 10, 10, 10]
    assert kw["transformer_depth_middle"] == 10 and kw["num_res_blocks"] == [2, 2, 2]
    assert (kw["model_channels"], kw["channel_mult"], kw["context_dim"], kw["adm_in_channels"]) == (
        320,
        [1, 2, 4],
        2048,
        2816,
    )
    assert (kw["num_heads"], kw["num_head_channels"], kw["num_classes"]) == (-1, 64, "sequential")
    assert kw["use_linear_in_transformer"] and kw["use_spatial_transformer"]
