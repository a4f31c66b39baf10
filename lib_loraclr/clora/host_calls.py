"""The CLoRA step in each WebUI's own model-call protocol: plain callables, dicts and tensors.

The WebUI adapters (``scripts/loraclr_glue/adapters.py``) only find the host's objects and install these:

- `CfgModelCall` — A1111: a forward pre-hook and a forward hook on the run's ``CFGDenoiser`` (the rows it
  batches, `CfgStep`; the latent update written into the sampler's ``x``) and the k-diffusion wrapper's
  model call ``(x, sigma, cond=…)`` replaced by `clora_call` on the CFG rows.
- `ForgeUnetCall` — Forge: the UNet function wrapper ``fn(apply_model, {"input", "timestep", "c",
  "cond_or_uncond"})`` of a cloned UNet patcher, each chunk through `clora_call`.
- `concept_denoiser` — the `CloraDenoiser` both adapters build from bound concepts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .denoiser import CloraDenoiser
from .options import CloraOptions
from .routing import unet_router
from .step import CfgStep, chunk_roles, clora_call
from .tokens import BranchPrompts

#: per-row ``cond_or_uncond`` carried through the engine's batching of a Forge call
ROLE_KEY = "_loraclr_cond_or_uncond"


def concept_denoiser(
    inner_model: Callable[..., torch.Tensor],
    unet: nn.Module,
    specs: Sequence[Any],
    prompts: BranchPrompts,
    options: CloraOptions,
    layout: torch.Tensor | None,
    input_scale: Callable[[torch.Tensor], torch.Tensor] | None,
    **extra: Any,
) -> CloraDenoiser:
    """A `CloraDenoiser` over ``unet`` with branch k = ``specs[k-1]``'s LoRA (`unet_router`); the branches'
    text is set per call (``conds`` start empty). ``layout``: ``[1, K, h, w]`` or None (automatic masks);
    ``input_scale``: ``c_in(σ)`` ``[B, 1, 1, 1]`` (None = the VP default); ``extra``: further
    `CloraDenoiser` arguments."""
    return CloraDenoiser(
        inner_model=inner_model,
        unet=unet,
        conds=[None] * prompts.n_branches,
        groups=prompts.groups,
        mask_tokens=prompts.mask_tokens,
        options=options,
        router=unet_router(unet, specs),
        layout=layout,
        background_tokens=prompts.background_tokens,
        input_scale=input_scale,
        **extra,
    )


class CfgModelCall:
    """CLoRA inside A1111's ``CFGDenoiser`` of one sampling pass.

    ``denoiser``: the engine (`CloraDenoiser` / `RegionalDenoiser`); ``branch_text(step)``: each branch's
    text conditioning at a sampler step (A1111: its prompt schedule reconstructed at the step);
    ``notice(text)``: a visible notice of the run. `before` (forward pre-hook with kwargs) records the
    sampler's ``x`` and the rows the CFG denoiser batches (``cond.batch``: per image its ``AND`` parts);
    `__call__` replaces the wrapper's model call; `after` (forward hook) writes the latent update made
    during the step into the sampler's ``x``, where k-diffusion's one-evaluation samplers step from it.
    """

    def __init__(
        self,
        denoiser: Any,
        branch_text: Callable[[int], list[Any]],
        notice: Callable[[str], None],
    ) -> None:
        self.denoiser = denoiser
        self.branch_text = branch_text
        self.notice = notice
        self.step: CfgStep | None = None

    def before(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.step = None
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
        if any(n > 1 for n in repeats):
            self.notice("CLoRA uses the first AND part of the prompt for its branches")
        self.step = CfgStep(x, int(getattr(module, "step", 0)), repeats)

    def after(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        st, self.step = self.step, None
        if st is not None and st.x_new is not None and st.x_new.shape == st.x.shape:
            with torch.no_grad():
                st.x.copy_(st.x_new.to(device=st.x.device, dtype=st.x.dtype))

    def __call__(
        self, original: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """One call of the CFG denoiser to its k-diffusion wrapper, ``(x_in, sigma_in, cond=…)``: CLoRA's
        prediction for the rows of the CFG halves, the wrapper's own forward (``original``) for the rest
        and for any call outside a CFG step."""
        st, denoiser = self.step, self.denoiser
        if st is None or set(kwargs) != {"cond"}:
            return original(x, sigma, **kwargs)
        rows = st.take(int(x.shape[0]))
        if rows is None:
            self.notice("the CFG denoiser's batch did not match its prompts: a step ran without CLoRA")
            return original(x, sigma, **kwargs)

        def model(xx: torch.Tensor, ss: torch.Tensor, cond: Any) -> torch.Tensor:
            return original(xx, ss, cond=cond)

        out = clora_call(
            denoiser, model, x, sigma, kwargs["cond"], rows, branch_text=self.branch_text(st.step)
        )
        if denoiser.fallback_reason:
            self.notice(denoiser.fallback_reason)
        if getattr(denoiser, "updated_now", False):
            st.x_new = denoiser.x_new
        return out


def forge_input_scale(kmodel: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``c_in(σ)`` ``[B, 1, 1, 1]`` of Forge's ``KModel.predictor`` (``calculate_input`` on ones); None (the
    engine's VP default) without one."""
    predictor = getattr(kmodel, "predictor", None)
    if not callable(getattr(predictor, "calculate_input", None)):
        return None
    return lambda sigma: predictor.calculate_input(
        sigma, torch.ones((sigma.shape[0], 1, 1, 1), dtype=sigma.dtype, device=sigma.device)
    )


def forge_row_options(roles: Sequence[int], sigmas: torch.Tensor) -> dict[str, Any]:
    """The per-call entries of Forge's ``transformer_options`` for a call of ``len(roles)`` chunks of
    ``sigmas.shape[0]`` rows (Forge's ``sampling_function``: ``cond_or_uncond``, ``sigmas``, ``cond_mark``
    ``[rows]``, ``cond_indices`` / ``uncond_indices``), which attention patches such as reference-only read."""
    b = int(sigmas.shape[0])
    cond = [i for k, r in enumerate(roles) if r == 0 for i in range(k * b, (k + 1) * b)]
    uncond = [i for k, r in enumerate(roles) if r != 0 for i in range(k * b, (k + 1) * b)]
    return {
        "cond_or_uncond": list(roles),
        "sigmas": sigmas,
        "cond_mark": torch.tensor([float(r) for r in roles for _ in range(b)]).to(sigmas),
        "cond_indices": cond,
        "uncond_indices": uncond,
    }


class ForgeUnetCall:
    """Forge's UNet function wrapper ``fn(apply_model, {"input", "timestep", "c", "cond_or_uncond"})``.

    Forge's ``c`` holds per-row tensors (``c_crossattn``, SDXL ``y``, ``c_concat`` …), other entries and
    ``transformer_options``. The per-row tensors are the engine's ``cond`` (with the rows' roles under
    `ROLE_KEY`, so every UNet call the engine batches gets its own ``cond_or_uncond``); the rest is passed
    to every call as it is, except what depends on the call's rows: the row entries of
    ``transformer_options`` (`forge_row_options`) and a ControlNet's residuals (``control``, made again
    by ``control_model.get_control`` for each call's rows). ``branch_conds[k-1]``: branch k's text from
    Forge's ``get_learned_conditioning`` (``[1, T, D]``, SDXL ``{"crossattn", "vector"}``). ``previous``: a
    function wrapper set before ours (called instead of ``apply_model``). ``x_new``: the latent update of
    the CFG call in progress. If the CLoRA step fails (another extension's patch that cannot follow the
    branch rows), the call and every later one run the host's plain call and ``notice`` says why."""

    def __init__(
        self,
        denoiser: CloraDenoiser,
        branch_conds: Sequence[Any],
        previous: Any = None,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.branch_conds = list(branch_conds)
        self.previous = previous
        self.notice = notice
        self.x_new: torch.Tensor | None = None
        self.disabled: str | None = None

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

    def _stop(self, reason: str) -> None:
        self.disabled = reason
        if self.notice is not None:
            self.notice(reason)

    def plain(self, apply_model: Callable[..., torch.Tensor], args: dict[str, Any]) -> torch.Tensor:
        """The host's own call for ``args`` (the wrapper set before ours, else ``apply_model``)."""
        if self.previous is not None:
            return self.previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def __call__(self, apply_model: Callable[..., torch.Tensor], args: dict[str, Any]) -> torch.Tensor:
        if self.disabled is not None:
            return self.plain(apply_model, args)
        x, t, c = args["input"], args["timestep"], dict(args["c"])
        cou = [int(r) for r in args["cond_or_uncond"]]
        b = x.shape[0] // len(cou)
        topt = c.pop("transformer_options", None)
        if isinstance(topt, dict) and topt.get("block_modifiers"):
            self._stop(
                "CLoRA is off for this image: another extension's UNet block modifier (Forge's reference-only or "
                "tile preprocessor) records the rows of each call, which CLoRA's branch calls would break"
            )
            return self.plain(apply_model, args)
        cond = {k: v for k, v in c.items() if isinstance(v, torch.Tensor) and v.shape[:1] == x.shape[:1]}
        static = {k: v for k, v in c.items() if k not in cond}
        control_model = static.get("control_model") if static.get("control") is not None else None
        cond[ROLE_KEY] = torch.tensor([r for r in cou for _ in range(b)], device=x.device)

        def model(xx: torch.Tensor, ss: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
            kw = {**static, **cond}
            roles = kw.pop(ROLE_KEY)[::b].tolist()
            if topt is not None:
                kw["transformer_options"] = {**topt, **forge_row_options(roles, ss[:b])}
            if control_model is not None:
                unit = control_model
                while unit is not None:  # as Forge's sampling_function does before get_control
                    unit.transformer_options = kw.get("transformer_options", {})
                    unit = getattr(unit, "previous_controlnet", None)
                kw["control"] = control_model.get_control(xx, ss, dict(kw), len(roles))
            call = {"input": xx, "timestep": ss, "c": kw, "cond_or_uncond": roles}
            return self.plain(apply_model, call)

        d = self.denoiser
        d.inner_model = model
        text = self.branch_text(c["c_crossattn"], c.get("y"))
        try:
            out = clora_call(d, model, x, t, cond, chunk_roles(cou, b), branch_text=text)
        except Exception as e:
            import traceback

            traceback.print_exception(type(e), e, e.__traceback__)
            self._stop(
                f"CLoRA stopped at a step another extension's model patch could not follow "
                f"({type(e).__name__}: {e}); the image was finished without CLoRA"
            )
            return self.plain(apply_model, args)
        if d.updated_now:
            self.x_new = d.x_new
        return out


__all__ = [
    "ROLE_KEY",
    "CfgModelCall",
    "ForgeUnetCall",
    "concept_denoiser",
    "forge_input_scale",
    "forge_row_options",
]
