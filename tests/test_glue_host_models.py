"""The merge's base model on a host without ldm (Forge): `load_base`'s UNet-factory hook and the factory
of `scripts/loraclr_glue/host_models.py` (arguments for Forge's ``IntegratedUNet2DConditionModel``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lib_loraclr.base_model import BaseModelError, load_base, sd1_config_from_shapes
from lib_loraclr.models.full_trees import full_sd15_tree
from lib_loraclr.models.sd import (
    SD1Config,
    TextConfig,
    UNetConfig,
    _build_ldm_unet,
    build_tiny_sd1,
    integrated_unet_kwargs,
)

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "loraclr_host_models", ROOT / "scripts" / "loraclr_glue" / "host_models.py"
)
host_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_models)


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    ref = build_tiny_sd1(seed=4, config=SD1Config(text=TextConfig(heads=1)))
    path = tmp_path_factory.mktemp("base") / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))  # no tiny metadata
    return ref, path


def test_factory_builds_the_unet_and_weights_come_from_the_file(plain_ckpt) -> None:
    ref, path = plain_ckpt
    seen = []

    class HostUNet(
        nn.Module
    ):  # a host class with the ldm layout (here: wrapping ldm's, built by the factory)
        def __init__(self, cfg):
            super().__init__()
            self.inner = _build_ldm_unet(cfg)

        def forward(self, x, timesteps=None, context=None):
            return self.inner(x, timesteps=timesteps, context=context)

    def factory(cfg):
        seen.append(cfg)
        return _build_ldm_unet(cfg)

    m = load_base(path, unet_factory=factory)
    assert len(seen) == 1 and isinstance(seen[0], UNetConfig) and seen[0].model_channels == 32
    assert m.model.diffusion_model.input_blocks[0][0].weight.device.type == "cpu"
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([700, 30])
    c = ref.get_learned_conditioning(["photo of sks", "ohwx"])
    torch.testing.assert_close(m.apply_model(x, t, c), ref.apply_model(x, t, c), rtol=0, atol=0)
    torch.testing.assert_close(m.get_learned_conditioning(["photo of sks", "ohwx"]), c, rtol=0, atol=0)
    assert set(vars(m)) == set(vars(ref)) and set(m._modules) == set(ref._modules)  # same object as SD1Model
    assert m.alphas_cumprod.device.type == "cpu" and torch.equal(m.alphas_cumprod, ref.alphas_cumprod)

    # a UNet of another layout is refused with the reason, both ways
    def no_middle_attention(cfg):
        unet = _build_ldm_unet(cfg)
        unet.middle_block[1] = nn.Identity()
        return unet

    with pytest.raises(BaseModelError, match=r"middle_block\.1"):
        load_base(path, unet_factory=no_middle_attention)
    with pytest.raises(BaseModelError, match="lacks"):
        load_base(path, unet_factory=lambda cfg: HostUNet(cfg))  # names under .inner: the file's are missing


def test_forge_arguments_for_sd15_sizes() -> None:
    shapes = {k: tuple(v.shape) for k, v in full_sd15_tree().state_dict().items()}
    cfg = UNetConfig(**sd1_config_from_shapes(shapes)["unet"])
    kw = integrated_unet_kwargs(cfg)
    # Forge (huggingface_guess) describes SD1.5 exactly so: attention in levels 0–2, none in level 3
    assert kw["transformer_depth"] == [1, 1, 1, 1, 1, 1, 0, 0]
    assert kw["transformer_depth_output"] == [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert kw["transformer_depth_middle"] == 1 and kw["num_res_blocks"] == [2, 2, 2, 2]
    assert (kw["model_channels"], kw["context_dim"], kw["channel_mult"], kw["num_heads"]) == (
        320,
        768,
        [1, 2, 4, 4],
        8,
    )
    assert (
        kw["use_spatial_transformer"]
        and kw["adm_in_channels"] is None
        and not kw["use_linear_in_transformer"]
    )


def test_factory_chosen_by_capability() -> None:
    made = []

    class FakeForgeUNet(nn.Module):
        def __init__(self, **kw):
            super().__init__()
            made.append(kw)

    f = host_models.forge_unet_factory(FakeForgeUNet)
    assert isinstance(f(UNetConfig()), FakeForgeUNet) and made[0]["transformer_depth"] == [1] * 6 + [0] * 2
    assert f.unet_class is FakeForgeUNet
    assert (
        importlib.util.find_spec("ldm") is not None and host_models.merge_unet_factory() is None
    )  # ldm: default
    if importlib.util.find_spec("backend") is None:
        assert host_models.forge_unet_class() is None and host_models.forge_unet_factory() is None
