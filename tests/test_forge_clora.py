"""CLoRA on Forge, end to end on a stand-in of Forge's sampler: the final latents are pinned bit for bit.

The stand-in follows Forge's ``sampling_function`` (``calc_cond_uncond_batch``): the model call goes through
the cloned UNet patcher's ``model_function_wrapper`` with the chunks in Forge's order (uncond first, then
cond; batched in one call, or one call per chunk when memory is short), ``timestep`` = σ, sampling under
``torch.inference_mode`` (the latent update then runs on the adapter's own autograd path), k-diffusion's
Euler stepping from the ``x`` the CFG denoiser was given (where the adapter writes the updated latent).

The reference latents (``tests/data/forge_clora_reference.safetensors``) were recorded with the Forge
adapter that ran its own copy of the CLoRA step (``ForgeFusion`` in the glue); set ``LORACLR_RECORD=1`` to
record them again.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lib_loraclr import clora_args as ca
from lib_loraclr.clora import count_hooks
from lib_loraclr.models.sd import build_tiny_sd1, build_tiny_sdxl
from lib_loraclr.writers import write_kohya_lora
from tests.references import assert_matches_reference

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "data" / "forge_clora_reference.safetensors"
PROMPT = "a cat<clora:catlora:trigger=sks> and a dog<clora:doglora:trigger=ohwx>"

#: name → (arch, CLoRA arguments, steps, batch size, one model call per chunk)
# recorded when every region's uncond had its own LoRA on (base_uncond=0)
_OLD = {"base_uncond": 0}
CASES = {
    "fusion": ("sd1", _OLD, 4, 1, False),
    "fusion_split_calls": ("sd1", _OLD, 3, 1, True),
    "update": ("sd1", {**_OLD, "latent_update": True}, 4, 1, False),
    "update_split_calls": ("sd1", {**_OLD, "latent_update": True}, 3, 1, True),
    "update_batch2": ("sd1", {**_OLD, "latent_update": True}, 3, 2, False),
    "layout": ("sd1", {**_OLD, "layout": "1,1"}, 3, 1, False),
    "sdxl_update": ("sdxl", {**_OLD, "latent_update": True}, 3, 1, False),
}


def glue():
    here = str(ROOT / "scripts")
    sys.path.insert(0, here)
    try:
        from loraclr_glue import adapters, clora_run
    finally:
        sys.path.remove(here)
    return adapters, clora_run


class StubUnetPatcher:
    """Forge's ``UnetPatcher`` surface the adapter uses (``clone`` deep-copies ``model_options``)."""

    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = StubUnetPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        raise AssertionError("not used by the adapter")


class EpsPredictor:
    """Forge's ``KModel.predictor`` (ε prediction): ``calculate_input`` scales by ``1/√(σ²+1)``."""

    def calculate_input(self, sigma, noise):
        return noise / (sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1)) ** 2 + 1.0) ** 0.5


class ForgeCFGDenoiser(torch.nn.Module):
    """Forge's CFG denoiser reduced to ``sampling_function``: rows in chunks, uncond chunk first."""

    def __init__(self, forge_model, wrap, split):
        super().__init__()
        self.forge_model = forge_model
        self.wrap = wrap  # k-diffusion's CompVisDenoiser over the tiny model (c_in, σ → t, ε → denoised)
        self.split = split
        self.mask = None
        self.classic_ddim_eps_estimation = False

    def forward(self, x, sigma, cond, uncond, cond_scale):
        patcher = self.forge_model.forge_objects.unet
        wrapper = patcher.model_options.get("model_function_wrapper")
        sdxl = isinstance(cond, dict)

        def apply_model(xx, ss, c_crossattn, transformer_options=None, y=None, **kw):
            assert not kw, kw
            c = {"crossattn": c_crossattn, "vector": y} if sdxl else c_crossattn
            return self.wrap(xx, ss, cond=c)

        def text(c):
            return {"c_crossattn": c["crossattn"], "y": c["vector"]} if sdxl else {"c_crossattn": c}

        chunks = [(1, uncond), (0, cond)]
        groups = [[ch] for ch in chunks] if self.split else [chunks]
        out = {}
        for group in groups:
            cou = [role for role, _ in group]
            parts = [text(c) for _, c in group]
            c = {k: torch.cat([q[k] for q in parts]) for k in parts[0]}
            c["transformer_options"] = {"cond_or_uncond": list(cou), "sigmas": sigma}
            xx, ss = torch.cat([x] * len(group)), torch.cat([sigma] * len(group))
            if wrapper is not None:
                res = wrapper(apply_model, {"input": xx, "timestep": ss, "c": c, "cond_or_uncond": cou})
            else:
                res = apply_model(xx, ss, **c)
            for role, r in zip(cou, res.chunk(len(group))):
                out[role] = r
        return out[1] + (out[0] - out[1]) * cond_scale


def forge_model_of(model, sdxl):
    unet = model.model.diffusion_model
    kmodel = SimpleNamespace(diffusion_model=unet, predictor=EpsPredictor())
    enc = model.prompt_encoder
    tokenize = SimpleNamespace(tokenize_line=lambda t: (enc.chunks(t), len(enc.tokenize(t))))
    return SimpleNamespace(
        forge_objects=SimpleNamespace(
            unet=StubUnetPatcher(kmodel),
            clip=SimpleNamespace(cond_stage_model=model.conditioner if sdxl else model.cond_stage_model),
        ),
        get_learned_conditioning=lambda prompts: model.get_learned_conditioning(list(prompts)),
        text_processing_engine_l=tokenize,
        is_sdxl=sdxl,
    )


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    from lora_factory import attention_keys, random_lora

    out = {}
    for arch, build in (("sd1", build_tiny_sd1), ("sdxl", build_tiny_sdxl)):
        model = build(0)
        d = tmp_path_factory.mktemp(f"loras_{arch}")
        keys = attention_keys(model, te=arch == "sd1")
        for i, name in enumerate(["catlora", "doglora"]):
            write_kohya_lora(
                random_lora(model, keys, seed=i + 1, arch=arch),
                d / f"{name}.safetensors",
                arch=arch,
                metadata={"loraclr_trigger": json.dumps([["sks", "ohwx"][i]])},
            )
        out[arch] = (model, d)
    return out


def sample(model, lora_dir, args, steps, batch, split, seen=None, size=8):
    """One Forge generation with CLoRA: install under inference mode, Euler (Karras σ, CFG 5), remove.
    ``seen``: a dict that collects the prompts the adapter encodes and the UNet's batch size per call."""
    from k_diffusion.external import CompVisDenoiser
    from k_diffusion.sampling import get_sigmas_karras

    adapters, clora_run = glue()
    sdxl = model.is_sdxl if hasattr(model, "is_sdxl") else False
    fm = forge_model_of(model, sdxl)
    handle = None
    if seen is not None:
        seen.setdefault("prompts", []), seen.setdefault("unet_rows", [])
        encode = fm.get_learned_conditioning
        fm.get_learned_conditioning = lambda q: (seen["prompts"].extend(q), encode(q))[1]
        handle = model.model.diffusion_model.register_forward_pre_hook(
            lambda m, a: seen["unet_rows"].append(int(a[0].shape[0]))
        )
    wrap = CompVisDenoiser(model)
    cfg = ForgeCFGDenoiser(fm, wrap, split)
    p = SimpleNamespace(
        sd_model=fm,
        steps=steps,
        width=8 * size,
        height=8 * size,
        extra_generation_params={},
        sampler=SimpleNamespace(model_wrap_cfg=cfg),
    )
    run = clora_run.CloraRun(args=ca.CloraArgs(**args), lora_folder=lora_dir)
    run.infotext = p.extra_generation_params
    run.prepare([PROMPT])
    with torch.inference_mode():
        cond = model.get_learned_conditioning(["a cat and a dog"] * batch)
        uncond = model.get_learned_conditioning([""] * batch)
        run.install(adapters.pick_adapter(p), p, PROMPT)
        try:
            sigmas = get_sigmas_karras(steps, float(wrap.sigma_min), float(wrap.sigma_max))
            g = torch.Generator().manual_seed(7)
            x = torch.randn(batch, 4, size, size, generator=g) * sigmas[0]
            for i in range(steps):
                s_in = x.new_ones(batch) * sigmas[i]
                denoised = cfg(x, s_in, cond=cond, uncond=uncond, cond_scale=5.0)
                x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        finally:
            run.remove()
            if handle is not None:
                handle.remove()
    assert count_hooks(model) == 0 and fm.forge_objects.unet.model_options == {"transformer_options": {}}
    return x.clone(), p.extra_generation_params


def test_forge_clora_latents_are_pinned(setups):
    from safetensors.torch import load_file, save_file

    got = {}
    for name, (arch, args, steps, batch, split) in CASES.items():
        model, lora_dir = setups[arch]
        x, infotext = sample(model, lora_dir, args, steps, batch, split)
        assert "CLoRA error" not in infotext and torch.isfinite(x).all(), (name, infotext)
        if args.get("latent_update"):  # the update ran (no masks-only fallback)
            assert "masks-only" not in infotext.get(ca.INFOTEXT_NOTICE_KEY, ""), (name, infotext)
        got[name] = x.contiguous()
    if os.environ.get("LORACLR_RECORD") == "1":
        REFERENCE.parent.mkdir(exist_ok=True)
        save_file(got, str(REFERENCE))
    ref = load_file(str(REFERENCE))
    assert sorted(ref) == sorted(got)
    for name, x in got.items():
        update = bool(CASES[name][1].get("latent_update"))
        assert_matches_reference(name, x, ref[name], atol=None, latent_update=update)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_forge_routed_mode_is_one_unet_call_per_step_with_each_region_reading_its_concept(setups, arch):
    """The routed mode on Forge (before: a notice and branch fusion): with a layout, every step is ONE UNet
    call over the uncond and cond rows; the branches' text is each concept's own phrase ("sks cat");
    ``region_prompt=scene`` reads the whole prompt with the concept's trigger."""
    model, lora_dir = setups[arch]
    steps = 3
    seen: dict = {}
    x, info = sample(model, lora_dir, {"mode": "routed", "layout": "1,1"}, steps, 1, False, seen)
    assert "CLoRA error" not in info and ca.INFOTEXT_NOTICE_KEY not in info and torch.isfinite(x).all(), info
    assert seen["unet_rows"] == [2] * steps  # one call a step: uncond + cond rows of the one image
    assert seen["prompts"] == ["sks cat", "ohwx dog"]
    fusion: dict = {}
    xf, _ = sample(model, lora_dir, {"layout": "1,1"}, steps, 1, False, fusion)
    # 3 branches' cond rows + the base model's uncond row (base_uncond = 1); each branch's own: 3 × 2
    assert len(fusion["unet_rows"]) == steps and fusion["unet_rows"][0] == 4
    own: dict = {}
    sample(model, lora_dir, {"layout": "1,1", "base_uncond": 0}, steps, 1, False, own)
    assert own["unet_rows"][0] == 6
    assert not torch.equal(x, xf)
    scene: dict = {}
    xs, _ = sample(
        model, lora_dir, {"mode": "routed", "layout": "1,1", "region_prompt": "scene"}, steps, 1, False, scene
    )
    assert scene["prompts"] == ["a sks cat and a dog", "a cat and a ohwx dog"] and not torch.equal(xs, x)
    routed = {"mode": "routed", "layout": "1,1"}
    plain, crops = {}, {}
    x16, _ = sample(model, lora_dir, routed, steps, 1, False, plain, size=16)
    xc, _ = sample(model, lora_dir, {**routed, "region_crops": 0.5}, steps, 1, False, crops, size=16)
    # + one call per region crop, on the cond rows only (the uncond half is the base model's)
    assert crops["unet_rows"] == [2, 1, 1] * steps and not torch.equal(xc, x16)


def test_forge_routed_mode_with_automatic_masks_freezes_the_layout_then_routes(setups):
    model, lora_dir = setups["sd1"]
    seen: dict = {}
    x, info = sample(model, lora_dir, {"mode": "routed"}, 6, 1, False, seen)
    assert "CLoRA error" not in info and torch.isfinite(x).all(), info
    rows = seen["unet_rows"]
    assert rows[0] == 4 and rows[-1] == 2, rows  # branch fusion while the layout forms, then one call a step
