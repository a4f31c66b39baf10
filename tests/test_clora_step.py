"""`clora_call`: the CLoRA step inside a host's own batched model call equals the denoiser wrapper's step
(tiny SD1 and SDXL; batched, split cond / uncond calls, a row passed through)."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.clora import (
    OTHER,
    UNET_PREFIX,
    CloraDenoiser,
    CloraOptions,
    Concept,
    RoutedLoras,
    branch_prompts,
    clora_call,
    count_hooks,
)
from lib_loraclr.clora.conds import cat_conds, replace_text, select_rows
from lib_loraclr.clora.denoiser import COND, UNCOND
from lib_loraclr.clora.synthetic import random_lora
from lib_loraclr.models.sampling import wrap_model
from lib_loraclr.models.sd import build_tiny_sd1, build_tiny_sdxl

PROMPT = "a cat and a dog"
CONCEPTS = [Concept("sks", "cat"), Concept("<d8>", "dog")]


def _engine(model, wrap, bp, loras, conds, uncond, options):
    unet = model.model.diffusion_model
    router = RoutedLoras(unet, [[], [(loras[0], 1.0)], [(loras[1], 1.0)]], prefix=UNET_PREFIX)
    return CloraDenoiser(
        wrap, unet, conds, bp.groups, bp.mask_tokens, options, unconds=[uncond] * 3, router=router
    )


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_clora_call_equals_the_denoiser_wrapper(arch):
    model = build_tiny_sd1(seed=0) if arch == "sd1" else build_tiny_sdxl(seed=0)
    wrap = wrap_model(model)
    unet = model.model.diffusion_model
    bp = branch_prompts(PROMPT, CONCEPTS, model.prompt_encoder.token_positions)
    loras = [random_lora(unet, 11 + i, prefix=UNET_PREFIX) for i in range(2)]
    with torch.no_grad():
        conds = [model.get_learned_conditioning([p]) for p in bp.prompts]
        uncond = model.get_learned_conditioning([""])
    opts = CloraOptions.recommended(4, latent_update=True)
    ref = _engine(model, wrap, bp, loras, conds, uncond, opts)
    host = _engine(model, wrap, bp, loras, [None] * 3, uncond, opts)
    split = _engine(model, wrap, bp, loras, [None] * 3, uncond, opts)

    def model_call(x, s, c):
        return wrap(x, s, cond=c)

    c, h, w = model.latent_shape
    x0 = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0)) * 8.0
    xa, xb, xs = x0.clone(), x0.clone(), x0.clone()
    cond_in = cat_conds([conds[0], uncond])
    for sigma in (torch.tensor([8.0]), torch.tensor([4.0])):
        want = ref(xa, sigma, cond_scale=5.0)  # writes the updated latent into xa
        # batched: [cond row, uncond row], as A1111's CFGDenoiser calls its model
        out = clora_call(
            host,
            model_call,
            torch.cat([xb, xb]),
            torch.cat([sigma, sigma]),
            cond_in,
            [(COND, 0), (UNCOND, 0)],
            branch_text=conds[1:],
        )
        if host.updated_now:
            xb.copy_(host.x_new)
        got = out[1:] + (out[:1] - out[1:]) * 5.0
        assert torch.equal(got, want) and torch.equal(xb, xa)
        # split: cond rows, then uncond rows (masks and updated latent of the cond call reused)
        oc = clora_call(split, model_call, xs.clone(), sigma, conds[0], [(COND, 0)], branch_text=conds[1:])
        x_new = split.x_new if split.updated_now else None
        ou = clora_call(split, model_call, xs.clone(), sigma, uncond, [(UNCOND, 0)])
        if x_new is not None:
            xs.copy_(x_new)
        assert torch.allclose(ou + (oc - ou) * 5.0, want, atol=1e-4, rtol=1e-4)
        assert torch.allclose(xs, xa, atol=1e-5)
    assert len(ref.history) > 1 and count_hooks(model) == 0
    # a row of another AND part goes to the host's model as it is
    x3 = torch.cat([xb, xb, xb])
    s3 = torch.tensor([2.0, 2.0, 2.0])
    c3 = cat_conds([conds[0], conds[2], uncond])
    out = clora_call(
        host, model_call, x3, s3, c3, [(COND, 0), (OTHER, 0), (UNCOND, 0)], branch_text=conds[1:]
    )
    with torch.no_grad():
        plain = wrap(xb, s3[:1], cond=conds[2])
    assert torch.allclose(out[1:2], plain, atol=1e-6)


def test_row_helpers_keep_the_hosts_formats():
    t = torch.arange(6.0).reshape(3, 2, 1)
    a1111 = {"c_crossattn": [t], "c_concat": [torch.zeros(3, 5, 1, 1)]}
    sel = select_rows(a1111, [2, 0], 3)
    assert torch.equal(sel["c_crossattn"][0], t[[2, 0]]) and sel["c_concat"][0].shape[0] == 2
    wide = {"c_crossattn": [t[:2]], "c_concat": [torch.zeros(3, 5, 1, 1)]}  # image_cond_in keeps its rows
    assert select_rows(wide, [1], 2)["c_concat"][0].shape[0] == 1
    new = replace_text(a1111, torch.ones(1, 2, 1))
    assert isinstance(new["c_crossattn"], list) and torch.equal(new["c_crossattn"][0], torch.ones(1, 2, 1))
    assert new["c_concat"] is a1111["c_concat"]
    sdxl = {"crossattn": t, "vector": torch.zeros(3, 4), "c_concat": [torch.zeros(3, 1)]}
    text = {"crossattn": torch.ones(1, 2, 1), "vector": torch.ones(1, 4)}
    got = replace_text(sdxl, text)
    assert list(got) == ["crossattn", "vector", "c_concat"] and torch.equal(got["vector"], torch.ones(1, 4))
    assert torch.equal(replace_text(t, torch.ones(1, 2, 1)), torch.ones(1, 2, 1))
