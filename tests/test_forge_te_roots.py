"""`host_objects.te_roots` on Forge: SDXL's two text encoders (``clip_l``, ``clip_g``: transformers names, separate
q/k/v Linears) are both routed, the OpenCLIP bigG keys of a kohya ``lora_te2_…`` LoRA included."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from lib_loraclr.clora.routing import te_router
from lib_loraclr.deltas import DeltaSet, LoraModule
from lib_loraclr.host_objects import te_roots
from lib_loraclr.keymap import TE_SD1_PREFIX, TE_SDXL1_PREFIX, TE_SDXL2_PREFIX


def _hf_text(d: int, n: int) -> nn.Module:
    """``.transformer.text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj`` as Forge builds CLIP."""
    t = nn.Module()
    t.text_model = nn.Module()
    t.text_model.encoder = nn.Module()
    t.text_model.encoder.layers = nn.ModuleList(nn.Module() for _ in range(n))
    for layer in t.text_model.encoder.layers:
        layer.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(layer.self_attn, name, nn.Linear(d, d))
    clip = nn.Module()  # Forge's SDClipModel
    clip.transformer = t
    return clip


class _Unet:
    def set_model_attn2_replace(self, *a):  # Forge UnetPatcher surface `forge_unet` checks
        pass

    def set_model_unet_function_wrapper(self, *a):
        pass

    def clone(self):
        return self


def _forge_model(sdxl: bool) -> SimpleNamespace:
    cond = nn.Module()
    cond.clip_l = _hf_text(8, 2)
    if sdxl:
        cond.clip_g = _hf_text(12, 3)
    clip = SimpleNamespace(cond_stage_model=cond)
    return SimpleNamespace(is_sdxl=sdxl, forge_objects=SimpleNamespace(unet=_Unet(), clip=clip))


def _lora(keys: dict[str, int]) -> DeltaSet:
    mods = {
        k: LoraModule(key=k, down=torch.ones(1, d), up=torch.ones(d, 1), alpha=1.0) for k, d in keys.items()
    }
    return DeltaSet(modules=mods, arch="sdxl")


def test_forge_sdxl_routes_both_text_encoders_with_the_fused_openclip_keys():
    model = _forge_model(sdxl=True)
    roots = te_roots(model)
    cond = model.forge_objects.clip.cond_stage_model
    assert [(r[0], r[1]) for r in roots] == [
        (cond.clip_l.transformer, TE_SDXL1_PREFIX),
        (cond.clip_g.transformer, TE_SDXL2_PREFIX),
    ]
    keys = {TE_SDXL1_PREFIX + "text_model.encoder.layers.1.self_attn.q_proj": 8}
    for i in range(3):
        keys.update({TE_SDXL2_PREFIX + f"transformer.resblocks.{i}.attn.in_proj:{p}": 12 for p in "qkv"})
        keys[TE_SDXL2_PREFIX + f"transformer.resblocks.{i}.attn.out_proj"] = 12
    router = te_router(roots, [SimpleNamespace(deltas=_lora(keys), te_weight=1.0)])
    assert router is not None
    assert [r.n_modules for r in router.routers] == [1, 12]


def test_forge_sd1_keeps_its_one_text_encoder():
    model = _forge_model(sdxl=False)
    roots = te_roots(model)
    assert len(roots) == 1 and roots[0][1] == TE_SD1_PREFIX
    assert roots[0][0] is model.forge_objects.clip.cond_stage_model.clip_l.transformer
    key = TE_SD1_PREFIX + "text_model.encoder.layers.0.self_attn.v_proj"
    router = te_router(roots, [SimpleNamespace(deltas=_lora({key: 8}), te_weight=1.0)])
    assert router is not None and router.routers[0].n_modules == 1
