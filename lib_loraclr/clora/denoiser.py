"""The CLoRA step as a denoiser wrapper for k-diffusion samplers (σ-space), batched over branches.

`CloraDenoiser` replaces the WebUI's CFG denoiser: ``denoiser(x, sigma, cond=…, uncond=…, cond_scale=…)``
→ guided denoised latents ``[B, C, H, W]`` (protocol of `lib_loraclr.models.sampling`). Per call:

1. rows: for every CFG half (cond first, then uncond — the WebUI's order) and branch k, the B images;
   ALL rows go through ONE UNet call (``inner_model``, e.g. k-diffusion's ``CompVisDenoiser``) with
   per-row LoRA routing (`RoutedLoras.set_rows`). Conditionings of different token lengths are split
   into one call per length, as the WebUI does for cond/uncond.
2. latent update (steps chosen by `CloraOptions`): a gradient pass on the rows the loss needs (cond
   only, or both halves) that stops right after the last capture layer (`StopForward`), loss
   `clora_loss`, ``x ← x − s·(1+σ²)·∇ₓL`` (see below), repeated at refinement steps.
3. a FRESH full forward at the updated latent (no graph), capturing the maps for the masks — the
   official code steps with a prediction from before its last update.
4. masks from the final maps (`concept_masks`), fusion of each half's denoised outputs, then CFG.
   With ``options.base_uncond`` = 1 (recommended) the unconditional half is branch 0's everywhere (the
   base model without LoRA), so CFG guides from the bare base model toward each region's LoRA and the
   concept branches' unconditional rows are not run; between 0 and 1 the two are blended.

Step size. The official pipeline updates the DDIM latent ``z_t = √ᾱ·x0 + √(1−ᾱ)·ε`` by
``z ← z − s·∇_z L`` (s = 20). k-diffusion's latent is ``x = z/√ᾱ = z·√(1+σ²)`` (σ² = (1−ᾱ)/ᾱ) and the
UNet sees ``c_in·x = z`` with ``c_in = 1/√(1+σ²)``. Then ``∇_x L = c_in·∇_z L`` and the same move
in x is ``x ← x − (s/c_in²)·∇_x L = x − s·(1+σ²)·∇_x L``. ``c_in`` is read from
``inner_model.get_scalings(σ)`` (last element), so v-prediction wrappers work too; pass
``input_scale`` for other wrappers (DDIM in timestep space: ``lambda t: 1``). DDIM η = 0 in σ-space
(how `lib_loraclr.models.sampling` runs it) is Euler, so the same mapping reproduces the official DDIM update.

The updated latent reaches the sampler IN PLACE: the wrapper writes ``x_new`` into the ``x`` tensor it
was given (``x.copy_``) and returns the fresh prediction ``D(x_new)``. k-diffusion's one-evaluation
samplers (Euler, Euler a, DPM++ 2M, LMS, DDIM-as-Euler) compute their next state from that same ``x``
after the call, so the step is exactly a step from ``x_new`` (returning a corrected ``D`` instead
would need the sampler's step coefficients). Two-evaluation samplers (Heun, DPM2) call at a new σ
for their corrector; the wrapper counts a step whenever σ decreases, so there the update lands on
the corrector's temporary latent — use one-evaluation samplers for the latent update.

Steps are counted from the σ sequence (a call with a larger σ than the last starts a new sampling run).
Batch size > 1: every image has its own branches; token groups are shared by the batch.
Without autograd (``torch.inference_mode``) the update is skipped (`fallback_reason` says why), unless the
host gives an ``update_scope`` (Forge: `lib_loraclr.clora.autograd.inference_mode_grad`): then the gradient
pass runs inside it on clones of its inputs (and with ``grad_router``, a router built outside inference mode),
and an error there ends the updates of the run (masks-only, `fallback_reason`) instead of the sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from .attention import AttentionCapture, StopForward, localizing_layers, map_hw
from .conds import batch_size, cat_conds, token_length
from .errors import ConditioningMismatchError
from .loss import clora_loss
from .masks import MaskEstimator, fuse, fusion_weights
from .options import CloraOptions
from .routing import RoutedLoras

COND, UNCOND = 0, 1


def default_input_scale(inner_model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``c_in(σ)`` of a k-diffusion wrapper (``get_scalings(σ)[-1]``), else the VP ``1/√(1+σ²)``."""
    get = getattr(inner_model, "get_scalings", None)
    if callable(get):
        return lambda sigma: get(sigma)[-1]
    return lambda sigma: (sigma**2 + 1.0) ** -0.5


def _expand(cond: Any, b: int) -> Any:
    """Repeat a batch-1 conditioning to ``b`` rows (recursively)."""
    if isinstance(cond, torch.Tensor):
        return cond if cond.shape[0] == b else cond.expand(b, *cond.shape[1:]).contiguous()
    if isinstance(cond, dict):
        return {k: _expand(v, b) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_expand(v, b) for v in cond)
    return cond


def cond_table(
    conds: Sequence[Any], unconds: Sequence[Any], b: int, cond: Any, uncond: Any, halves: Sequence[int]
) -> dict[tuple[int, int], Any]:
    """``{(half, branch): conditioning of B rows}``; a ``None`` branch entry takes the call's own cond/uncond."""
    table: dict[tuple[int, int], Any] = {}
    for k in range(len(conds)):
        if COND in halves:
            c = conds[k] if conds[k] is not None else cond
            if c is None:
                raise ConditioningMismatchError(f"branch {k} has no conditioning")
            table[(COND, k)] = _expand(c, b)
        if UNCOND in halves:
            u = unconds[k] if unconds[k] is not None else uncond
            if u is None:
                raise ConditioningMismatchError(f"branch {k} has no negative conditioning")
            table[(UNCOND, k)] = _expand(u, b)
    for key, c in table.items():
        if batch_size(c) != b:
            raise ConditioningMismatchError(f"conditioning {key} has batch {batch_size(c)}, the latent {b}")
    return table


def guided(x: torch.Tensor, fused: dict[int, torch.Tensor], cond_scale: float, denoiser: Any) -> torch.Tensor:
    """CFG over `CloraDenoiser.predict`'s halves (``uncond + (cond − uncond)·scale``, or the cond half alone);
    writes the latent update of this call (``denoiser.x_new``) into ``x``, where k-diffusion's samplers
    step from it."""
    if getattr(denoiser, "updated_now", False) and denoiser.x_new is not None:
        with torch.no_grad():
            x.copy_(denoiser.x_new)
    if UNCOND not in fused:
        return fused[COND]
    return fused[UNCOND] + (fused[COND] - fused[UNCOND]) * cond_scale


class CloraDenoiser:
    """CLoRA denoiser wrapper (see the module docstring).

    Args:
        inner_model: ``inner_model(x, sigma, cond=c) -> denoised`` (k-diffusion ``CompVisDenoiser``).
        unet: the UNet module inside it (hooks for the attention capture).
        conds: per branch, its conditioning for the B images (batch 1 is broadcast); ``None`` for a
            branch = the ``cond`` passed to each call (the host's own prompt: convenient for branch 0).
        unconds: per branch, the negative conditioning (``None`` entries = the call's ``uncond``); None =
            use the call's ``uncond`` for every branch.
        groups: ``groups[g][b]`` token positions of concept g in branch b (`branch_prompts`).
        mask_tokens: ``mask_tokens[b]`` = branch b's own concept tokens (empty for branch 0).
        options: `CloraOptions`.
        router: `RoutedLoras` on the UNet with one entry per branch (None = no LoRA anywhere).
        capture_layers: ``attn2`` names relative to ``unet`` (default: `localizing_layers`, the layers
            next to the bottleneck, of possibly several resolutions).
        input_scale: ``c_in(σ)``; default from ``inner_model.get_scalings``.
        background_tokens: base-prompt positions of the other content words (`BranchPrompts.background_tokens`),
            which claim positions for branch 0 in the layout rule.
        layout: a fixed layout instead of attention masks: ``[B or 1, K, h, w]`` 0/1 (column 0 =
            background, `lib_loraclr.clora.layout.layout_weights`), any ``h × w`` (nearest-resized).
        update_scope: a context the latent update's gradient pass runs in, for hosts that sample under
            ``torch.inference_mode`` (`lib_loraclr.clora.autograd.inference_mode_grad`); see the module
            docstring. ``grad_router``: the router of that pass (default ``router``).

    The UNet calls batch the CFG halves in the order ``predict`` is given them (the host's row order).

    Hooks (routing and capture) are installed at the start of every call and removed at its end,
    also when the call raises, so nothing stays hooked between calls.
    Diagnostics: ``history`` (one dict per gradient pass: step, iter, loss), ``step_log`` (per step:
    loss of the maps the masks used), ``last_weights`` ``[B, K, 1, H, W]``.
    """

    def __init__(
        self,
        inner_model: Callable[..., torch.Tensor],
        unet: nn.Module,
        conds: Sequence[Any],
        groups: Sequence[Sequence[Sequence[int]]],
        mask_tokens: Sequence[Sequence[int]],
        options: CloraOptions | None = None,
        unconds: Sequence[Any] | None = None,
        router: RoutedLoras | None = None,
        capture_layers: Sequence[str] | None = None,
        input_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
        layout: torch.Tensor | None = None,
        background_tokens: Sequence[int] = (),
        update_scope: Callable[[], AbstractContextManager[Any]] | None = None,
        grad_router: RoutedLoras | None = None,
    ) -> None:
        self.inner_model = inner_model
        self.unet = unet
        self.conds = list(conds)
        self.n_branches = len(self.conds)
        if self.n_branches < 1:
            raise ValueError("CLoRA needs at least one branch")
        self.unconds = list(unconds) if unconds is not None else [None] * self.n_branches
        if len(self.unconds) != self.n_branches:
            raise ValueError(f"{len(self.unconds)} negative conditionings for {self.n_branches} branches")
        self.groups = [[list(t) for t in g] for g in groups]
        for g in self.groups:
            if len(g) != self.n_branches:
                raise ValueError(f"a token group has {len(g)} entries for {self.n_branches} branches")
        self.mask_tokens = [list(t) for t in mask_tokens]
        self.options = options or CloraOptions()
        if router is not None and router.n_branches != self.n_branches:
            raise ValueError(
                f"the router has {router.n_branches} branches, the conditionings {self.n_branches}"
            )
        self.router = router
        if layout is not None and layout.shape[1] != self.n_branches:
            raise ValueError(f"the layout has {layout.shape[1]} columns for {self.n_branches} branches")
        self.masks = MaskEstimator(self.options, self.groups, self.mask_tokens, layout, background_tokens)
        if self.n_branches > 1:
            layers = list(capture_layers) if capture_layers is not None else localizing_layers(unet)
            self.capture: AttentionCapture | None = AttentionCapture(unet, layers)
        else:
            self.capture = None
        self.input_scale = input_scale or default_input_scale(inner_model)
        self.update_scope = update_scope
        self.grad_router = grad_router
        self._router_now = router  # the router `_hooks` installed (rows are set on it per UNet call)
        self.history: list[dict[str, float]] = []
        self.step_log: dict[int, dict[str, float]] = {}
        self.last_weights: torch.Tensor | None = None
        self.fallback_reason: str | None = None
        self._updates_failed = False  # a failed gradient pass ends the updates of this denoiser (masks-only)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the step counter (a new sampling run)."""
        self.step = -1
        self._last_sigma: float | None = None
        self._updated_step = -1
        self.x_new: torch.Tensor | None = None
        self.updated_now = False
        self.masks.reset()

    def _advance(self, sigma: torch.Tensor) -> int:
        s = float(sigma.flatten()[0])
        if self._last_sigma is None or s > self._last_sigma:
            self.step = 0
            self._updated_step = -1
            self.x_new = None
            self.masks.reset()
            self.history.clear()
            self.step_log.clear()
        elif s < self._last_sigma:
            self.step += 1
            self.x_new = None
        self._last_sigma = s
        return self.step

    @property
    def can_update(self) -> bool:
        return self.n_branches > 1 and len(self.groups) > 1

    # ------------------------------------------------------------------ main entry
    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Any = None,
        uncond: Any = None,
        cond_scale: float = 1.0,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The k-diffusion denoiser protocol: the guided prediction; an updated latent is written into ``x``."""
        use_cfg = cond_scale != 1.0 and (uncond is not None or all(u is not None for u in self.unconds))
        fused = self.predict(x, sigma, cond, uncond, (COND, UNCOND) if use_cfg else (COND,))
        return guided(x, fused, cond_scale, self)

    def predict(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Any = None,
        uncond: Any = None,
        halves: Sequence[int] = (COND,),
    ) -> dict[int, torch.Tensor]:
        """The fused prediction ``[B, C, H, W]`` of each CFG half in ``halves`` (no guidance): what a host's
        model call returns for those rows. ``x`` is not written: an updated latent is ``x_new`` (with
        ``updated_now`` True on the call that made it); later calls at the same σ without the cond half
        (a host that calls cond and uncond separately) run at it and reuse the step's masks."""
        halves = tuple(dict.fromkeys(h for h in halves if h in (COND, UNCOND)))
        if not halves:
            raise ValueError("predict needs at least one CFG half")
        step = self._advance(sigma)
        self.updated_now = False
        table = self._cond_table(x.shape[0], cond, uncond, halves)
        opts = self.options
        if COND in halves:
            n_updates = opts.updates_at(step) if self.can_update and opts.enabled else 0
            if n_updates and step != self._updated_step and not self._updates_failed:
                self._updated_step = step
                x_new = self._update(x, sigma, table, halves, n_updates, step)
                if x_new is not None:
                    x = self.x_new = x_new
                    self.updated_now = True
        elif self.x_new is not None and self.x_new.shape == x.shape:
            x = self.x_new.to(device=x.device, dtype=x.dtype)
        run_branches = range(self.n_branches) if opts.enabled else range(1)
        lam = opts.base_uncond_weight(self.n_branches)
        # at base_uncond = 1 every concept region's unconditional half is branch 0's: not computed
        blocks = [(h, k) for h in halves for k in run_branches if not (h == UNCOND and k > 0 and lam >= 1.0)]
        fixed = self.masks.fixed(x.shape[0], x.device)
        want_maps = self.capture is not None and opts.enabled and fixed is None and COND in halves
        with torch.no_grad(), self._hooks(self.router):
            outs, maps = self._run(x, sigma, table, blocks, want_output=True, want_maps=want_maps)
        assert outs is not None
        fused: dict[int, torch.Tensor] = {}
        per_half = {
            h: torch.stack([outs.get((h, k), outs[(h, 0)]) for k in run_branches], dim=1) for h in halves
        }
        if UNCOND in per_half and 0.0 < lam < 1.0:
            u = per_half[UNCOND]
            per_half[UNCOND] = torch.cat([u[:, :1], u[:, 1:] + lam * (u[:, :1] - u[:, 1:])], dim=1)
        weights: torch.Tensor | None = None
        if opts.enabled and self.n_branches > 1:
            hw = (x.shape[-2], x.shape[-1])
            if fixed is not None:
                weights = fusion_weights(fixed, hw)
            elif COND in halves:
                m = self._branch_maps(maps, halves)
                self._log_step(step, maps, halves)
                masks = self.masks.from_maps(m, step, map_hw(m.shape[2], x.shape[-2], x.shape[-1]))
                weights = fusion_weights(masks, hw)
            elif self.last_weights is not None and self.last_weights.shape[0] == x.shape[0]:
                weights = self.last_weights  # the masks of this step's cond call
        if weights is not None:
            self.last_weights = weights
            for h in halves:
                if h == UNCOND and lam >= 1.0:
                    fused[h] = per_half[h][:, 0]  # the base model's, everywhere
                else:
                    fused[h] = fuse(per_half[h], weights.to(per_half[h].device))
        else:
            for h in halves:
                fused[h] = per_half[h][:, 0]  # branch 0 only (CLoRA disabled or one branch)
        return fused

    # ------------------------------------------------------------------ masks
    @property
    def layout_masks(self) -> torch.Tensor | None:
        """The frozen (or user) layout ``[B, K, h, w]``, once there is one."""
        return self.masks.layout if self.masks.layout is not None else self.masks.frozen

    # ------------------------------------------------------------------ pieces
    @contextmanager
    def _hooks(self, router: RoutedLoras | None) -> Iterator[None]:
        """``router`` then the capture installed (so the capture sees the LoRAs' q/k), removed after."""
        self._router_now = router
        try:
            if router is not None:
                router.install()
            if self.capture is not None:
                self.capture.install()
            yield
        finally:
            if self.capture is not None:
                self.capture.remove()
            if router is not None:
                router.remove()

    def _cond_table(
        self, b: int, cond: Any, uncond: Any, halves: Sequence[int]
    ) -> dict[tuple[int, int], Any]:
        return cond_table(self.conds, self.unconds, b, cond, uncond, halves)

    def _run(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        table: dict[tuple[int, int], Any],
        blocks: Sequence[tuple[int, int]],
        want_output: bool,
        want_maps: bool,
    ) -> tuple[dict[tuple[int, int], torch.Tensor] | None, dict[tuple[int, int], torch.Tensor]]:
        """UNet calls for ``blocks`` ((half, branch) pairs, B rows each), one call per token length.
        Returns per block the outputs ``[B, C, H, W]`` (None when ``want_output`` is False: the calls
        stop after the last capture layer) and the maps ``[B, N, T]``."""
        b = x.shape[0]
        by_len: dict[int, list[tuple[int, int]]] = {}
        for blk in blocks:
            by_len.setdefault(token_length(table[blk]), []).append(blk)
        outs: dict[tuple[int, int], torch.Tensor] = {}
        maps: dict[tuple[int, int], torch.Tensor] = {}
        cap = self.capture if want_maps else None
        for call in by_len.values():
            n = len(call)
            x_in = torch.cat([x] * n)
            sigma_in = torch.cat([sigma] * n)
            cond_in = cat_conds([table[blk] for blk in call]) if n > 1 else table[call[0]]
            if self._router_now is not None:
                self._router_now.set_rows([k for _, k in call for _ in range(b)])
            if self.capture is not None:
                self.capture.reset()
                self.capture.latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
                self.capture.enabled = cap is not None
                self.capture.stop_after_last = cap is not None and not want_output and self.options.stop_early
            out: torch.Tensor | None
            try:
                out = self.inner_model(x_in, sigma_in, cond=cond_in)
            except StopForward:
                out = None
            if want_output:
                assert out is not None
                for i, blk in enumerate(call):
                    outs[blk] = out[i * b : (i + 1) * b]
            if cap is not None:
                m = cap.maps()
                for i, blk in enumerate(call):
                    maps[blk] = m[i * b : (i + 1) * b]
        return (outs if want_output else None), maps

    def _branch_maps(self, maps: dict[tuple[int, int], torch.Tensor], halves: Sequence[int]) -> torch.Tensor:
        """``[B, K, N, T]``: cond maps, or the mean of both halves (``maps_from="both"``; uncond maps
        are used only when every branch has them — not at ``base_uncond`` = 1 — and their token length equals
        the cond's)."""
        both = (
            self.options.maps_from == "both"
            and UNCOND in halves
            and all((UNCOND, k) in maps for k in range(self.n_branches))
        )
        per_branch = []
        for k in range(self.n_branches):
            m = maps[(COND, k)]
            if both and maps[(UNCOND, k)].shape == m.shape:
                m = (m + maps[(UNCOND, k)]) / 2
            per_branch.append(m)
        return torch.stack(per_branch, dim=1)

    def _log_step(self, step: int, maps: dict[tuple[int, int], torch.Tensor], halves: Sequence[int]) -> None:
        if len(self.groups) < 2:
            return
        cond_maps = torch.stack([maps[(COND, k)] for k in range(self.n_branches)], dim=1)
        entry = {"loss_cond": float(clora_loss(cond_maps, self.groups, self.options.tau))}
        if UNCOND in halves and all(
            (UNCOND, k) in maps and maps[(UNCOND, k)].shape == maps[(COND, k)].shape
            for k in range(self.n_branches)
        ):
            both = torch.stack(
                [(maps[(COND, k)] + maps[(UNCOND, k)]) / 2 for k in range(self.n_branches)], dim=1
            )
            entry["loss_both"] = float(clora_loss(both, self.groups, self.options.tau))
        self.step_log[step] = entry

    def _update(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        table: dict[tuple[int, int], Any],
        halves: Sequence[int],
        n_updates: int,
        step: int,
    ) -> torch.Tensor | None:
        """``n_updates`` gradient steps on the latent; the new latent, or None when autograd is
        unavailable (then `fallback_reason` is set and the step runs as masks-only)."""
        router = self.grad_router if self.grad_router is not None else self.router
        if self.update_scope is None:
            with self._hooks(router):
                x_new = self._descend(x, sigma, table, halves, n_updates, step)
        else:
            try:
                with self.update_scope(), self._hooks(router):
                    table = {key: _clone_tensors(c) for key, c in table.items()}
                    x_new = self._descend(
                        x.detach().clone(), sigma.detach().clone(), table, halves, n_updates, step
                    )
            except (RuntimeError, TypeError, ValueError) as e:
                first = str(e).splitlines()[0][:160] if str(e) else ""
                self.fallback_reason = f"no latent gradient ({type(e).__name__}: {first})"
                x_new = None
        if x_new is None:
            self._updates_failed = True
        return x_new

    def _descend(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        table: dict[tuple[int, int], Any],
        halves: Sequence[int],
        n_updates: int,
        step: int,
    ) -> torch.Tensor | None:
        """The gradient steps ``x ← x − s/c_in²·∇ₓL`` (hooks installed by the caller)."""
        if torch.is_inference_mode_enabled():
            self.fallback_reason = "torch.inference_mode is active: CLoRA runs masks-only (no latent update)"
            return None
        opts = self.options
        rows = [COND, UNCOND] if (opts.maps_from == "both" and UNCOND in halves) else [COND]
        blocks = [(h, k) for h in rows for k in range(self.n_branches)]
        c_in = self.input_scale(sigma).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        scale = opts.step_size / c_in**2
        xv = x.detach().clone()
        for it in range(n_updates):
            xv.requires_grad_(True)
            try:
                with torch.enable_grad():
                    _, maps = self._run(xv, sigma, table, blocks, want_output=False, want_maps=True)
                    loss = clora_loss(self._branch_maps(maps, rows), self.groups, opts.tau)
                if not loss.requires_grad:
                    self.fallback_reason = (
                        "the attention maps carry no gradient (is the model frozen under no_grad?)"
                    )
                    return None
                (grad,) = torch.autograd.grad(loss, xv)
            except RuntimeError as e:
                if "inference tensor" in str(e).lower():
                    self.fallback_reason = f"no gradients through this model ({e}); CLoRA runs masks-only"
                    return None
                raise
            self.history.append({"step": float(step), "iter": float(it), "loss": float(loss.detach())})
            xv = (xv - scale * grad).detach()
        return xv


def _clone_tensors(cond: Any) -> Any:
    """A conditioning with every tensor cloned (normal tensors inside ``update_scope``), recursively."""
    if isinstance(cond, torch.Tensor):
        return cond.detach().clone()
    if isinstance(cond, dict):
        return {k: _clone_tensors(v) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_clone_tensors(v) for v in cond)
    return cond
