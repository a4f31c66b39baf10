"""The CLoRA denoiser wrapper driven by k-diffusion samplers on tiny SD1 / SDXL models."""

from __future__ import annotations

import pytest
import torch
from k_diffusion import sampling as ks

from lib_loraclr.clora import (
    UNET_PREFIX,
    AttentionCapture,
    CloraDenoiser,
    CloraOptions,
    Concept,
    RoutedLoras,
    branch_prompts,
    build_clora_denoiser,
    clora_loss,
    count_hooks,
)
from lib_loraclr.clora.attention import localizing_layers
from lib_loraclr.clora.denoiser import COND
from lib_loraclr.clora.masks import fuse
from lib_loraclr.clora.official import OfficialCloraLoop
from lib_loraclr.clora.synthetic import random_lora
from lib_loraclr.models.sampling import CFGDenoiser, sample, sampler_sigmas
from lib_loraclr.models.sd import build_tiny_sd1, build_tiny_sdxl

PROMPT = "a cat and a dog"
CONCEPTS = [Concept("sks", "cat"), Concept("<d8>", "dog")]


class World:
    def __init__(self, model, seed: int = 0):
        self.model = model
        self.unet = model.model.diffusion_model
        self.cfg = CFGDenoiser(model)
        self.bp = branch_prompts(PROMPT, CONCEPTS, model.prompt_encoder.token_positions)
        self.loras = [random_lora(self.unet, seed + 11 + i, prefix=UNET_PREFIX) for i in range(2)]
        with torch.no_grad():
            self.conds = [model.get_learned_conditioning([p]) for p in self.bp.prompts]
            self.uncond = model.get_learned_conditioning([""])

    def router(self) -> RoutedLoras:
        return RoutedLoras(
            self.unet, [[], [(self.loras[0], 1.0)], [(self.loras[1], 1.0)]], prefix=UNET_PREFIX
        )

    def clora(self, options: CloraOptions, conds=None) -> CloraDenoiser:
        return CloraDenoiser(
            self.cfg.inner_model,
            self.unet,
            conds or self.conds,
            self.bp.groups,
            self.bp.mask_tokens,
            options,
            unconds=[self.uncond] * 3,
            router=self.router(),
        )


@pytest.fixture(scope="module")
def world():
    return World(build_tiny_sd1(seed=0))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "ddim", "heun"])
def test_one_branch_without_lora_is_plain_sampling(world, sampler):
    m = world.model
    kw = {"negative": "", "steps": 3, "cfg_scale": 5.0, "sampler": sampler, "seed": 3}
    ref = sample(m, ["a cat", "a dog"], **kw)
    den = CloraDenoiser(world.cfg.inner_model, world.unet, [None], groups=[], mask_tokens=[[]])
    out = sample(m, ["a cat", "a dog"], denoiser=den, **kw)
    assert torch.equal(out, ref)
    if sampler == "euler":  # CFG off, and a negative prompt of another token length (two UNet calls)
        kw1 = dict(kw, cfg_scale=1.0)
        assert torch.equal(sample(m, ["a cat"], denoiser=den, **kw1), sample(m, ["a cat"], **kw1))
        kw2 = dict(kw, negative="blurry, " * 40)
        assert torch.equal(sample(m, ["a cat"], denoiser=den, **kw2), sample(m, ["a cat"], **kw2))


def test_disabled_clora_is_plain_sampling(world):
    kw = {"negative": "", "steps": 4, "cfg_scale": 5.0, "sampler": "euler", "seed": 1}
    den = world.clora(CloraOptions(enabled=False))
    assert torch.equal(sample(world.model, [PROMPT], denoiser=den, **kw), sample(world.model, [PROMPT], **kw))


def test_batched_branches_equal_each_branch_run_alone(world):
    den = world.clora(CloraOptions(latent_update=False))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 16, 16, generator=g) * 3.0
    sigma = torch.tensor([3.0])
    with torch.no_grad():
        fused = den(x.clone(), sigma, cond_scale=4.0)
        weights = den.last_weights
        router = world.router()
        outs = {COND: [], 1: []}
        maps = []
        with router, AttentionCapture(world.unet, den.capture.layers) as cap:
            cap.latent_hw = tuple(x.shape[-2:])
            for k in range(3):
                router.select(k)
                cap.reset()
                outs[COND].append(world.cfg.inner_model(x, sigma, cond=world.conds[k]))
                maps.append(cap.maps())
                outs[1].append(world.cfg.inner_model(x, sigma, cond=world.uncond))
    c = fuse(torch.stack(outs[COND], 1), weights)
    u = fuse(torch.stack(outs[1], 1), weights)
    assert (fused - (u + (c - u) * 4.0)).abs().max().item() <= 1e-5
    assert 0.0 < weights[:, 0].mean().item() < 1.0 or weights[:, 1:].sum().item() > 0
    # the branches' predictions really differ
    assert (outs[COND][1] - outs[COND][2]).abs().max().item() > 1e-3
    assert den.step_log[0]["loss_cond"] == pytest.approx(
        clora_loss(torch.stack(maps, 1), world.bp.groups).item(), abs=1e-5
    )


def test_update_lowers_the_loss(world):
    opts = CloraOptions(update_until=1, refinement_steps=(0,), refinement_iters=6, step_size=20.0)
    den = world.clora(opts)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)) * 14.6
    x0 = x.clone()
    with torch.no_grad():
        den(x, torch.tensor([14.6]), cond_scale=5.0)
    losses = [h["loss"] for h in den.history]
    assert len(losses) == 7
    assert losses[-1] < losses[0]
    assert den.step_log[0]["loss_cond"] < losses[0]  # fresh forward at the final latent
    assert not torch.equal(x, x0)  # the sampler's latent moved in place


def test_step_size_is_the_official_z_update(world):
    """One update in σ-space equals z ← z − 20·∇_z L on z = x/√(1+σ²), mapped back."""
    opts = CloraOptions(update_until=1, refinement_steps=(), step_size=20.0)
    den = world.clora(opts)
    inner = world.cfg.inner_model
    sigma = torch.tensor([5.0])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4)) * 5.0
    x_before = x.clone()
    with torch.no_grad():
        den(x, sigma, cond_scale=5.0)
    c_in = (1 + sigma**2) ** -0.5
    z = (x_before * c_in).requires_grad_()
    t = inner.sigma_to_t(sigma)
    router = world.router()
    with router, AttentionCapture(world.unet, den.capture.layers) as cap:
        cap.latent_hw = tuple(x.shape[-2:])
        maps = []
        for k in range(3):
            router.select(k)
            cap.reset()
            world.model.apply_model(z, t, world.conds[k])
            maps.append(cap.maps())
        (gz,) = torch.autograd.grad(clora_loss(torch.stack(maps, 1), world.bp.groups), z)
    expected = (z.detach() - 20.0 * gz) / c_in
    assert gz.abs().max() > 0
    assert (x - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def test_euler_steps_from_the_updated_latent(world):
    opts = CloraOptions(update_until=1, refinement_steps=())
    den = world.clora(opts)
    sigmas = sampler_sigmas(world.cfg.inner_model, "euler", 10, True)[:2]
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9)) * sigmas[0]
    seen = {}
    extra = {"cond": None, "uncond": None, "cond_scale": 5.0}
    with torch.no_grad():
        out = ks.sample_euler(
            den,
            x0.clone(),
            sigmas,
            extra_args=extra,
            disable=True,
            callback=lambda d: seen.update(x=d["x"].clone(), den=d["denoised"].clone()),
        )
    x_new, d_new = seen["x"], seen["den"]
    assert not torch.equal(x_new, x0)
    d = (x_new - d_new) / sigmas[0]
    assert torch.equal(out, x_new + d * (sigmas[1] - sigmas[0]))


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "ddim"])
def test_samplers_with_updates(world, sampler):
    opts = CloraOptions.paper(4, refinement_iters=1)
    den = world.clora(opts)
    before = _snapshot(world.model)
    batch = 2 if sampler == "euler" else 1
    out = sample(world.model, [PROMPT] * batch, steps=4, cfg_scale=5.0, sampler=sampler, seed=7, denoiser=den)
    assert out.shape == (batch, 4, 16, 16) and bool(torch.isfinite(out).all())
    assert len(den.history) == opts.total_updates(4) == 4
    assert sorted({int(h["step"]) for h in den.history}) == list(range(opts.update_until))
    assert count_hooks(world.model) == 0
    after = world.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    if sampler == "euler":  # each image of the batch has its own branches: equal to one image at a time
        singles = [
            sample(
                world.model,
                [PROMPT],
                steps=4,
                cfg_scale=5.0,
                sampler=sampler,
                seed=7 + i,
                denoiser=world.clora(opts),
            )
            for i in range(2)
        ]
        assert (out - torch.cat(singles)).abs().max().item() <= 1e-5


def test_nothing_hooked_after_an_exception_mid_sampling(world):
    before = _snapshot(world.model)
    n0 = count_hooks(world.model)
    den = world.clora(CloraOptions.paper(4, refinement_iters=1))

    def boom(d):
        if d["i"] == 2:
            raise KeyboardInterrupt("user pressed interrupt")

    with pytest.raises(KeyboardInterrupt):
        sample(
            world.model,
            [PROMPT],
            steps=4,
            cfg_scale=5.0,
            sampler="euler",
            seed=0,
            denoiser=den,
            callback=boom,
        )
    assert count_hooks(world.model) == n0 == 0
    after = world.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad or p.grad is None for p in world.model.parameters())


def test_masks_only_and_inference_mode_fallback(world):
    kw = {"steps": 3, "cfg_scale": 5.0, "sampler": "euler", "seed": 2}
    ref = sample(
        world.model,
        [PROMPT],
        denoiser=world.clora(CloraOptions(latent_update=False, mask_rule="paper")),
        **kw,
    )
    den = world.clora(CloraOptions(masks_only=True, mask_rule="paper"))
    assert torch.equal(sample(world.model, [PROMPT], denoiser=den, **kw), ref)
    assert den.history == []
    den = world.clora(CloraOptions.paper(4, refinement_iters=1))
    with torch.inference_mode():
        out = sample(world.model, [PROMPT], denoiser=den, **kw)
    assert "inference_mode" in (den.fallback_reason or "")
    assert torch.equal(out, ref)
    updated = sample(
        world.model, [PROMPT], denoiser=world.clora(CloraOptions.paper(4, refinement_iters=1)), **kw
    )
    assert (updated - ref).abs().max() > 1e-4


def test_cfg_off_uses_cond_rows_only(world):
    den = world.clora(CloraOptions.paper(4, refinement_iters=1))
    out = sample(world.model, [PROMPT], steps=4, cfg_scale=1.0, sampler="dpmpp_2m", seed=0, denoiser=den)
    assert bool(torch.isfinite(out).all()) and len(den.history) == den.options.total_updates(4)
    assert set(den.step_log[0]) == {"loss_cond"}


def test_official_loop_runs_and_lowers_its_loss(world):
    opts = CloraOptions.paper(4, refinement_iters=3)
    loop = OfficialCloraLoop(
        world.cfg.inner_model,
        world.unet,
        world.conds,
        [world.uncond] * 3,
        world.bp.groups,
        world.bp.mask_tokens,
        opts,
        router=world.router(),
    )
    out = sample(world.model, [PROMPT], steps=4, cfg_scale=5.0, sampler="euler", seed=0, denoiser=loop)
    assert bool(torch.isfinite(out).all()) and count_hooks(world.model) == 0
    assert len(loop.history) == opts.total_updates(4)
    first = [h["loss"] for h in loop.history if h["step"] == 0]
    assert first[-1] < first[0]
    assert all("forward" not in m.__dict__ for m in world.unet.modules())


def test_sdxl_tiny_model():
    m = build_tiny_sdxl(seed=0)
    w = World(m)
    kw = {"negative": "", "steps": 4, "cfg_scale": 5.0, "sampler": "euler", "seed": 1}
    den1 = CloraDenoiser(w.cfg.inner_model, w.unet, [None], groups=[], mask_tokens=[[]])
    assert torch.equal(sample(m, [PROMPT], denoiser=den1, **kw), sample(m, [PROMPT], **kw))
    assert isinstance(w.conds[0], dict) and "vector" in w.conds[0]
    den = w.clora(CloraOptions.paper(4, refinement_iters=3))
    out = sample(m, [PROMPT], denoiser=den, **kw)
    assert bool(torch.isfinite(out).all()) and count_hooks(m) == 0
    first = [h["loss"] for h in den.history if h["step"] == 0]
    assert len(first) == 4 and first[-1] < first[0]
    # the layers next to the bottleneck: input_blocks.8, middle_block, output_blocks.0, every transformer block
    assert den.capture.layers == localizing_layers(w.unet)
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in den.capture.layers if "middle" not in n} == {
        "input_blocks.8",
        "output_blocks.0",
    }
    assert any(n.startswith("middle_block") for n in den.capture.layers)


def test_builder_with_text_encoder_and_style_loras(world):
    m = world.model
    te = random_lora(
        m.cond_stage_model.transformer,
        21,
        prefix="cond_stage_model.transformer.",
        targets=("q_proj", "v_proj"),
    )
    unet_part = world.loras[0]
    both = type(unet_part)({**unet_part.modules, **te.modules})
    style = random_lora(world.unet, 31, std=0.1, prefix=UNET_PREFIX, targets=("attn1.to_v",))
    den, bp = build_clora_denoiser(
        world.cfg.inner_model,
        world.unet,
        m.get_learned_conditioning,
        m.prompt_encoder.token_positions,
        PROMPT,
        CONCEPTS,
        [[(both, 1.0)], [(world.loras[1], 0.8)]],
        style=[(style, 0.5)],
        options=CloraOptions.paper(3, refinement_iters=1),
        te_model=m,
    )
    assert bp.prompts == world.bp.prompts
    with torch.no_grad():
        assert torch.equal(den.conds[0], world.conds[0]) and torch.equal(den.conds[2], world.conds[2])
        assert (den.conds[1] - world.conds[1]).abs().max() > 1e-3  # branch 1's text-encoder LoRA
        assert (den.unconds[1] - den.unconds[0]).abs().max() > 1e-3
    assert (
        den.router.n_modules
        == len(unet_part) + len({k for k in world.loras[1].modules} - set(unet_part.modules)) + 16
    )
    out = sample(m, [PROMPT], steps=3, cfg_scale=5.0, sampler="euler", seed=0, denoiser=den)
    assert bool(torch.isfinite(out).all()) and count_hooks(m) == 0
