"""Per-region LoRA routing in one UNet pass (`RoutedLoras.set_regions`, `RegionalDenoiser`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lib_loraclr.clora import RoutedLoras, count_hooks
from lib_loraclr.clora.regional import RegionalAttention, RegionalDenoiser
from lib_loraclr.deltas import LoraModule

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import quality as q

NAMES = ["sks", "ohwx"]


def _lora(key: str, shape_out: int, shape_in: int, seed: int, conv: bool = False) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(4, shape_in, *((3, 3) if conv else ()), generator=g)
    up = torch.randn(shape_out, 4, *((1, 1) if conv else ()), generator=g)
    return LoraModule(key, down=down, up=up, alpha=4.0)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)


@pytest.mark.parametrize("which", ["proj", "conv"])
def test_each_position_gets_the_lora_of_its_region(which):
    net = _Net()
    conv = which == "conv"
    shape = (2, 3) if conv else (5, 6)
    branches = [[], [([_lora(which, *shape, 1, conv)], 1.0)], [([_lora(which, *shape, 2, conv)], 0.5)]]
    x = torch.randn(2, 3, 4, 8) if conv else torch.randn(2, 32, 6)  # 32 tokens = a 4×8 latent
    mod = getattr(net, which)
    weights = torch.zeros(2, 3, 4, 8)
    weights[:, 1, :, :4] = 1  # left half: branch 1
    weights[:, 2, :, 4:6] = 1  # next quarter: branch 2
    weights[:, 0, :, 6:] = 1  # right quarter: background, no LoRA
    with torch.no_grad(), RoutedLoras(net, branches) as router:
        per = []
        for k in range(3):
            router.select(k)
            per.append(mod(x))
        router.set_regions(weights)
        got = mod(x)
    cols = torch.arange(8)[None, :].expand(4, 8)
    if conv:
        expect = torch.where(cols < 4, per[1], torch.where(cols < 6, per[2], per[0]))
    else:
        c = cols.flatten()[None, :, None]
        expect = torch.where(c < 4, per[1], torch.where(c < 6, per[2], per[0]))
    assert (got - expect).abs().max().item() < 1e-5
    assert count_hooks(net) == 0


@pytest.fixture(scope="module")
def world():
    return q.load_world(names=NAMES, steps=4)


def _method(world, **kw) -> q.CloraMethod:
    m = q.CloraMethod("recommended", **kw)
    m.setup(world, NAMES)
    return m


@pytest.mark.parametrize("base_uncond", [0.0, 0.5, 1.0])
def test_one_full_region_equals_branch_fusion_and_the_single_lora(world, base_uncond):
    reqs = [["sks"], ["ohwx"]]
    kw = {"layout": True, "base_uncond": base_uncond}
    routed = _method(world, mode="routed", **kw).generate(world, reqs, 3.0, 5)
    fusion = _method(world, **kw).generate(world, reqs, 3.0, 5)
    single = q.METHODS["single"]()
    single.setup(world, NAMES)
    alone = single.generate(world, reqs, 3.0, 5)
    assert (routed - fusion).abs().max().item() < 1e-4  # both modes guide alike
    if base_uncond == 0.0:  # each region's own uncond: the single LoRA's sampling
        assert (routed - alone).abs().max().item() < 1e-3
    else:  # the base model's uncond: CFG pushes from the bare base toward the LoRA, not the LoRA's CFG
        assert (routed - alone).abs().max().item() > 1e-2


def test_base_uncond_is_the_base_models_unconditional_prediction(world):
    """At base_uncond = 1 a concept region's CFG is ``u_base + s·(c_lora − u_base)``: the same image as
    sampling with a denoiser whose uncond rows run without the LoRA (the single LoRA's cond rows)."""
    from lib_loraclr.clora import CloraOptions
    from lib_loraclr.models.sampling import CFGDenoiser

    reqs = [["sks"]]
    fusion = _method(world, layout=True).generate(world, reqs, 3.0, 5)
    single = q.METHODS["single"]()
    single.setup(world, NAMES)
    lora = world.loras["sks"]
    inner = CFGDenoiser(world.model).inner_model
    model = world.model
    from lib_loraclr.apply import patched

    with torch.no_grad():
        with patched(model, [(lora, 1.0)]):
            c = model.get_learned_conditioning(["a sks"])
        u = model.get_learned_conditioning([""])

    def call(x, sigma, cond=None, uncond=None, cond_scale=1.0, **kw):
        with torch.no_grad():
            with patched(model, [(lora, 1.0)]):
                dc = inner(x, sigma, cond=c)
            du = inner(x, sigma, cond=u)
        return du + (dc - du) * cond_scale

    expect = world.sample(["a sks"], 1, 3.0, 5, denoiser=call)
    assert CloraOptions.recommended().base_uncond == 1.0 and CloraOptions().base_uncond == 0.0
    assert (fusion - expect).abs().max().item() < 1e-3


def test_two_regions_one_unet_call_per_step_and_nothing_left_behind(world):
    m = _method(world, mode="routed", layout=True)
    unet = world.model.model.diffusion_model
    before = {k: v.clone() for k, v in world.model.state_dict().items()}
    calls = []
    den = m.denoiser(world, [["sks", "ohwx"]] * 2)
    inner = den.inner_model

    def counting(x, sigma, cond=None, **kw):
        calls.append(x.shape[0])
        return inner(x, sigma, cond=cond, **kw)

    den.inner_model = counting
    out = world.sample(["a sks and a ohwx"] * 2, 2, 3.0, 0, denoiser=den)
    assert bool(torch.isfinite(out).all())
    assert calls == [4] * world.steps  # cond + uncond rows of 2 images, one call per step
    assert den.routed_steps == world.steps and den.branch_steps == 0
    assert count_hooks(world.model) == 0
    assert all("forward" not in mod.__dict__ for mod in unet.modules())
    after = world.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_automatic_layout_runs_branch_fusion_until_frozen(world):
    m = _method(world, mode="routed", layout_until=2)
    den = m.denoiser(world, [["sks", "ohwx"]])
    world.sample(["a sks and a ohwx"], 2, 3.0, 0, denoiser=den)
    assert (den.branch_steps, den.routed_steps) == (2, world.steps - 2)
    lay = den.layout_masks
    assert lay is not None and lay.shape[1] == 3
    assert torch.equal(lay.sum(1), torch.ones_like(lay.sum(1)))
    # a second run starts over: the layout is estimated again
    world.sample(["a sks and a ohwx"], 2, 3.0, 1, denoiser=den)
    assert (den.branch_steps, den.routed_steps) == (4, 2 * (world.steps - 2))


def test_bounded_self_attention_keeps_regions_apart(world):
    unet = world.model.model.diffusion_model
    att = RegionalAttention(unet, bounded=True)
    name = att.self_layers[0]
    layer = unet.get_submodule(name)
    ctx = torch.randn(1, 77, 64)
    weights = torch.zeros(1, 3, 8, 16)
    weights[:, 1, :, :8] = 1
    weights[:, 2, :, 8:] = 1
    att.set([ctx, ctx, ctx], weights)
    x = torch.randn(1, 128, layer.to_q.in_features)
    with torch.no_grad(), att.installed():
        y = layer(x)
        x2 = x.clone()
        x2[:, torch.arange(128).reshape(8, 16)[:, 8:].flatten()] += 1.0  # change region 2 only
        y2 = layer(x2)
    left = torch.arange(128).reshape(8, 16)[:, :8].flatten()
    assert (y[:, left] - y2[:, left]).abs().max().item() < 1e-5  # region 1 does not see region 2
    assert "forward" not in layer.__dict__


def test_plain_requests_are_plain_sampling_bit_for_bit(world):
    reqs = [["3"], ["7"]]
    base = q.METHODS["base"]()
    base.setup(world, NAMES)
    ref = base.generate(world, reqs, 3.0, 11)
    for name in ("routed", "routed_layout", "clora_layout"):
        m = q.METHODS[name]()
        m.setup(world, NAMES)
        assert torch.equal(m.generate(world, reqs, 3.0, 11), ref), name


def test_regional_denoiser_needs_a_layout_or_an_estimator(world):
    unet = world.model.model.diffusion_model
    with pytest.raises(ValueError, match="layout or an estimator"):
        RegionalDenoiser(lambda *a, **k: None, unet, [None, None])
    with pytest.raises(ValueError, match="columns"):
        RegionalDenoiser(lambda *a, **k: None, unet, [None, None], layout=torch.ones(1, 3, 2, 2))


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_tiny_models_routed_equals_fusion_with_one_region_and_runs_with_two(arch):
    """SD1 and SDXL (dict conditioning with pooled vector): a layout giving the whole image to concept 1 makes
    the routed pass equal the fusion of the same branches; two regions run with finite output, no hooks left."""
    from lib_loraclr.clora import UNET_PREFIX, CloraDenoiser, CloraOptions, Concept, branch_prompts
    from lib_loraclr.clora.layout import box_masks, layout_weights, parse_ratio_layout
    from lib_loraclr.clora.synthetic import random_lora
    from lib_loraclr.models.sampling import CFGDenoiser, sample
    from lib_loraclr.models.sd import build_tiny_sd1, build_tiny_sdxl

    model = build_tiny_sd1(seed=0) if arch == "sd1" else build_tiny_sdxl(seed=0)
    unet = model.model.diffusion_model
    prompt = "a cat and a dog"
    bp = branch_prompts(
        prompt, [Concept("sks", "cat"), Concept("<d8>", "dog")], model.prompt_encoder.token_positions
    )
    loras = [random_lora(unet, 31 + i, prefix=UNET_PREFIX) for i in range(2)]
    with torch.no_grad():
        conds = [model.get_learned_conditioning([p]) for p in bp.prompts]
        uncond = model.get_learned_conditioning([""])
    if isinstance(conds[0], dict):  # SDXL: the routed pass takes the pooled vector (global) from branch 0
        conds = [{**c, "vector": conds[0]["vector"]} for c in conds]
    inner = CFGDenoiser(model).inner_model
    kw = {"steps": 3, "cfg_scale": 5.0, "sampler": "euler", "seed": 2}
    shape = tuple(model.latent_shape)
    full = torch.zeros(1, 3, *shape[1:])
    full[:, 1] = 1.0

    def build(layout, routed):
        router = RoutedLoras(unet, [[], [(loras[0], 1.0)], [(loras[1], 1.0)]], prefix=UNET_PREFIX)
        den = CloraDenoiser(
            inner,
            unet,
            conds,
            bp.groups,
            bp.mask_tokens,
            CloraOptions.recommended(3),
            unconds=[uncond] * 3,
            router=router,
            layout=None if routed else layout,
        )
        if not routed:
            return den
        return RegionalDenoiser(inner, unet, conds, [uncond] * 3, router, layout=layout, options=den.options)

    a = sample(model, [prompt], denoiser=build(full, True), **kw)
    b = sample(model, [prompt], denoiser=build(full, False), **kw)
    assert (a - b).abs().max().item() < 1e-4
    two = layout_weights(box_masks(parse_ratio_layout("1,1"), shape[1:]), 2)
    out = sample(model, [prompt], denoiser=build(two, True), **kw)
    assert bool(torch.isfinite(out).all()) and (out - a).abs().max().item() > 1e-4
    assert count_hooks(model) == 0 and all("forward" not in m.__dict__ for m in unet.modules())


def test_cached_text_projections_and_masks_follow_weight_changes_and_new_runs(world):
    """The routed pass keeps the regions' K/V projections and attention masks between steps: a second run with
    the same denoiser after an in-place weight change (as a host's LoRA or refiner load does) equals a fresh
    denoiser's run, and the cache holds one K/V pair per cross-attention layer."""
    unet = world.model.model.diffusion_model
    m = _method(world, mode="routed", layout=True)
    reqs = [["sks", "ohwx"]]
    den = m.denoiser(world, reqs)
    first = world.sample(["a sks and a ohwx"], 2, 3.0, 0, denoiser=den)
    assert len(den.attention._kv) == len(den.attention.layers)
    assert torch.equal(first, world.sample(["a sks and a ohwx"], 2, 3.0, 0, denoiser=m.denoiser(world, reqs)))
    to_k = unet.get_submodule(den.attention.layers[0]).to_k
    saved = to_k.weight.detach().clone()
    try:
        with torch.no_grad():
            to_k.weight.mul_(1.5)
        again = world.sample(["a sks and a ohwx"], 2, 3.0, 0, denoiser=den)
        fresh = world.sample(["a sks and a ohwx"], 2, 3.0, 0, denoiser=m.denoiser(world, reqs))
    finally:
        with torch.no_grad():
            to_k.weight.copy_(saved)
    assert torch.equal(again, fresh) and not torch.equal(again, first)

    def changing_mid_run(d):  # the weights change in place before the second step (a refiner switch)
        inner, calls = d.inner_model, []

        def call(x, sigma, cond=None, **kw):
            calls.append(1)
            if len(calls) == 2:
                with torch.no_grad():
                    to_k.weight.mul_(1.5)
            return inner(x, sigma, cond=cond, **kw)

        d.inner_model = call
        return d

    try:
        cached = world.sample(
            ["a sks and a ohwx"], 2, 3.0, 0, denoiser=changing_mid_run(m.denoiser(world, reqs))
        )
        with torch.no_grad():
            to_k.weight.copy_(saved)
        uncached = m.denoiser(world, reqs)
        uncached.attention._context_kv = lambda mod, x: (  # type: ignore[method-assign]
            mod.to_k(uncached.attention._ctx),
            mod.to_v(uncached.attention._ctx),
        )
        plain = world.sample(["a sks and a ohwx"], 2, 3.0, 0, denoiser=changing_mid_run(uncached))
    finally:
        with torch.no_grad():
            to_k.weight.copy_(saved)
    assert torch.equal(cached, plain) and not torch.equal(cached, first)
