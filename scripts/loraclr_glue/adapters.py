"""Host adapters: where CLoRA plugs into A1111 and Forge sampling. Chosen by capability
(`lib_loraclr.host_objects.forge_unet`).

Both hosts run the same CLoRA step (`lib_loraclr.clora.host_calls`); an adapter only finds the host's
objects (UNet, text encoders, tokenizer, CFG denoiser), installs the step on them and removes it.

A1111 (`A1111Adapter`): A1111's own ``CFGDenoiser.forward`` runs unchanged (callbacks, ``AND`` weights,
padding, mask blending, refiner switch, previews, interrupts); `CfgModelCall` is an instance ``forward`` on
the run's k-diffusion wrapper (``p.sampler.model_wrap_cfg.inner_model``, fresh per sampling pass) plus torch
forward hooks on the CFG denoiser, all removed by ``remove``. At the refiner switch A1111 builds a new
wrapper: CLoRA stops there.

Forge (`ForgeAdapter`): a clone of ``forge_objects.unet`` with `ForgeUnetCall` as its UNet function wrapper.
The latent update runs outside Forge's inference mode (`inference_mode_grad`) and an instance ``forward`` on
the CFG denoiser writes it into the sampler's ``x``; if autograd fails, the run goes on masks-only with a
``CLoRA notice``. Design notes: ``docs/DESIGN.md`` ("CLoRA in the hosts").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from lib_loraclr.clora import has_te_parts, te_branch_conds
from lib_loraclr.clora.autograd import freeze_parameters, inference_mode_grad, unfreeze
from lib_loraclr.clora.denoiser import default_input_scale
from lib_loraclr.clora.host_calls import CfgModelCall, ForgeUnetCall, concept_denoiser, forge_input_scale
from lib_loraclr.clora.layout import user_layout
from lib_loraclr.clora.regional import RegionalDenoiser
from lib_loraclr.clora.routing import CompositeRouter, te_router, unet_router
from lib_loraclr.host_objects import concept_prompts, forge_unet, latent_hw, te_roots


class A1111Adapter:
    """CLoRA on A1111 inside the run's CFG denoiser's model calls (see the module docstring)."""

    name = "a1111"

    def __init__(self) -> None:
        self._cfg: Any = None
        self._call: CfgModelCall | None = None
        self._frozen: list[Any] = []
        self._handles: list[Any] = []
        self._wrap: Any = None  # the k-diffusion wrapper whose instance ``forward`` is ours
        self._forward: Any = None
        self._previous: Any = None  # an instance ``forward`` that was there before ours

    def install(
        self, p: Any, run: Any, base: str, specs: Sequence[Any], *, masks_only: bool = False, cfg: Any = None
    ) -> Any:
        from modules import devices, prompt_parser

        self.remove(p)  # a previous install of this adapter that was not removed
        cfg = cfg if cfg is not None else p.sampler.model_wrap_cfg
        sd_model = p.sd_model
        if (
            getattr(getattr(sd_model, "model", None), "conditioning_key", None) == "crossattn-adm"
            or getattr(sd_model, "cond_stage_key", None) == "edit"
        ):
            run.notice("CLoRA does not support unCLIP / InstructPix2Pix models; sampling without it")
            return None
        unet = sd_model.model.diffusion_model
        steps = int(getattr(cfg, "total_steps", None) or getattr(p, "steps", 20))
        options = run.args.to_options(steps)
        if masks_only:
            options = replace(options, masks_only=True)
        routed = run.args.mode == "routed" and not masks_only
        bp = concept_prompts(
            sd_model, base, specs, short_regions=routed and run.args.region_prompt == "concept"
        )

        def encode(prompts: list[str]) -> Any:
            conds = prompt_parser.SdConditioning(prompts, width=p.width, height=p.height)
            with devices.autocast():
                return prompt_parser.get_learned_conditioning(sd_model, conds, steps)

        schedules = te_branch_conds(
            encode, [[q] for q in bp.prompts[1:]], te_router(te_roots(sd_model), specs)
        )
        layout = user_layout(run.args.layout, len(specs), latent_hw(p))
        wrap = cfg.inner_model  # the k-diffusion wrapper (CompVisDenoiser …) the CFG denoiser calls
        original = wrap.forward  # its forward as it is now (the class's, or another extension's)

        def model(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
            return original(x, sigma, cond=cond)

        denoiser: Any = concept_denoiser(model, unet, specs, bp, options, layout, default_input_scale(wrap))
        if routed:
            denoiser = RegionalDenoiser.around(denoiser, layout)
        call = CfgModelCall(
            denoiser,
            lambda step: [prompt_parser.reconstruct_cond_batch(s, step) for s in schedules],
            run.notice,
        )

        def forward(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return call(original, x, sigma, **kwargs) if self._call is call else original(x, sigma, **kwargs)

        forward._loraclr = True  # type: ignore[attr-defined]
        self._call, self._cfg = call, cfg
        try:
            self._frozen = freeze_parameters(unet)
            self._handles = [cfg.register_forward_pre_hook(call.before, with_kwargs=True)]
            try:
                self._handles.append(
                    cfg.register_forward_hook(call.after, with_kwargs=True, always_call=True)
                )
            except TypeError:  # torch 2.0: no always_call
                self._handles.append(cfg.register_forward_hook(call.after, with_kwargs=True))
            self._wrap, self._previous, self._forward = wrap, wrap.__dict__.get("forward"), forward
            wrap.forward = forward
        except BaseException:
            self.remove(p)
            raise
        return denoiser

    def remove(self, p: Any) -> None:
        frozen, self._frozen = self._frozen, []
        unfreeze(frozen)
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        wrap, self._wrap = self._wrap, None
        if wrap is not None and wrap.__dict__.get("forward") is self._forward:
            if self._previous is None:
                del wrap.__dict__["forward"]
            else:
                wrap.__dict__["forward"] = self._previous
        self._forward = self._previous = self._call = self._cfg = None


class ForgeAdapter:
    """CLoRA on Forge through a cloned UNet patcher's function wrapper (see the module docstring)."""

    name = "forge"

    def __init__(self) -> None:
        self._original_unet: Any = None
        self._patched_unet: Any = None
        self._model: Any = None
        self._cfg: Any = None

    def install(
        self, p: Any, run: Any, base: str, specs: Sequence[Any], *, masks_only: bool = False, cfg: Any = None
    ) -> Any:
        sd_model = p.sd_model
        original = sd_model.forge_objects.unet
        patcher = original.clone()
        unet = patcher.model.diffusion_model
        options = run.args.to_options(int(getattr(p, "steps", 20)))
        cfg = cfg if cfg is not None else getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
        wants_update = not (masks_only or options.masks_only) and options.latent_update
        if wants_update and not callable(getattr(cfg, "forward", None)):
            run.notice("Forge: no sampler to write the latent update into: CLoRA runs masks-only here")
            wants_update = False
        if not wants_update:
            options = replace(options, masks_only=True)
        routed = run.args.mode == "routed" and not masks_only
        bp = concept_prompts(
            sd_model, base, specs, short_regions=routed and run.args.region_prompt == "concept"
        )
        router_te: CompositeRouter | None = te_router(te_roots(sd_model), specs)
        if router_te is None and has_te_parts(s.deltas for s in specs):
            run.notice(
                "CLoRA could not find Forge's text encoder: the LoRAs' text-encoder parts are not used"
            )
        branch_conds = te_branch_conds(
            lambda q: sd_model.get_learned_conditioning(q), [[q] for q in bp.prompts[1:]], router_te
        )
        with torch.inference_mode(False):  # Forge calls us under inference_mode: build normal tensors
            grad_router = unet_router(unet, specs) if wants_update else None
        layout = user_layout(run.args.layout, len(specs), latent_hw(p))
        denoiser = concept_denoiser(
            _not_called,  # set per call (`ForgeUnetCall`)
            unet,
            specs,
            bp,
            options,
            layout,
            forge_input_scale(patcher.model),
            update_scope=(lambda: inference_mode_grad(unet)) if wants_update else None,
            grad_router=grad_router,
        )
        if routed:
            denoiser = RegionalDenoiser.around(denoiser, layout)
        previous = getattr(patcher, "model_options", {}).get("model_function_wrapper")
        call = ForgeUnetCall(denoiser, branch_conds, previous, notice=run.notice)
        patcher.set_model_unet_function_wrapper(call)
        sd_model.forge_objects.unet = patcher
        self._original_unet, self._patched_unet, self._model = original, patcher, sd_model
        if wants_update:
            self._wrap_cfg(cfg, call, run)
        return denoiser

    def _wrap_cfg(self, cfg: Any, call: ForgeUnetCall, run: Any) -> None:
        """An instance ``forward`` on Forge's CFG denoiser: after each call, the latent update made in it is
        written into the sampler's own ``x`` (k-diffusion's one-evaluation samplers step from that tensor
        after the call, and the prediction returned was made at it)."""
        original = cfg.__dict__.get("forward")
        bound = cfg.forward
        denoiser = call.denoiser

        def forward(x, sigma, *args, **kwargs):
            if not denoiser.options.masks_only and (
                getattr(cfg, "mask", None) is not None or getattr(cfg, "classic_ddim_eps_estimation", False)
            ):
                denoiser.options = replace(denoiser.options, masks_only=True)
                run.notice(
                    "Forge: no latent update with an inpainting mask or classic DDIM: CLoRA runs masks-only"
                )
            out = bound(x, sigma, *args, **kwargs)
            x_new, call.x_new = call.x_new, None
            if denoiser.fallback_reason:
                reason = denoiser.fallback_reason
                run.notice(f"Forge: {reason}" + ("" if "masks-only" in reason else "; CLoRA runs masks-only"))
            if x_new is not None and x_new.shape == x.shape:
                with torch.inference_mode(torch.is_inference(x)):
                    x.copy_(x_new.to(device=x.device, dtype=x.dtype))
            return out

        forward._loraclr = True  # type: ignore[attr-defined]
        forward._loraclr_original = original  # type: ignore[attr-defined]
        cfg.forward = forward
        self._cfg = cfg

    def remove(self, p: Any) -> None:
        model, original, patched = self._model, self._original_unet, self._patched_unet
        self._model = self._original_unet = self._patched_unet = None
        cfg, self._cfg = self._cfg, None
        fwd = cfg.__dict__.get("forward") if cfg is not None else None
        if fwd is not None and getattr(fwd, "_loraclr", False):
            if fwd._loraclr_original is None:
                del cfg.__dict__["forward"]
            else:
                cfg.__dict__["forward"] = fwd._loraclr_original
        objs = getattr(model, "forge_objects", None)
        if objs is not None and getattr(objs, "unet", None) is patched:
            objs.unet = original


def _not_called(*args: Any, **kwargs: Any) -> torch.Tensor:
    raise RuntimeError("the Forge CLoRA step ran outside Forge's UNet function wrapper")


def pick_adapter(p: Any) -> A1111Adapter | ForgeAdapter:
    """Forge adapter when the model has Forge's UNet patcher (capability), else A1111's."""
    return ForgeAdapter() if forge_unet(getattr(p, "sd_model", None)) is not None else A1111Adapter()
