"""Host adapters: where CLoRA plugs into A1111 and Forge sampling. Chosen by capability (`host.is_forge`).

Both hosts run the same CLoRA step, `lib_loraclr.clora.clora_call` over a `CloraDenoiser` (branch
conditioning, the branches' UNet calls, masks, fusion, the latent update, the step counter from σ). An
adapter only reads the host's objects, builds a plain ``model(x, sigma, cond)`` call and the row roles of
each host call, and writes the updated latent back into the sampler's ``x``.

A1111 (`A1111Adapter`): A1111's own ``CFGDenoiser.forward`` runs unchanged (its callbacks, ``AND``
weights, cond/uncond padding and splitting, skip-early-CFG, mask blending, refiner switch, live preview,
interrupts). The adapter wraps only the model call it makes: an instance ``forward`` on the run's
k-diffusion wrapper (``p.sampler.model_wrap_cfg.inner_model``, made fresh for every sampling pass), plus a
forward pre-hook and a forward hook on the CFG denoiser (torch module hooks, per run, removed by
``remove``). The pre-hook records the sampler's ``x`` and, from ``cond.batch``, the rows A1111 batches
(`CfgStep`); branch k's text is rebuilt from its prompt schedule at this step. The forward hook writes the
latent update into the sampler's ``x`` after the CFG call, where k-diffusion's one-evaluation samplers step
from it. At the refiner switch A1111 builds a new wrapper for the refiner: CLoRA stops there.

Forge (`ForgeAdapter`): the UNet patcher is cloned (``p.sd_model.forge_objects.unet.clone()``) and
`ForgeUnetCall` is set as its UNet function wrapper: each call of Forge's sampling function (chunks of B
rows, ``cond_or_uncond``; `chunk_roles`) goes through `clora_call`. Forge samples under
``torch.inference_mode``; the latent update runs in `inference_mode_grad` (normal clones of the
inference-tensor weights) with a router built outside inference mode, and an instance ``forward`` on the
CFG denoiser writes the new latent into the sampler's ``x``. Verified on real Forge (dfdcbab6, CPU). If
autograd still fails, the run goes on masks-only with a ``CLoRA notice``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from lib_loraclr.clora import (
    UNET_PREFIX,
    BranchPrompts,
    CfgStep,
    CloraDenoiser,
    CloraError,
    CompositeRouter,
    Concept,
    RoutedLoras,
    branch_prompts,
    chunk_roles,
    clora_call,
    has_te_parts,
    routable_te_key,
    te_branch_conds,
)
from lib_loraclr.clora.autograd import freeze_parameters, inference_mode_grad, unfreeze
from lib_loraclr.clora.denoiser import default_input_scale
from lib_loraclr.clora.layout import user_layout
from lib_loraclr.clora.regional import RegionalDenoiser
from lib_loraclr.clora.tokens import token_positions_from
from lib_loraclr.deltas import is_unet_key

from .host import forge_unet

# ------------------------------------------------------------------------------------------ shared pieces


def host_tokenize_line(sd_model: Any) -> Callable[[str], tuple[Sequence[Any], int]]:
    """The first text encoder's ``tokenize_line``: Forge ``text_processing_engine`` (``_l`` for SDXL),
    A1111 ``cond_stage_model`` (SD1/SD2) or ``conditioner.embedders[0]`` (SDXL)."""
    candidates = [
        getattr(sd_model, "text_processing_engine", None),
        getattr(sd_model, "text_processing_engine_l", None),
        getattr(sd_model, "cond_stage_model", None),
    ]
    embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", None)
    if embedders:
        candidates.append(embedders[0])
    for c in candidates:
        fn = getattr(c, "tokenize_line", None)
        if callable(fn):
            return fn
    raise CloraError("this model has no tokenize_line (unsupported model type for CLoRA)")


def concept_prompts(sd_model: Any, base: str, specs: Sequence[Any]) -> BranchPrompts:
    """`branch_prompts` of the base prompt and the bound concepts, with the host's tokenizer."""
    concepts = [Concept(s.trigger, s.words) for s in specs]
    return branch_prompts(base, concepts, token_positions_from(host_tokenize_line(sd_model)))


def te_roots(sd_model: Any) -> list[tuple[Any, str]]:
    """``(module, canonical prefix)`` of each text encoder whose keys our LoRAs use.

    A1111 wraps the encoders (``.wrapped``): SD1/SD2 ``cond_stage_model.wrapped`` ↔ ``cond_stage_model.``;
    SDXL ``conditioner.embedders[i].wrapped`` ↔ ``conditioner.embedders.i.``. Forge: the first
    transformers ``CLIPTextModel`` (one with ``text_model``) under ``forge_objects.clip`` ↔ the canonical
    ``….transformer.`` prefix of the model family.
    """
    if forge_unet(sd_model) is not None:
        clip = getattr(getattr(sd_model, "forge_objects", None), "clip", None)
        root = getattr(clip, "cond_stage_model", None)
        for _name, m in root.named_modules() if root is not None else ():
            if hasattr(m, "text_model"):
                sdxl = getattr(sd_model, "is_sdxl", False)
                return [
                    (m, "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer.")
                ]
        return []
    embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", None)
    if embedders is not None:
        return [(getattr(e, "wrapped", e), f"conditioner.embedders.{i}.") for i, e in enumerate(embedders)]
    cm = getattr(sd_model, "cond_stage_model", None)
    return [(getattr(cm, "wrapped", cm), "cond_stage_model.")] if cm is not None else []


def te_router(sd_model: Any, specs: Sequence[Any]) -> CompositeRouter | None:
    """Per-branch text-encoder LoRA hooks (branch 0 = no LoRA); None when no LoRA has TE parts."""
    branches: list[list[tuple[Any, float]]] = [[]] + [[(s.deltas, s.te_weight)] for s in specs]
    routers = []
    for module, prefix in te_roots(sd_model):
        r = RoutedLoras(module, branches, prefix=prefix, key_filter=routable_te_key)
        if r.n_modules:
            routers.append(r)
    return CompositeRouter(routers) if routers else None


def unet_router(unet: Any, specs: Sequence[Any]) -> RoutedLoras:
    """Per-branch UNet LoRA hooks (branch 0 = no LoRA, branch k = concept k's LoRA)."""
    branches: list[list[tuple[Any, float]]] = [[]] + [[(s.deltas, s.unet_weight)] for s in specs]
    return RoutedLoras(unet, branches, prefix=UNET_PREFIX, key_filter=is_unet_key)


def latent_hw(p: Any) -> tuple[int, int]:
    return int(getattr(p, "height", 512)) // 8, int(getattr(p, "width", 512)) // 8


# ------------------------------------------------------------------------------------------ A1111


class A1111Host:
    """The few A1111 modules the adapter uses, imported lazily (tests pass stand-ins)."""

    def __init__(self, **mods: Any) -> None:
        if not mods:
            from modules import devices, prompt_parser, sd_samplers_common, shared

            mods = {
                "devices": devices,
                "prompt_parser": prompt_parser,
                "sd_samplers_common": sd_samplers_common,
                "state": shared.state,
            }
        self.__dict__.update(mods)


class A1111Adapter:
    """CLoRA on A1111 inside the run's CFG denoiser's model calls (see the module docstring)."""

    name = "a1111"

    def __init__(self, host: A1111Host | None = None) -> None:
        self._host = host
        self._cfg: Any = None
        self._frozen: list[Any] = []
        self._handles: list[Any] = []
        self._wrap: Any = None  # the k-diffusion wrapper whose instance ``forward`` is ours
        self._forward: Any = None
        self._previous: Any = None  # an instance ``forward`` that was there before ours
        self._step: CfgStep | None = None
        self._denoiser: Any = None
        self._schedules: Sequence[Any] = ()
        self._run: Any = None

    @property
    def host(self) -> A1111Host:
        if self._host is None:
            self._host = A1111Host()
        return self._host

    def install(
        self, p: Any, run: Any, base: str, specs: Sequence[Any], *, masks_only: bool = False, cfg: Any = None
    ) -> Any:
        h = self.host
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
        bp = concept_prompts(sd_model, base, specs)
        router_te = te_router(sd_model, specs)

        def encode(prompts: list[str]) -> Any:
            conds = h.prompt_parser.SdConditioning(prompts, width=p.width, height=p.height)
            with h.devices.autocast():
                return h.prompt_parser.get_learned_conditioning(sd_model, conds, steps)

        schedules = te_branch_conds(encode, [[q] for q in bp.prompts[1:]], router_te)
        layout = user_layout(run.args.layout, len(specs), latent_hw(p))
        wrap = cfg.inner_model  # the k-diffusion wrapper (CompVisDenoiser …) the CFG denoiser calls
        original = wrap.forward  # its forward as it is now (the class's, or another extension's)

        def model(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
            return original(x, sigma, cond=cond)

        denoiser: Any = CloraDenoiser(
            inner_model=model,
            unet=unet,
            conds=[None] * bp.n_branches,
            groups=bp.groups,
            mask_tokens=bp.mask_tokens,
            options=options,
            router=unet_router(unet, specs),
            layout=layout,
            background_tokens=bp.background_tokens,
            input_scale=default_input_scale(wrap),
        )
        if run.args.mode == "routed" and not masks_only:
            denoiser = RegionalDenoiser.around(denoiser, layout)

        def forward(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return self.model_call(original, x, sigma, **kwargs)

        forward._loraclr = True  # type: ignore[attr-defined]
        unfreeze(self._frozen)  # a previous install of this adapter that was not removed
        self._frozen = []
        self._denoiser, self._schedules, self._run, self._cfg = denoiser, schedules, run, cfg
        try:
            self._frozen = freeze_parameters(unet)
            self._handles = [cfg.register_forward_pre_hook(self._before_cfg, with_kwargs=True)]
            try:
                self._handles.append(
                    cfg.register_forward_hook(self._after_cfg, with_kwargs=True, always_call=True)
                )
            except TypeError:  # torch 2.0: no always_call
                self._handles.append(cfg.register_forward_hook(self._after_cfg, with_kwargs=True))
            self._wrap, self._previous, self._forward = wrap, wrap.__dict__.get("forward"), forward
            wrap.forward = forward
        except BaseException:
            self.remove(p)
            raise
        return denoiser

    # ------------------------------------------------------------------ hooks on the CFG denoiser
    def _before_cfg(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: the sampler's ``x`` and the rows the CFG denoiser will batch (``cond.batch``:
        per image its ``AND`` parts)."""
        self._step = None
        try:
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        except TypeError:
            return
        x, cond = bound.get("x"), bound.get("cond")
        batch = getattr(cond, "batch", None)
        if (
            not isinstance(x, torch.Tensor)
            or not isinstance(batch, (list, tuple))
            or len(batch) != x.shape[0]
        ):
            return
        repeats = [max(1, len(parts)) for parts in batch]
        if any(n > 1 for n in repeats) and self._run is not None:
            self._run.notice("CLoRA uses the first AND part of the prompt for its branches")
        self._step = CfgStep(x, int(getattr(module, "step", 0)), repeats)

    def _after_cfg(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        """Forward hook: the latent update of this step goes into the sampler's ``x``, from which
        k-diffusion's one-evaluation samplers take their step after the call (`CloraDenoiser`)."""
        st, self._step = self._step, None
        if st is not None and st.x_new is not None and st.x_new.shape == st.x.shape:
            with torch.no_grad():
                st.x.copy_(st.x_new.to(device=st.x.device, dtype=st.x.dtype))

    # ------------------------------------------------------------------ the model call
    def model_call(
        self, original: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """One call of the CFG denoiser to its k-diffusion wrapper, ``(x_in, sigma_in, cond=…)``: CLoRA's
        prediction for the rows of the CFG halves (`lib_loraclr.clora.clora_call`), the wrapper's own
        forward (``original``) for the rest, and for any call outside a CFG step."""
        st, denoiser = self._step, self._denoiser
        if st is None or denoiser is None or set(kwargs) != {"cond"}:
            return original(x, sigma, **kwargs)
        rows = st.take(int(x.shape[0]))
        if rows is None:
            self._run.notice("the CFG denoiser's batch did not match its prompts: a step ran without CLoRA")
            return original(x, sigma, **kwargs)
        text = [self.host.prompt_parser.reconstruct_cond_batch(s, st.step) for s in self._schedules]

        def model(xx: torch.Tensor, ss: torch.Tensor, cond: Any) -> torch.Tensor:
            return original(xx, ss, cond=cond)

        out = clora_call(denoiser, model, x, sigma, kwargs["cond"], rows, branch_text=text)
        if denoiser.fallback_reason:
            self._run.notice(denoiser.fallback_reason)
        if getattr(denoiser, "updated_now", False):
            st.x_new = denoiser.x_new
        return out

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
        self._forward = self._previous = None
        self._step = None
        self._denoiser = None
        self._cfg = None


# ------------------------------------------------------------------------------------------ Forge

ROLE_KEY = "_loraclr_cond_or_uncond"  # per-row cond_or_uncond, carried through the engine's batching


def forge_input_scale(kmodel: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``c_in(σ)`` ``[B, 1, 1, 1]`` of Forge's ``KModel.predictor`` (``calculate_input`` on ones); None (the
    engine's VP default) without one."""
    predictor = getattr(kmodel, "predictor", None)
    if not callable(getattr(predictor, "calculate_input", None)):
        return None
    return lambda sigma: predictor.calculate_input(
        sigma, torch.ones((sigma.shape[0], 1, 1, 1), dtype=sigma.dtype, device=sigma.device)
    )


class ForgeUnetCall:
    """Forge's UNet function wrapper ``fn(apply_model, {"input", "timestep", "c", "cond_or_uncond"})``.

    Forge's ``c`` holds per-row tensors (``c_crossattn``, SDXL ``y``, ``c_concat`` …), other entries and
    ``transformer_options``. The per-row tensors are the engine's ``cond`` (with the rows' roles under
    `ROLE_KEY`, so every UNet call the engine batches gets its own ``cond_or_uncond``); the rest is passed
    to every call as it is. ``branch_conds[k-1]``: branch k's text from Forge's ``get_learned_conditioning``
    (``[1, T, D]``, SDXL ``{"crossattn", "vector"}``). ``previous``: a function wrapper set before ours
    (called instead of ``apply_model``). ``x_new``: the latent update of the CFG call in progress."""

    def __init__(self, denoiser: CloraDenoiser, branch_conds: Sequence[Any], previous: Any = None) -> None:
        self.denoiser = denoiser
        self.branch_conds = list(branch_conds)
        self.previous = previous
        self.x_new: torch.Tensor | None = None

    @property
    def last_weights(self) -> torch.Tensor | None:
        return self.denoiser.last_weights

    def branch_text(self, ref: torch.Tensor, ref_y: Any) -> list[dict[str, torch.Tensor]]:
        """Each branch's text in Forge's keys, on the call's device and dtype (the call's ``y`` is kept
        for a branch without a ``vector``)."""
        out = []
        for c in self.branch_conds:
            cross, y = (c["crossattn"], c.get("vector")) if isinstance(c, dict) else (c, None)
            entry = {"c_crossattn": cross.to(device=ref.device, dtype=ref.dtype)}
            if isinstance(y, torch.Tensor) and isinstance(ref_y, torch.Tensor):
                entry["y"] = y.to(device=ref_y.device, dtype=ref_y.dtype)
            out.append(entry)
        return out

    def __call__(self, apply_model: Callable[..., torch.Tensor], args: dict[str, Any]) -> torch.Tensor:
        x, t, c = args["input"], args["timestep"], dict(args["c"])
        cou = [int(r) for r in args["cond_or_uncond"]]
        b = x.shape[0] // len(cou)
        topt = c.pop("transformer_options", None)
        cond = {k: v for k, v in c.items() if isinstance(v, torch.Tensor) and v.shape[:1] == x.shape[:1]}
        static = {k: v for k, v in c.items() if k not in cond}
        cond[ROLE_KEY] = torch.tensor([r for r in cou for _ in range(b)], device=x.device)
        previous = self.previous

        def model(xx: torch.Tensor, ss: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
            kw = {**static, **cond}
            roles = kw.pop(ROLE_KEY)[::b].tolist()
            if topt is not None:
                kw["transformer_options"] = {**topt, "cond_or_uncond": roles}
            if previous is not None:
                return previous(apply_model, {"input": xx, "timestep": ss, "c": kw, "cond_or_uncond": roles})
            return apply_model(xx, ss, **kw)

        d = self.denoiser
        d.inner_model = model
        text = self.branch_text(c["c_crossattn"], c.get("y"))
        out = clora_call(d, model, x, t, cond, chunk_roles(cou, b), branch_text=text)
        if d.updated_now:
            self.x_new = d.x_new
        return out


class ForgeAdapter:
    """CLoRA on Forge through a cloned UNet patcher's function wrapper (see the module docstring)."""

    name = "forge"

    def __init__(self) -> None:
        self._original_unet: Any = None
        self._patched_unet: Any = None
        self._model: Any = None
        self._cfg: Any = None

    def install(
        self, p: Any, run: Any, base: str, specs: Sequence[Any], *, masks_only: bool = True, cfg: Any = None
    ) -> CloraDenoiser:
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
        bp = concept_prompts(sd_model, base, specs)
        router_te = te_router(sd_model, specs)
        if router_te is None and has_te_parts(s.deltas for s in specs):
            run.notice(
                "CLoRA could not find Forge's text encoder: the LoRAs' text-encoder parts are not used"
            )
        branch_conds = te_branch_conds(
            lambda q: sd_model.get_learned_conditioning(q), [[q] for q in bp.prompts[1:]], router_te
        )
        if run.args.mode == "routed":
            run.notice("Forge: the routed mode is not available here yet; CLoRA runs branch fusion")
        with torch.inference_mode(False):  # Forge calls us under inference_mode: build normal tensors
            grad_router = unet_router(unet, specs) if wants_update else None
        denoiser = CloraDenoiser(
            inner_model=_not_called,  # set per call (`ForgeUnetCall`)
            unet=unet,
            conds=[None] * bp.n_branches,
            groups=bp.groups,
            mask_tokens=bp.mask_tokens,
            options=options,
            router=unet_router(unet, specs),
            input_scale=forge_input_scale(patcher.model),
            layout=user_layout(run.args.layout, len(specs), latent_hw(p)),
            background_tokens=bp.background_tokens,
            update_scope=(lambda: inference_mode_grad(unet)) if wants_update else None,
            grad_router=grad_router,
        )
        previous = getattr(patcher, "model_options", {}).get("model_function_wrapper")
        call = ForgeUnetCall(denoiser, branch_conds, previous)
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
                run.notice(f"Forge: {denoiser.fallback_reason}; CLoRA runs masks-only")
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
        if model is None:
            return
        objs = getattr(model, "forge_objects", None)
        if objs is not None and getattr(objs, "unet", None) is patched:
            objs.unet = original


def _not_called(*args: Any, **kwargs: Any) -> torch.Tensor:
    raise RuntimeError("the Forge CLoRA step ran outside Forge's UNet function wrapper")


def pick_adapter(p: Any) -> A1111Adapter | ForgeAdapter:
    """Forge adapter when the model has Forge's UNet patcher (capability), else A1111's."""
    return ForgeAdapter() if forge_unet(getattr(p, "sd_model", None)) is not None else A1111Adapter()
