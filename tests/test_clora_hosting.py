"""The library pieces both WebUI adapters share: row roles of a host's call (`CfgStep`, `chunk_roles`), the
host's batch order, the latent update under ``torch.inference_mode`` (`inference_mode_grad`), the autograd
helpers, routing helpers and the user layout."""

from __future__ import annotations

import torch
from torch import nn

from lib_loraclr.clora import (
    OTHER,
    UNET_PREFIX,
    CfgStep,
    CloraDenoiser,
    CloraOptions,
    CompositeRouter,
    Concept,
    RoutedLoras,
    branch_prompts,
    chunk_roles,
    clora_call,
    count_hooks,
    has_te_parts,
    routable_te_key,
)
from lib_loraclr.clora.autograd import InferenceWeightClones, freeze_parameters, inference_mode_grad, unfreeze
from lib_loraclr.clora.denoiser import COND, UNCOND
from lib_loraclr.clora.layout import user_layout
from lib_loraclr.clora.regional import RegionalDenoiser
from lib_loraclr.clora.synthetic import random_lora
from lib_loraclr.deltas import DeltaSet
from lib_loraclr.models.sampling import wrap_model
from lib_loraclr.models.sd import build_tiny_sd1


def test_row_roles_of_a1111_and_forge_calls():
    st = CfgStep(torch.zeros(2, 4, 8, 8), 3, repeats=[2, 1])  # image 0 has two AND parts
    assert st.roles == [(COND, 0), (OTHER, 0), (COND, 1), (UNCOND, 0), (UNCOND, 1)]
    assert st.take(3) == [(COND, 0), (OTHER, 0), (COND, 1)]
    assert st.take(2) == [(UNCOND, 0), (UNCOND, 1)]
    assert st.take(1) is None  # more rows than the batch: the adapter runs the host's call
    assert chunk_roles([1, 0], 2) == [(UNCOND, 0), (UNCOND, 1), (COND, 0), (COND, 1)]
    assert chunk_roles([0, 0, 1], 1) == [(COND, 0), (OTHER, 0), (UNCOND, 0)]  # a second cond: the host's


def _setup(options):
    model = build_tiny_sd1(seed=0)
    wrap = wrap_model(model)
    unet = model.model.diffusion_model
    bp = branch_prompts(
        "a cat and a dog",
        [Concept("sks", "cat"), Concept("<d8>", "dog")],
        model.prompt_encoder.token_positions,
    )
    loras = [random_lora(unet, 11 + i, prefix=UNET_PREFIX) for i in range(2)]
    with torch.no_grad():
        conds = [model.get_learned_conditioning([p]) for p in bp.prompts]
        uncond = model.get_learned_conditioning([""])

    def engine(**kw):
        router = RoutedLoras(unet, [[], [(loras[0], 1.0)], [(loras[1], 1.0)]], prefix=UNET_PREFIX)
        return CloraDenoiser(wrap, unet, [None] * 3, bp.groups, bp.mask_tokens, options, router=router, **kw)

    return model, wrap, conds, uncond, engine


def test_uncond_first_rows_give_the_same_prediction_and_update():
    """A host that batches the uncond rows first (Forge) gets the same fused rows and latent update."""
    opts = CloraOptions.recommended(4, latent_update=True)
    _, wrap, conds, uncond, engine = _setup(opts)
    a, b = engine(), engine()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 8.0
    s = torch.tensor([8.0])

    def call(xx, ss, c):
        return wrap(xx, ss, cond=c)

    text = conds[1:]
    out_a = clora_call(
        a, call, torch.cat([x, x]), s.repeat(2), torch.cat([conds[0], uncond]), [(COND, 0), (UNCOND, 0)], text
    )
    out_b = clora_call(
        b, call, torch.cat([x, x]), s.repeat(2), torch.cat([uncond, conds[0]]), [(UNCOND, 0), (COND, 0)], text
    )
    assert a.updated_now and b.updated_now
    assert torch.allclose(a.x_new, b.x_new, atol=1e-5)
    assert torch.allclose(out_a, out_b.flip(0), atol=1e-4)


def test_latent_update_under_inference_mode_with_update_scope():
    """Sampling under ``torch.inference_mode`` (Forge): without a scope the update falls back to masks-only;
    with `inference_mode_grad` it runs and equals the update made with autograd available."""
    opts = CloraOptions.recommended(4, latent_update=True)
    model, _, conds, uncond, engine = _setup(opts)
    unet = model.model.diffusion_model
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 8.0
    s = torch.tensor([8.0])
    ref = engine()
    ref.conds = [conds[0], *conds[1:]]
    with torch.no_grad():
        ref.predict(x, s, conds[0], uncond, (COND, UNCOND))
    plain, scoped = engine(), engine(update_scope=lambda: inference_mode_grad(unet))
    for d in (plain, scoped):
        d.conds = [conds[0], *conds[1:]]
    with torch.inference_mode():
        xi, si = x.clone(), s.clone()
        plain.predict(xi, si, conds[0], uncond, (COND, UNCOND))
        scoped.predict(xi, si, conds[0], uncond, (COND, UNCOND))
    assert not plain.updated_now and "inference_mode" in plain.fallback_reason
    assert scoped.updated_now and scoped.fallback_reason is None
    assert torch.allclose(scoped.x_new, ref.x_new, atol=1e-5)
    assert count_hooks(model) == 0

    def broken():
        raise RuntimeError("no autograd here\nsecond line")

    failing = engine(update_scope=broken)
    failing.conds = [conds[0], *conds[1:]]
    with torch.no_grad():
        failing.predict(x, s, conds[0], uncond, (COND,))
        assert failing.fallback_reason == "no latent gradient (RuntimeError: no autograd here)"
        failing.predict(x, torch.tensor([4.0]), conds[0], uncond, (COND,))  # no second try in the run
    assert not failing.updated_now and failing.history == []


def test_inference_weight_clones_and_freezing():
    with torch.inference_mode():
        lin = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    x = torch.randn(2, 3, requires_grad=True)
    with InferenceWeightClones(lin) as clones:
        lin(x).sum().backward()
        assert clones.n_cloned == 3 * 3 + 3 + 3 + 3
    assert x.grad is not None and all(torch.is_inference(p) for p in lin.parameters())  # originals back
    net = nn.Linear(2, 2)
    frozen = freeze_parameters(net)
    assert len(frozen) == 2 and not any(p.requires_grad for p in net.parameters())
    unfreeze(frozen)
    assert all(p.requires_grad for p in net.parameters())


def test_routing_helpers_and_user_layout():
    assert routable_te_key("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj")
    assert not routable_te_key("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj:q")
    assert not routable_te_key(UNET_PREFIX + "input_blocks.1.1.proj_in")
    te = DeltaSet(modules={"cond_stage_model.transformer.x": None})  # type: ignore[dict-item]
    assert has_te_parts([DeltaSet(modules={}), te]) and not has_te_parts([DeltaSet(modules={})])
    seen = []

    class R:
        def __init__(self, i):
            self.i = i

        def select(self, b):
            seen.append((self.i, "select", b))

        def install(self):
            seen.append((self.i, "install"))

        def remove(self):
            seen.append((self.i, "remove"))

    with CompositeRouter([R(0), R(1)]) as both:
        both.select(2)
    assert seen == [
        (0, "install"),
        (1, "install"),
        (0, "select", 2),
        (1, "select", 2),
        (0, "remove"),
        (1, "remove"),
    ]
    assert user_layout("", 2, (8, 8)) is None
    lay = user_layout("1,1", 2, (4, 8))
    assert (
        lay.shape == (1, 3, 4, 8)
        and bool((lay[0, 1, :, :4] == 1).all())
        and bool((lay[0, 2, :, 4:] == 1).all())
    )


def test_routed_mode_around_a_fusion_denoiser():
    *_, engine = _setup(CloraOptions.recommended(4))
    fusion = engine()
    auto = RegionalDenoiser.around(fusion)
    fixed = RegionalDenoiser.around(fusion, user_layout("1,1", 2, (8, 8)))
    assert auto.estimator is fusion and fixed.estimator is None and fixed.router is fusion.router
