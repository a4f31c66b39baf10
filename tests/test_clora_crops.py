"""Region crops of the routed mode (`RegionalDenoiser` ``crops``): each concept region also denoised as its
own cropped canvas with only its prompt and LoRA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lib_loraclr.apply import patched
from lib_loraclr.clora import CloraOptions, count_hooks
from lib_loraclr.clora.denoiser import COND, UNCOND
from lib_loraclr.clora.regional import RegionalDenoiser, crop_box, downsample_factor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import quality as q

NAMES = ["sks", "ohwx"]


def _mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = 1
    return m


def test_crop_box_grows_to_the_unet_multiple_and_stays_inside():
    assert crop_box(_mask(8, 16, 0, 8, 0, 8), 2) == (0, 8, 0, 8)  # the left column of a "1,1" layout
    assert crop_box(_mask(8, 16, 0, 8, 8, 16), 2) == (0, 8, 8, 16)
    # 3 cells wide at multiple 8 → 8 wide around the centre, shifted back inside the latent
    assert crop_box(_mask(64, 64, 0, 64, 60, 63), 8) == (0, 64, 56, 64)
    assert crop_box(_mask(64, 64, 10, 13, 20, 23), 8) == (8, 16, 18, 26)
    assert crop_box(torch.ones(8, 16), 2) is None  # the whole latent: the routed pass already is that call
    assert crop_box(torch.zeros(8, 16), 2) is None


def test_downsample_factor_of_the_world_and_tiny_sd1():
    from lib_loraclr.models.sd import build_tiny_sd1

    world = q.load_world(names=NAMES, steps=2)
    assert downsample_factor(world.model.model.diffusion_model) == 2  # channel_mult [1, 2]
    unet = build_tiny_sd1(seed=0).model.diffusion_model
    n_down = sum(1 for m in unet.modules() if type(m).__name__ == "Downsample")
    assert n_down >= 1 and downsample_factor(unet) == 2**n_down


@pytest.fixture(scope="module")
def world():
    return q.load_world(names=NAMES, steps=4)


def _method(world, **kw) -> q.CloraMethod:
    m = q.CloraMethod("recommended", mode="routed", layout=True, region_prompts=True, **kw)
    m.setup(world, NAMES)
    return m


@pytest.mark.parametrize("base_uncond", [0.0, 1.0])
def test_full_crops_give_each_column_its_single_lora_alone(world, base_uncond):
    """crops = 1: inside each column the cond prediction IS the single LoRA's on that column's latent alone,
    with the column's own prompt ("a sks"); the uncond half too with each region's own uncond
    (base_uncond = 0), and with base_uncond = 1 it is the base model's on the whole latent (no crop)."""
    m = _method(world, region_crops=1.0, base_uncond=base_uncond)
    den = m.denoiser(world, [["sks", "ohwx"]])
    assert den.crops == 1.0 and den.multiple == 2
    x = torch.randn(1, 1, 8, 16) * 3.0
    sigma = torch.tensor([3.0])
    with torch.no_grad():
        out = den.predict(x, sigma, halves=(COND, UNCOND))
        base_u = den.inner_model(x, sigma, cond=world.model.get_learned_conditioning([""]))
        for j, name in enumerate(NAMES):
            with patched(world.model, world.loras[name]):
                c = world.model.get_learned_conditioning([f"a {name}"])
                u = world.model.get_learned_conditioning([""])
                xc = x[..., 8 * j : 8 * (j + 1)]
                alone_c = den.inner_model(xc, sigma, cond=c)
                alone_u = den.inner_model(xc, sigma, cond=u)
            cols = slice(8 * j, 8 * (j + 1))
            assert (out[COND][..., cols] - alone_c).abs().max().item() < 1e-4
            want_u = alone_u if base_uncond == 0.0 else base_u[..., cols]
            assert (out[UNCOND][..., cols] - want_u).abs().max().item() < 1e-4
    assert count_hooks(world.model) == 0


def test_half_crops_blend_inside_the_regions_only(world):
    """crops = 0.5 is the mean of the routed pass and the crops, everywhere a concept region lies; a
    background cell (no concept) keeps the routed pass."""
    reqs = [["sks", "3", "ohwx"]]
    x = torch.randn(1, 1, 8, 24) * 3.0
    sigma = torch.tensor([2.0])
    got = {}
    with torch.no_grad():
        for a in (0.0, 0.5, 1.0):
            den = _method(world, region_crops=a).denoiser(world, reqs)
            got[a] = den.predict(x, sigma, halves=(COND, UNCOND))
    assert torch.equal(got[0.0][UNCOND], got[1.0][UNCOND])  # the base model's uncond: no crops there
    for h in (COND,):
        mid = (got[0.0][h] + got[1.0][h]) / 2
        assert (got[0.5][h] - mid).abs().max().item() < 1e-5
        bg = slice(8, 16)  # the "3" between the two concepts: background, no crop
        assert torch.equal(got[1.0][h][..., bg], got[0.0][h][..., bg])
        assert (got[1.0][h][..., :8] - got[0.0][h][..., :8]).abs().max().item() > 1e-3


def test_crop_calls_per_step_and_nothing_left_behind(world):
    m = _method(world, region_crops=0.5)
    unet = world.model.model.diffusion_model
    before = {k: v.clone() for k, v in world.model.state_dict().items()}
    den = m.denoiser(world, [["sks", "ohwx"]] * 2)
    inner, calls = den.inner_model, []

    def counting(x, sigma, cond=None, **kw):
        calls.append(tuple(x.shape))
        return inner(x, sigma, cond=cond, **kw)

    den.inner_model = counting
    out = world.sample(["a sks and a ohwx"] * 2, 2, 3.0, 0, denoiser=den)
    assert bool(torch.isfinite(out).all())
    # per step: the routed call (cond + uncond of 2 images) and one 8×8 crop call per concept region on
    # the cond rows (the uncond half is the base model's)
    assert calls == [(4, 1, 8, 16), (2, 1, 8, 8), (2, 1, 8, 8)] * world.steps
    assert den.crop_calls == 2 * world.steps
    assert count_hooks(world.model) == 0
    assert all("forward" not in mod.__dict__ for mod in unet.modules())
    after = world.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_one_full_region_needs_no_crop_and_equals_the_routed_pass(world):
    reqs = [["sks"], ["ohwx"]]
    plain = _method(world).generate(world, reqs, 3.0, 5)
    crops = _method(world, region_crops=0.5)
    assert torch.equal(crops.generate(world, reqs, 3.0, 5), plain)
    assert crops.last_denoiser.crop_calls == 0


def test_plain_requests_stay_plain_sampling_bit_for_bit(world):
    reqs = [["3"], ["7"]]
    base = q.METHODS["base"]()
    base.setup(world, NAMES)
    ref = base.generate(world, reqs, 3.0, 11)
    for name in ("routed_crops", "routed_layout_crops"):
        m = q.METHODS[name]()
        m.setup(world, NAMES)
        assert torch.equal(m.generate(world, reqs, 3.0, 11), ref), name


def test_crops_default_off_and_checked():
    assert CloraOptions.recommended(20).region_crops == 0.0
    with pytest.raises(ValueError, match="region_crops"):
        CloraOptions(region_crops=1.5)
    with pytest.raises(ValueError, match="crops"):
        RegionalDenoiser(
            lambda *a, **k: None, torch.nn.Identity(), [None], layout=torch.ones(1, 1, 2, 2), crops=-1
        )


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_tiny_models_run_with_crops(arch):
    """SD1 and SDXL (dict conditioning with the pooled vector): two columns with crops run, finite, differ
    from the routed pass alone, and leave no hook."""
    from lib_loraclr.clora import UNET_PREFIX, RoutedLoras
    from lib_loraclr.clora.layout import box_masks, layout_weights, parse_ratio_layout
    from lib_loraclr.clora.synthetic import random_lora
    from lib_loraclr.models.sampling import CFGDenoiser, sample
    from lib_loraclr.models.sd import build_tiny_sd1, build_tiny_sdxl

    model = build_tiny_sd1(seed=0) if arch == "sd1" else build_tiny_sdxl(seed=0)
    unet = model.model.diffusion_model
    loras = [random_lora(unet, 31 + i, prefix=UNET_PREFIX) for i in range(2)]
    with torch.no_grad():
        conds = [model.get_learned_conditioning([p]) for p in ("a cat and a dog", "a cat", "a dog")]
        uncond = model.get_learned_conditioning([""])
    if isinstance(conds[0], dict):
        conds = [{**c, "vector": conds[0]["vector"]} for c in conds]
    inner = CFGDenoiser(model).inner_model
    shape = tuple(model.latent_shape)
    two = layout_weights(box_masks(parse_ratio_layout("1,1"), shape[1:]), 2)
    kw = {"steps": 3, "cfg_scale": 5.0, "sampler": "euler", "seed": 2}
    outs = []
    for crops in (0.0, 0.5):
        router = RoutedLoras(unet, [[], [(loras[0], 1.0)], [(loras[1], 1.0)]], prefix=UNET_PREFIX)
        den = RegionalDenoiser(inner, unet, conds, [uncond] * 3, router, layout=two, crops=crops)
        outs.append(sample(model, ["a cat and a dog"], denoiser=den, **kw))
        assert den.crop_calls == (2 * 3 if crops else 0)
    assert bool(torch.isfinite(outs[1]).all()) and (outs[1] - outs[0]).abs().max().item() > 1e-4
    assert count_hooks(model) == 0 and all("forward" not in m.__dict__ for m in unet.modules())


def test_builder_and_around_pass_the_options_crops(world):
    from lib_loraclr.clora import Concept, build_clora_denoiser
    from lib_loraclr.models.sampling import CFGDenoiser

    model = world.model
    concepts = [Concept(trigger="sks", words="2"), Concept(trigger="ohwx", words="5")]
    lay = q.user_layout(world, ["sks", "ohwx"])
    kw = dict(
        options=CloraOptions.recommended(4, region_crops=0.5),
        te_model=model,
        mode="replace",
        layout=lay,
        routed=True,
    )
    den, _ = build_clora_denoiser(
        CFGDenoiser(model).inner_model,
        model.model.diffusion_model,
        model.get_learned_conditioning,
        model.prompt_encoder.token_positions,
        "a 2 and a 5",
        concepts,
        [[(world.loras["sks"], 1.0)], [(world.loras["ohwx"], 1.0)]],
        **kw,
    )
    assert isinstance(den, RegionalDenoiser) and den.crops == 0.5
    assert RegionalDenoiser.around(den.estimator or _fusion_of(den), lay).crops == 0.5


def _fusion_of(den: RegionalDenoiser):
    """A `CloraDenoiser`-like stand-in carrying the routed denoiser's parts and options (around's input)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        inner_model=den.inner_model,
        unet=den.unet,
        conds=den.conds,
        unconds=den.unconds,
        router=den.router,
        options=CloraOptions.recommended(4, region_crops=0.5),
    )
