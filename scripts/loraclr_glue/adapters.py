"""Host adapters: where CLoRA plugs into A1111 and Forge sampling. Chosen by capability (`host.is_forge`).

A1111 (`A1111Adapter`): A1111's own ``CFGDenoiser.forward`` runs unchanged (its callbacks, ``AND``
weights, cond/uncond padding and splitting, skip-early-CFG, mask blending, refiner switch, live preview,
interrupts). The adapter wraps only the model call it makes: an instance ``forward`` on the run's
k-diffusion wrapper (``p.sampler.model_wrap_cfg.inner_model``, made fresh for every sampling pass), plus a
forward pre-hook and a forward hook on the CFG denoiser (torch module hooks, per run, removed by
``remove``). The pre-hook records the sampler's ``x`` and, from ``cond.batch``, the rows A1111 batches
(per image one cond row per ``AND`` part, then the uncond rows); each model call consumes its rows in
order (`CfgStep`), so batched, split (``batch_cond_uncond`` off, unequal lengths) and cond-only calls are
all known. `lib_loraclr.clora.clora_call` then runs `CloraDenoiser` / `RegionalDenoiser` on the rows of the
CFG halves (branch 0 = the call's own cond rows, branch k = the same with concept k's prompt, rebuilt from
its schedule at this step; every branch on the call's uncond rows) and returns the fused prediction in
their place; further ``AND`` parts get the host's plain call. The latent update (off by default) runs on
the call with the cond rows; the forward hook writes it into the sampler's ``x`` after the CFG call, where
k-diffusion's one-evaluation samplers step from it. At the refiner switch A1111 builds a new wrapper for
the refiner: CLoRA stops there.

Forge (`ForgeAdapter`): the UNet patcher is cloned (``p.sd_model.forge_objects.unet.clone()``), and
`ForgeFusion` is set as its UNet function wrapper: each UNet call of Forge's sampler runs all branches
at once and returns the mask-fused prediction per row. Forge samples under ``torch.inference_mode``; the
latent update (`forge_latent_update`) runs inside ``torch.inference_mode(False)`` + ``enable_grad`` with
cloned inputs, a router built outside inference mode, and `InferenceWeightClones` (normal clones of the
inference-tensor weights on the gradient path; cloned LayerNorm inputs against Forge's in-place adds);
an instance ``forward`` on the CFG denoiser writes the new latent into the sampler's ``x``. Verified on
real Forge (dfdcbab6, CPU). If autograd still fails, the run goes on masks-only with a ``CLoRA notice``.
Attention is captured by forward hooks on ``attn2.to_q``/``to_k`` of the few lowest-resolution layers,
installed for the duration of each call only, which works identically on both hosts.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from . import engine
from .host import forge_unet

COND, UNCOND = 0, 1
UNET_PREFIX = "model.diffusion_model."


# ------------------------------------------------------------------------------------------ shared pieces


class CompositeRouter:
    """Several `RoutedLoras` (e.g. SDXL's two text encoders) driven as one."""

    def __init__(self, routers: Sequence[Any]) -> None:
        self.routers = list(routers)

    def select(self, branch: int) -> None:
        for r in self.routers:
            r.select(branch)

    def install(self) -> CompositeRouter:
        for r in self.routers:
            r.install()
        return self

    def remove(self) -> None:
        for r in self.routers:
            r.remove()

    def __enter__(self) -> CompositeRouter:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def is_te_key(key: str) -> bool:
    return not key.startswith(UNET_PREFIX)


def routable_te_key(key: str) -> bool:
    """Text-encoder keys that can be routed per branch (not the fused OpenCLIP in_proj :q/:k/:v)."""
    return is_te_key(key) and ":" not in key


def is_unet_key(key: str) -> bool:
    return key.startswith(UNET_PREFIX)


def te_roots(sd_model: Any) -> list[tuple[Any, str]]:
    """``(module, canonical prefix)`` of each text encoder whose keys our LoRAs use.

    A1111 wraps the encoders (``.wrapped``): SD1/SD2 ``cond_stage_model.wrapped`` ↔ ``cond_stage_model.``;
    SDXL ``conditioner.embedders[i].wrapped`` ↔ ``conditioner.embedders.i.``. Forge: the first
    transformers ``CLIPTextModel`` (one with ``text_model``) under ``forge_objects.clip`` ↔ the canonical
    ``….transformer.`` prefix of the model family.
    """
    unet = forge_unet(sd_model)
    if unet is not None:
        clip = getattr(getattr(sd_model, "forge_objects", None), "clip", None)
        root = getattr(clip, "cond_stage_model", None)
        if root is None:
            return []
        for _name, m in root.named_modules():
            if hasattr(m, "text_model"):
                prefix = (
                    "conditioner.embedders.0.transformer."
                    if getattr(sd_model, "is_sdxl", False)
                    else "cond_stage_model.transformer."
                )
                return [(m, prefix)]
        return []
    out: list[tuple[Any, str]] = []
    embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", None)
    if embedders is not None:
        for i, e in enumerate(embedders):
            out.append((getattr(e, "wrapped", e), f"conditioner.embedders.{i}."))
        return out
    cm = getattr(sd_model, "cond_stage_model", None)
    if cm is not None:
        out.append((getattr(cm, "wrapped", cm), "cond_stage_model."))
    return out


def te_router(sd_model: Any, specs: Sequence[Any]) -> CompositeRouter | None:
    """Per-branch text-encoder LoRA hooks (branch 0 = no LoRA); None when no LoRA has TE parts."""
    branches: list[list[tuple[Any, float]]] = [[]] + [[(s.deltas, s.te_weight)] for s in specs]
    routers = []
    for module, prefix in te_roots(sd_model):
        r = engine.routed_loras(module, branches, prefix=prefix, key_filter=routable_te_key)
        if r.n_modules:
            routers.append(r)
    return CompositeRouter(routers) if routers else None


def unet_router(unet: Any, specs: Sequence[Any]) -> Any:
    branches: list[list[tuple[Any, float]]] = [[]] + [[(s.deltas, s.unet_weight)] for s in specs]
    return engine.routed_loras(unet, branches, prefix=UNET_PREFIX, key_filter=is_unet_key)


def freeze_parameters(module: Any) -> list[Any]:
    """Set ``requires_grad=False`` on every parameter of ``module`` that had it; returns those (for `unfreeze`).

    The latent update differentiates only with respect to the latent. A1111's weights keep
    ``requires_grad=True``, and its built-in Lora patches them in place (``weight.copy_`` /
    ``weight +=``) lazily inside the first forward of each layer, which autograd refuses on a leaf that
    requires grad once the forward runs under ``enable_grad`` ("a leaf Variable that requires grad is
    being used in an in-place operation", seen in A1111 1.10.1). Frozen weights also spare autograd
    from tracking ~860 M parameters."""
    frozen = [q for q in module.parameters() if q.requires_grad]
    for q in frozen:
        q.requires_grad_(False)
    return frozen


def unfreeze(params: Sequence[Any]) -> None:
    for q in params:
        q.requires_grad_(True)


def has_te_parts(specs: Sequence[Any]) -> bool:
    return any(any(is_te_key(k) for k in getattr(s.deltas, "modules", {})) for s in specs)


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


class CfgStep:
    """What the run's CFG denoiser is doing in the call in progress (recorded by a forward pre-hook): the
    sampler's ``x`` (where a latent update is written), the prompt schedules' step, and the roles of the
    rows of the batch it builds — per image one cond row per ``AND`` part, then one uncond row per image
    (A1111 1.10's ``CFGDenoiser.forward``). Its model calls consume the rows in order (`take`)."""

    def __init__(self, x: torch.Tensor, step: int, repeats: Sequence[int]) -> None:
        from lib_loraclr.clora import OTHER

        self.x = x
        self.step = step
        self.roles: list[tuple[int, int]] = []
        for i, n in enumerate(repeats):
            self.roles += [(COND, i)] + [(OTHER, i)] * (n - 1)  # CLoRA fuses each image's first AND part
        self.roles += [(UNCOND, i) for i in range(len(repeats))]
        self.offset = 0
        self.x_new: torch.Tensor | None = None

    def take(self, n: int) -> list[tuple[int, int]] | None:
        """Roles of the next ``n`` rows; None when the calls do not add up to the batch."""
        a, self.offset = self.offset, self.offset + n
        return self.roles[a : self.offset] if self.offset <= len(self.roles) else None


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
        options = engine.clora_options(run.args, steps)
        if masks_only:
            options = replace(options, masks_only=True)
        tokenize = engine.host_tokenize_line(sd_model)
        bp = engine.branch_prompts(
            base, [(s.trigger, s.words) for s in specs], engine.token_positions_from(tokenize)
        )
        router_te = te_router(sd_model, specs)

        def encode(prompts: list[str]) -> Any:
            conds = h.prompt_parser.SdConditioning(prompts, width=p.width, height=p.height)
            with h.devices.autocast():
                return h.prompt_parser.get_learned_conditioning(sd_model, conds, steps)

        schedules = engine.te_branch_conds(encode, [[q] for q in bp.prompts[1:]], router_te)
        layout = engine.user_layout(run.args, len(specs), (int(p.height) // 8, int(p.width) // 8))
        wrap = cfg.inner_model  # the k-diffusion wrapper (CompVisDenoiser …) the CFG denoiser calls
        original = wrap.forward  # its forward as it is now (the class's, or another extension's)

        def model(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
            return original(x, sigma, cond=cond)

        denoiser = engine.clora_denoiser(
            inner_model=model,
            unet=unet,
            conds=[None] * bp.n_branches,
            groups=bp.groups,
            mask_tokens=bp.mask_tokens,
            options=options,
            router=unet_router(unet, specs),
            layout=layout,
            background_tokens=bp.background_tokens,
            input_scale=engine.input_scale_of(wrap),
        )
        if run.args.mode == "routed" and not masks_only:
            denoiser = engine.regional_denoiser(denoiser, layout)

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
        from lib_loraclr.clora import clora_call

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


class ForgeFusion:
    """Forge UNet function wrapper ``fn(apply_model, {"input", "timestep", "c", "cond_or_uncond"})``:
    every chunk (cond / uncond, B rows each) runs for every branch in one call per token length, with
    per-row LoRA routing; masks from the cond chunk's attention; returns the fused ``[R, C, H, W]``.

    ``branch_conds[k]`` (k ≥ 1): branch k's conditioning from Forge's ``get_learned_conditioning``
    (a ``[1|B, T, D]`` tensor, or SDXL ``{"crossattn", "vector"}``). ``previous``: a function wrapper
    that was set before ours (called instead of ``apply_model``).

    TODO(D): this per-UNet-call masks-only fusion is engine logic (pure torch) and belongs in
    ``lib_loraclr.clora`` as a public API; it lives here until the engine exposes one.
    """

    def __init__(
        self,
        unet: Any,
        router: Any,
        capture: Any,
        groups: Any,
        mask_tokens: Sequence[Sequence[int]],
        branch_conds: Sequence[Any],
        options: Any,
        previous: Callable[..., Any] | None = None,
        input_scale: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        layout: torch.Tensor | None = None,
        background_tokens: Sequence[int] = (),
    ) -> None:
        from lib_loraclr.clora.masks import MaskEstimator

        self.unet = unet
        self.router = router
        self.capture = capture
        self.groups = groups
        self.mask_tokens = [list(t) for t in mask_tokens]
        self.branch_conds = list(branch_conds)
        self.n_branches = len(self.branch_conds) + 1
        self.options = options
        self.masks = MaskEstimator(options, groups, mask_tokens, layout, background_tokens)
        self.previous = previous
        self.last_weights: torch.Tensor | None = None
        # latent update (see `forge_latent_update`): on only when the adapter can write x back
        self.input_scale = input_scale  # c_in(σ, x) of Forge's predictor; None = no latent update
        self.grad_router: Any = (
            None  # a router built outside inference mode (its cached factors are normal tensors)
        )
        self.fallback_reason: str | None = None
        self.x_new: torch.Tensor | None = None  # updated latent of the current step (sampler writes it back)
        self.history: list[dict[str, float]] = []
        self.step = -1
        self._last_sigma: float | None = None
        self._updated_step = -1

    def _advance(self, sigma: torch.Tensor) -> int:
        """Sampler step from the σ sequence (a larger σ than the last starts a new run); a new σ drops
        the previous step's updated latent."""
        s = float(sigma.flatten()[0])
        if self._last_sigma is None or s > self._last_sigma:
            self.step, self._updated_step, self.x_new = 0, -1, None
            self.history.clear()
            self.masks.reset()
        elif s < self._last_sigma:
            self.step += 1
            self.x_new = None
        self._last_sigma = s
        return self.step

    def take_update(self) -> torch.Tensor | None:
        """The updated latent of the call that just ended (None when none), for the sampler's ``x``."""
        x_new, self.x_new = self.x_new, None
        return x_new

    def _branch_c(self, k: int, ref: torch.Tensor, ref_y: Any) -> tuple[torch.Tensor, Any]:
        c = self.branch_conds[k - 1]
        y = ref_y
        if isinstance(c, dict):
            y = c.get("vector", ref_y)
            c = c["crossattn"]
        b = ref.shape[0]
        c = c.to(device=ref.device, dtype=ref.dtype)
        if c.shape[0] != b:
            c = c[:1].expand(b, *c.shape[1:])
        if isinstance(y, torch.Tensor) and isinstance(ref_y, torch.Tensor):
            y = y.to(device=ref_y.device, dtype=ref_y.dtype)
            if y.shape[0] != b:
                y = y[:1].expand(b, *y.shape[1:])
        return c, y

    def __call__(self, apply_model: Callable[..., torch.Tensor], args: dict[str, Any]) -> torch.Tensor:
        from lib_loraclr.clora import fuse, fusion_weights
        from lib_loraclr.clora.attention import map_hw

        x, t, c, cou = args["input"], args["timestep"], dict(args["c"]), list(args["cond_or_uncond"])
        n = len(cou)
        b = x.shape[0] // n
        kk = self.n_branches
        xs, ts = x.chunk(n), t.chunk(n)
        cross = c.pop("c_crossattn")
        crosses = cross.chunk(n)
        y = c.pop("y", None)
        ys = y.chunk(n) if isinstance(y, torch.Tensor) else [None] * n
        topt = c.pop("transformer_options", None)
        per_row = {
            k: v.chunk(n) for k, v in c.items() if isinstance(v, torch.Tensor) and v.shape[:1] == x.shape[:1]
        }
        static = {k: v for k, v in c.items() if k not in per_row}

        block_c: dict[tuple[int, int], tuple[torch.Tensor, Any]] = {}
        for j in range(n):
            for k in range(kk):
                if cou[j] == COND and k > 0:
                    block_c[(j, k)] = self._branch_c(k, crosses[j], ys[j])
                else:
                    block_c[(j, k)] = (crosses[j], ys[j])
        by_len: dict[int, list[tuple[int, int]]] = {}
        for blk, (cc, _) in block_c.items():
            by_len.setdefault(int(cc.shape[1]), []).append(blk)

        def call(xx: torch.Tensor, tt: torch.Tensor, **cc: Any) -> torch.Tensor:
            if self.previous is not None:
                rows = cc.get("transformer_options", {}).get("cond_or_uncond", cou)
                return self.previous(
                    apply_model, {"input": xx, "timestep": tt, "c": cc, "cond_or_uncond": rows}
                )
            return apply_model(xx, tt, **cc)

        def kwargs_for(blocks: list[tuple[int, int]]) -> dict[str, Any]:
            kw: dict[str, Any] = dict(static)
            kw["c_crossattn"] = torch.cat([block_c[blk][0] for blk in blocks])
            if ys[0] is not None:
                kw["y"] = torch.cat([block_c[blk][1] for blk in blocks])
            for name, chunks in per_row.items():
                kw[name] = torch.cat([chunks[j] for j, _ in blocks])
            if topt is not None:
                kw["transformer_options"] = {**topt, "cond_or_uncond": [cou[j] for j, _ in blocks]}
            return kw

        cond_chunks = [j for j in range(n) if cou[j] == COND]
        if cond_chunks:
            self._advance(ts[cond_chunks[0]])
        if cond_chunks and self.input_scale is not None and self.fallback_reason is None:
            j0 = cond_chunks[0]
            step = self.step
            n_upd = self.options.updates_at(step) if kk > 1 and len(self.groups) > 1 else 0
            if n_upd and step != self._updated_step:
                self._updated_step = step
                self.x_new = forge_latent_update(self, call, kwargs_for, xs[j0], ts[j0], j0, n_upd, step)
            if self.x_new is not None and self._last_sigma is not None:
                # every chunk of this step (cond, uncond, a later split call) runs at the updated latent
                xs = tuple(self.x_new.to(xj) if xj.shape == self.x_new.shape else xj for xj in xs)

        outs: dict[tuple[int, int], torch.Tensor] = {}
        maps: dict[tuple[int, int], torch.Tensor] = {}
        fixed = self.masks.fixed(b, x.device)
        self.router.install()
        if self.capture is not None:
            self.capture.install()
        try:
            for blocks in by_len.values():
                kw = kwargs_for(blocks)
                self.router.set_rows([k for _, k in blocks for _ in range(b)])
                want_maps = (
                    fixed is None and self.capture is not None and any(cou[j] == COND for j, _ in blocks)
                )
                if self.capture is not None:
                    self.capture.reset()
                    self.capture.latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
                    self.capture.enabled = want_maps
                out = call(torch.cat([xs[j] for j, _ in blocks]), torch.cat([ts[j] for j, _ in blocks]), **kw)
                m = self.capture.maps() if want_maps else None
                for i, blk in enumerate(blocks):
                    outs[blk] = out[i * b : (i + 1) * b]
                    if m is not None:
                        maps[blk] = m[i * b : (i + 1) * b]
        finally:
            if self.capture is not None:
                self.capture.remove()
            self.router.remove()

        if fixed is not None:
            self.last_weights = fusion_weights(fixed, (x.shape[-2], x.shape[-1]))
        elif cond_chunks and all((cond_chunks[0], k) in maps for k in range(kk)):
            j = cond_chunks[0]
            bm = torch.stack([maps[(j, k)] for k in range(kk)], dim=1)  # [B, K, N, T]
            hw = map_hw(bm.shape[2], x.shape[-2], x.shape[-1])
            masks = self.masks.from_maps(bm, self.step, hw)
            self.last_weights = fusion_weights(masks, (x.shape[-2], x.shape[-1]))
        fused = []
        for j in range(n):
            stack = torch.stack([outs[(j, k)] for k in range(kk)], dim=1)
            if self.last_weights is None or self.last_weights.shape[0] != b:
                fused.append(stack[:, 0])
            else:
                fused.append(fuse(stack, self.last_weights.to(stack.device)))
        return torch.cat(fused)


class InferenceWeightClones:
    """While active, every parameter of ``root`` that is an inference tensor (Forge loads and LoRA-patches
    its weights under ``torch.inference_mode``) is replaced, lazily on its module's first forward, by a
    normal clone, so that autograd can save it for backward; on exit the original ``Parameter`` objects
    are put back (never written: bit-for-bit the same). Only the modules the gradient pass runs are
    cloned (with `StopForward`: the down path up to the capture layers).

    Also gives every ``LayerNorm`` a cloned input: Forge's transformer block adds in place
    (``x += attn1(norm1(x))``) to the tensor its norm saved for backward, which autograd refuses."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self._saved: list[tuple[Any, str, Any]] = []
        self._handles: list[Any] = []
        self.n_cloned = 0

    def _swap(self, module: Any, _inputs: Any) -> None:
        for name, prm in list(module._parameters.items()):
            if prm is not None and torch.is_inference(prm):
                module._parameters[name] = torch.nn.Parameter(prm.detach().clone(), requires_grad=False)
                self._saved.append((module, name, prm))
                self.n_cloned += prm.numel()

    @staticmethod
    def _clone_inputs(_module: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.clone() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in inputs)

    def __enter__(self) -> InferenceWeightClones:
        try:
            for m in self.root.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    self._handles.append(m.register_forward_pre_hook(self._clone_inputs))
                if any(p is not None and torch.is_inference(p) for p in m._parameters.values()):
                    self._handles.append(m.register_forward_pre_hook(self._swap))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, name, prm in reversed(self._saved):
            module._parameters[name] = prm
        self._saved.clear()


def forge_latent_update(
    fusion: ForgeFusion,
    call: Callable[..., Any],
    kwargs_for: Callable[..., dict[str, Any]],
    x: torch.Tensor,
    sigma: torch.Tensor,
    j: int,
    n_updates: int,
    step: int,
) -> torch.Tensor | None:
    """CLoRA's latent update for Forge: ``n_updates`` gradient steps ``x ← x − s/c_in²·∇ₓL`` on chunk ``j``
    (the cond rows, every branch in one call), run under ``torch.inference_mode(False)`` + ``enable_grad``
    with cloned inputs and `InferenceWeightClones`. Returns the new latent, or None after setting
    ``fusion.fallback_reason`` when autograd cannot run (then the run goes on masks-only)."""
    from lib_loraclr.clora import clora_loss
    from lib_loraclr.clora.attention import StopForward

    opts, kk, capture = fusion.options, fusion.n_branches, fusion.capture
    router = fusion.grad_router if fusion.grad_router is not None else fusion.router
    blocks = [(j, k) for k in range(kk)]
    b = x.shape[0]
    try:
        with torch.inference_mode(False), torch.enable_grad(), InferenceWeightClones(fusion.unet):
            xv = x.detach().clone()
            sig = sigma.detach().clone()
            c_in = fusion.input_scale(sig, xv).detach().clone()  # type: ignore[misc]
            scale = opts.step_size / c_in**2
            by_len: dict[int, list[tuple[int, int]]] = {}
            for blk in blocks:
                by_len.setdefault(int(kwargs_for([blk])["c_crossattn"].shape[1]), []).append(blk)
            for it in range(n_updates):
                xv.requires_grad_(True)
                maps: dict[tuple[int, int], torch.Tensor] = {}
                router.install()
                capture.install()
                try:
                    for group in by_len.values():
                        kw = {
                            k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                            for k, v in kwargs_for(group).items()
                        }
                        router.set_rows([k for _, k in group for _ in range(b)])
                        capture.reset()
                        capture.latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
                        capture.enabled = True
                        capture.stop_after_last = bool(opts.stop_early)
                        with contextlib.suppress(StopForward):
                            call(torch.cat([xv] * len(group)), torch.cat([sig] * len(group)), **kw)
                        m = capture.maps()
                        for i, blk in enumerate(group):
                            maps[blk] = m[i * b : (i + 1) * b]
                finally:
                    capture.stop_after_last = False
                    capture.remove()
                    router.remove()
                loss = clora_loss(torch.stack([maps[blk] for blk in blocks], dim=1), fusion.groups, opts.tau)
                if not loss.requires_grad:
                    fusion.fallback_reason = "the attention maps carry no gradient on this Forge build"
                    return None
                (grad,) = torch.autograd.grad(loss, xv)
                fusion.history.append({"step": float(step), "iter": float(it), "loss": float(loss)})
                xv = (xv - scale * grad).detach()
            return xv
    except (RuntimeError, TypeError, ValueError) as e:
        fusion.fallback_reason = (
            f"Forge: no latent gradient ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        )
        return None


def forge_input_scale(kmodel: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``c_in(σ, x)`` ``[B, 1, 1, 1]`` of Forge's ``KModel.predictor`` (``calculate_input`` on ones), else VP."""
    predictor = getattr(kmodel, "predictor", None)
    if callable(getattr(predictor, "calculate_input", None)):
        return lambda sigma, x: predictor.calculate_input(sigma, torch.ones_like(x[:, :1, :1, :1]))
    return lambda sigma, x: (sigma.reshape(-1, 1, 1, 1) ** 2 + 1.0) ** -0.5


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
    ) -> Any:
        sd_model = p.sd_model
        original = sd_model.forge_objects.unet
        patcher = original.clone()
        unet = patcher.model.diffusion_model
        options = engine.clora_options(run.args, int(getattr(p, "steps", 20)))
        cfg = cfg if cfg is not None else getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
        wants_update = not (masks_only or options.masks_only) and options.latent_update
        if wants_update and not callable(getattr(cfg, "forward", None)):
            run.notice("Forge: no sampler to write the latent update into: CLoRA runs masks-only here")
            wants_update = False
        if not wants_update:
            options = replace(options, masks_only=True)
        tokenize = engine.host_tokenize_line(sd_model)
        bp = engine.branch_prompts(
            base, [(s.trigger, s.words) for s in specs], engine.token_positions_from(tokenize)
        )
        router_te = te_router(sd_model, specs)
        if router_te is None and has_te_parts(specs):
            run.notice(
                "CLoRA could not find Forge's text encoder: the LoRAs' text-encoder parts are not used"
            )
        branch_conds = engine.te_branch_conds(
            lambda q: sd_model.get_learned_conditioning(q), [[q] for q in bp.prompts[1:]], router_te
        )
        previous = (
            patcher.model_options.get("model_function_wrapper") if hasattr(patcher, "model_options") else None
        )
        if run.args.mode == "routed":
            run.notice("Forge: the routed mode is not available here yet; CLoRA runs branch fusion")
        latent_hw = (int(getattr(p, "height", 512)) // 8, int(getattr(p, "width", 512)) // 8)
        fusion = ForgeFusion(
            unet,
            unet_router(unet, specs),
            engine.attention_capture(unet),
            bp.groups,
            bp.mask_tokens,
            branch_conds,
            options,
            previous=previous,
            input_scale=forge_input_scale(patcher.model) if wants_update else None,
            layout=engine.user_layout(run.args, len(specs), latent_hw),
            background_tokens=bp.background_tokens,
        )
        patcher.set_model_unet_function_wrapper(fusion)
        sd_model.forge_objects.unet = patcher
        self._original_unet, self._patched_unet, self._model = original, patcher, sd_model
        if wants_update:
            with torch.inference_mode(False):  # Forge calls us under inference_mode: build normal tensors
                fusion.grad_router = unet_router(unet, specs)
            self._wrap_cfg(cfg, fusion, run)
        return fusion

    def _wrap_cfg(self, cfg: Any, fusion: ForgeFusion, run: Any) -> None:
        """An instance ``forward`` on Forge's CFG denoiser: after each call, the latent update that the
        function wrapper computed is written into the sampler's own ``x`` (k-diffusion's one-evaluation
        samplers step from that tensor after the call, and the prediction returned was made at it)."""
        original = cfg.__dict__.get("forward")
        bound = cfg.forward

        def forward(x, sigma, *args, **kwargs):
            if fusion.input_scale is not None and (
                getattr(cfg, "mask", None) is not None or getattr(cfg, "classic_ddim_eps_estimation", False)
            ):
                fusion.input_scale = None
                run.notice(
                    "Forge: no latent update with an inpainting mask or classic DDIM: CLoRA runs masks-only"
                )
            out = bound(x, sigma, *args, **kwargs)
            x_new = fusion.take_update()
            if fusion.fallback_reason:
                run.notice(f"{fusion.fallback_reason}; CLoRA runs masks-only")
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


def pick_adapter(p: Any) -> A1111Adapter | ForgeAdapter:
    """Forge adapter when the model has Forge's UNet patcher (capability), else A1111's."""
    return ForgeAdapter() if forge_unet(getattr(p, "sd_model", None)) is not None else A1111Adapter()
