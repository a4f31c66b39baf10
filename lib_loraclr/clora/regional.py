"""Per-region generation in ONE UNet pass: each concept's LoRA and prompt act only inside its region.

Once the layout is known (a user layout, or CLoRA's automatic one frozen after the first steps), a
`RegionalDenoiser` runs one UNet call per step (cond and uncond rows batched, as the WebUI does), with

- `RoutedLoras` in region mode: every spatial layer the LoRAs touch (attn1, attn2 queries and outputs,
  ff, proj, convs) adds LoRA k only at the positions of region k;
- `RegionalAttention`: every cross-attention layer computes, for each region k, the attention of all
  queries against region k's own text (its branch prompt, encoded with its text-encoder LoRA; K/V with
  its UNet LoRA) and keeps it at region k's positions; region 0 (background) uses the base prompt.

Global conditioning that is not per position (SDXL's pooled text vector, the time embedding) comes from
branch 0, the base prompt. Without LoRAs (``router=None``) the same pass is regional prompting of one model, e.g. a merged LoRA with
a region prompt per concept (Mix-of-Show's regionally controllable sampling).

Region crops (``crops`` > 0, off by default): each concept region is ALSO denoised as its own canvas,
the latent cropped to the region's bounding box (grown to a size the UNet accepts, `downsample_factor`) with
only that region's prompt and LoRA (Mixture-of-Diffusers-style tiles); inside the region the prediction is
``(1 − crops)·routed + crops·crop``. Convolutions and attention of the crop never see the other regions,
so a concept drawn in its region behaves like the single LoRA drawing it alone.

Cost per step: one UNet call plus K − 1 extra cross-attention products (text length 77 per region);
with crops, one more UNet call on the concept regions' crops (about one more image area in all).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import cross_attention_layers, map_hw
from .conds import cat_conds, crossattn, select_rows, token_length
from .denoiser import COND, UNCOND, CloraDenoiser, cond_table, guided
from .routing import RoutedLoras


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one SDPA makes of it (0 where True, −inf where False), so
    the conversion runs once per layout instead of once per attention call."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


class RegionalAttention:
    """Instance-level ``forward`` of every ``attn2`` layer of ``unet`` that attends region by region.

    Per call set ``contexts`` (``[K]`` tensors ``[R, T_k, D]``, rows aligned with the UNet batch) and
    ``weights`` ``[R, K, H, W]`` (latent resolution). The layer's own ``context`` argument is ignored
    while installed. ``router`` (optional) is told which region each context token belongs to, so the K/V
    projections add each region's LoRA to its own tokens."""

    def __init__(self, unet: nn.Module, router: RoutedLoras | None = None, bounded: bool = True) -> None:
        self.unet = unet
        self.router = router
        self.bounded = bounded
        self.layers = cross_attention_layers(unet)
        self.self_layers = [n[: -len("attn2")] + "attn1" for n in self.layers] if bounded else []
        self.contexts: list[torch.Tensor] = []
        self.weights: torch.Tensor | None = None
        self._saved: list[tuple[nn.Module, Any]] = []
        self._cache: dict[int, torch.Tensor] = {}
        self._ctx: torch.Tensor | None = None
        self._tok_region = torch.zeros(0, dtype=torch.long)
        # per attn2 layer: (weights' stamp, K, V) of the regions' text (`_context_kv`)
        self._kv: dict[tuple[Any, ...], tuple[Any, torch.Tensor, torch.Tensor]] = {}

    def set(self, contexts: Sequence[torch.Tensor], weights: torch.Tensor) -> None:
        """Contexts ``[K]`` of ``[R, T_k, D]`` and weights ``[R, K, H, W]`` for the next calls. The contexts
        of the regions that cover some position are concatenated along the tokens (``[R, ΣT, D]``), so each
        layer runs ONE K/V projection and ONE attention whose mask lets a position see only its region's
        tokens (its region = the argmax of its weights). The per-resolution weights and attention masks are
        kept while the weights and the regions' token counts stay the same (every step of a frozen layout)."""
        used = [k for k in range(len(contexts)) if bool((weights[:, k] > 0).any())]
        tok_region = torch.cat([torch.full((int(contexts[k].shape[1]),), k, dtype=torch.long) for k in used])
        same = (
            self.weights is not None
            and self.weights.shape == weights.shape
            and torch.equal(self.weights, weights)
            and torch.equal(self._tok_region, tok_region)
        )
        if not same:
            self.weights = weights
            self._cache = {}
            self._masks: dict[tuple[int, torch.dtype], torch.Tensor | None] = {}
            self._labels: dict[int, torch.Tensor] = {}
            self._tok_region = tok_region
        self.contexts = [contexts[k] for k in used]
        ctx = torch.cat(self.contexts, dim=1) if len(used) > 1 else self.contexts[0]
        if not same or self._ctx is None or self._ctx.shape != ctx.shape or not torch.equal(self._ctx, ctx):
            self._kv = {}
        self._ctx = ctx
        self._single = len(used) == 1
        if self.router is not None:
            self.router.context_tokens(self._tok_region)

    def _weights_at(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """``[R, K, n]`` region weights at a layer with ``n`` query positions."""
        got = self._cache.get(n)
        if got is None:
            assert self.weights is not None
            H, W = self.weights.shape[-2:]
            hw = map_hw(n, H, W)
            w = self.weights.float()
            if hw != (H, W):
                w = F.interpolate(w, size=hw, mode="nearest")
            got = w.flatten(2)
            self._cache[n] = got
        return got.to(device=like.device)

    def _labels_at(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """``[R, n]`` region (argmax of the weights) of every position of a layer."""
        got = self._labels.get(n)
        if got is None:
            got = self._weights_at(n, like).argmax(dim=1)
            self._labels[n] = got
        return got

    def _cross_mask(self, n: int, like: torch.Tensor) -> torch.Tensor | None:
        """``[R, 1, n, ΣT]`` additive mask (0 where a position may attend to a token: the token's region is its
        own; −inf elsewhere), in ``like``'s dtype."""
        if self._single:
            return None
        key = (n, like.dtype)
        if key not in self._masks:
            lab = self._labels_at(n, like)
            tok = self._tok_region.to(lab.device)
            self._masks[key] = _additive((lab[:, :, None] == tok[None, None, :])[:, None], like.dtype)
        return self._masks[key]

    def _self_mask(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """``[R, 1, n, n]`` additive mask of the bounded self-attention (`_self_forward`)."""
        key = (-n, like.dtype)  # cached beside the cross masks
        if key not in self._masks:
            lab = self._labels_at(n, like)
            allowed = (lab[:, :, None] == lab[:, None, :]) | (lab[:, None, :] == 0) | (lab[:, :, None] == 0)
            self._masks[key] = _additive(allowed[:, None], like.dtype)
        got = self._masks[key]
        assert got is not None
        return got

    def reset(self) -> None:
        """Forget the cached K/V projections (a new sampling run: the model's weights may have changed)."""
        self._kv = {}

    def _context_kv(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``to_k`` / ``to_v`` of the regions' text (``[R, ΣT, inner]`` each, with the router's K/V LoRAs).
        The text is the same at every step, so without autograd the pair is computed once per layer and
        reused while the context, the dtype and the projections' weights (their storage and in-place version)
        are unchanged."""
        ctx = self._ctx.to(device=x.device, dtype=x.dtype)
        if torch.is_grad_enabled():
            return module.to_k(ctx), module.to_v(ctx)
        try:
            stamp = tuple(
                (p.data_ptr(), p._version) for m in (module.to_k, module.to_v) for p in m.parameters()
            )
        except RuntimeError:  # inference tensors keep no version counter: nothing is cached
            return module.to_k(ctx), module.to_v(ctx)
        key = (id(module), x.dtype, x.device)
        got = self._kv.get(key)
        if got is None or got[0] != stamp:
            got = (stamp, module.to_k(ctx), module.to_v(ctx))
            self._kv[key] = got
        return got[1], got[2]

    def _self_forward(self, module: nn.Module) -> Callable[..., torch.Tensor]:
        """Bounded self-attention: a position of concept region k attends to its own region and the
        background only; background positions attend everywhere (Bounded Attention, Dahary et al. 2024)."""

        def forward(
            this: nn.Module, x: torch.Tensor, context: Any = None, mask: Any = None, **kwargs: Any
        ) -> torch.Tensor:
            heads = this.heads
            ctx = x if context is None else context
            q, k, v = this.to_q(x), this.to_k(ctx), this.to_v(ctx)
            b, n, c = q.shape
            qh, kh, vh = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=self._self_mask(n, q))
            return this.to_out(o.transpose(1, 2).reshape(b, n, c))

        return types.MethodType(forward, module)

    def _forward(self, module: nn.Module) -> Callable[..., torch.Tensor]:
        def forward(
            this: nn.Module, x: torch.Tensor, context: Any = None, mask: Any = None, **kwargs: Any
        ) -> torch.Tensor:
            heads = this.heads
            q = this.to_q(x)
            kk, vv = self._context_kv(this, x)
            b, n, c = q.shape
            qh, kh, vh = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, kk, vv))
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=self._cross_mask(n, q))
            return this.to_out(o.transpose(1, 2).reshape(b, n, c))

        return types.MethodType(forward, module)

    def install(self) -> RegionalAttention:
        if self._saved:
            return self
        try:
            for name in self.layers:
                m = self.unet.get_submodule(name)
                self._saved.append((m, m.__dict__.get("forward", None)))
                m.forward = self._forward(m)
            for name in self.self_layers:
                m = self.unet.get_submodule(name)
                self._saved.append((m, m.__dict__.get("forward", None)))
                m.forward = self._self_forward(m)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for m, prev in self._saved:
            if prev is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = prev
        self._saved.clear()

    @contextmanager
    def installed(self) -> Any:
        self.install()
        try:
            yield self
        finally:
            self.remove()


def downsample_factor(unet: nn.Module) -> int:
    """``2 ** (number of downsampling stages)`` of an ldm / sgm / Forge UNet (modules named ``Downsample``):
    a UNet call needs latent sides that are multiples of it (SD1/SDXL: 8; the measuring world: 2)."""
    return 2 ** sum(1 for m in unet.modules() if type(m).__name__ == "Downsample")


def crop_box(region: torch.Tensor, multiple: int) -> tuple[int, int, int, int] | None:
    """The bounding box ``(y0, y1, x0, x1)`` (latent cells, end exclusive) of a ``[h, w]`` region mask
    (> 0.5 = inside), each side grown around its centre to a multiple of ``multiple`` and shifted to lie
    inside the latent; None for an empty region or a box that would cover the whole latent."""
    h, w = (int(v) for v in region.shape)
    inside = region > 0.5
    if not bool(inside.any()):
        return None
    ys = torch.nonzero(inside.any(1)).flatten()
    xs = torch.nonzero(inside.any(0)).flatten()

    def grow(a: int, b: int, size: int) -> tuple[int, int]:
        n = min(size, -(-(b - a) // multiple) * multiple)
        a = min(max(0, a - (n - (b - a)) // 2), size - n)
        return a, a + n

    y0, y1 = grow(int(ys[0]), int(ys[-1]) + 1, h)
    x0, x1 = grow(int(xs[0]), int(xs[-1]) + 1, w)
    if (y1 - y0, x1 - x0) == (h, w):
        return None
    return y0, y1, x0, x1


def _crop_cond(cond: Any, box: tuple[int, int, int, int], hw: tuple[int, int]) -> Any:
    """A conditioning for a crop: spatial entries (4-D tensors of the latent's ``h × w``, e.g. an inpainting
    model's ``c_concat``) cropped to ``box``, everything else kept."""
    y0, y1, x0, x1 = box
    if isinstance(cond, torch.Tensor):
        if cond.dim() == 4 and tuple(cond.shape[-2:]) == hw:
            return cond[..., y0:y1, x0:x1]
        return cond
    if isinstance(cond, dict):
        return {k: _crop_cond(v, box, hw) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_crop_cond(v, box, hw) for v in cond)
    return cond


class RegionalDenoiser:
    """CLoRA's routed mode: a denoiser wrapper (protocol of `lib_loraclr.models.sampling`) that runs ONE
    UNet pass per step with per-region LoRAs and prompts.

    Args:
        inner_model: ``inner_model(x, sigma, cond=c)`` (k-diffusion wrapper).
        unet: the UNet inside it.
        conds / unconds: per branch (0 = base/background, k = concept k), the conditioning of the B images
            (batch 1 is broadcast); ``unconds`` None = the call's ``uncond`` for every branch.
        router: `RoutedLoras` on the UNet, one entry per branch (None: no per-region LoRA).
        layout: ``[B or 1, K, h, w]`` 0/1 masks (column 0 = background); None = automatic: the steps
            before ``estimator.options.layout_until`` run as branch fusion (`CloraDenoiser` ``estimator``)
            which estimates and freezes the layout; routed passes follow.
        estimator: the `CloraDenoiser` for the automatic layout (needed when ``layout`` is None).
        bounded: bounded self-attention (a concept position sees its own region and the background).
        crops: weight in [0, 1] of the region crops (module docstring) inside each concept region; 0 = off.
        options: the run's `CloraOptions` when there is no estimator (a user layout): its ``base_uncond``
            applies to the routed pass.

    Hooks are installed for each call and removed at its end (also on exceptions).
    """

    def __init__(
        self,
        inner_model: Callable[..., torch.Tensor],
        unet: nn.Module,
        conds: Sequence[Any],
        unconds: Sequence[Any] | None = None,
        router: RoutedLoras | None = None,
        layout: torch.Tensor | None = None,
        estimator: CloraDenoiser | None = None,
        bounded: bool = True,
        crops: float = 0.0,
        options: Any = None,
    ) -> None:
        if not 0.0 <= float(crops) <= 1.0:
            raise ValueError(f"crops must lie in [0, 1], got {crops}")
        self.crops = float(crops)
        self.estimator = estimator
        self.inner_model = inner_model
        self._options: Any = options
        self.unet = unet
        self.conds = list(conds)
        self.n_branches = len(self.conds)
        self.unconds = list(unconds) if unconds is not None else [None] * self.n_branches
        if router is not None and router.n_branches != self.n_branches:
            raise ValueError(
                f"the router has {router.n_branches} branches, the conditionings {self.n_branches}"
            )
        if layout is None and estimator is None:
            raise ValueError("a RegionalDenoiser needs a layout or an estimator (CloraDenoiser) to find one")
        if layout is not None and layout.shape[1] != self.n_branches:
            raise ValueError(f"the layout has {layout.shape[1]} columns for {self.n_branches} branches")
        self.router = router
        self.layout = layout
        self.last_weights: torch.Tensor | None = None
        self.attention = RegionalAttention(unet, router, bounded=bounded)
        self.multiple = downsample_factor(unet) if self.crops > 0 else 1
        self.crop_calls = 0  # UNet calls made for region crops (diagnostics)
        self.routed_steps = 0
        self.branch_steps = 0
        self._last_sigma: float | None = None
        self._routed_at: tuple[float, bool] | None = None  # (σ, routed?) of the step in progress
        self.x_new: torch.Tensor | None = None
        self.updated_now = False

    @classmethod
    def around(cls, fusion: CloraDenoiser, layout: torch.Tensor | None = None) -> RegionalDenoiser:
        """The routed mode over a built `CloraDenoiser` ``fusion`` (same model call, conds and LoRAs); with no
        ``layout``, ``fusion`` finds the layout in the first steps."""
        regional = cls(
            fusion.inner_model,
            fusion.unet,
            fusion.conds,
            fusion.unconds,
            fusion.router,
            layout=layout,
            estimator=None if layout is not None else fusion,
            crops=float(getattr(fusion.options, "region_crops", 0.0)),
        )
        regional.options = fusion.options
        return regional

    @property
    def inner_model(self) -> Callable[..., torch.Tensor]:
        return self._inner_model

    @inner_model.setter
    def inner_model(self, value: Callable[..., torch.Tensor]) -> None:
        """The host's model call ``(x, sigma, cond=…)``; a host that sets it per call (Forge) sets the
        estimator's too."""
        self._inner_model = value
        if self.estimator is not None:
            self.estimator.inner_model = value

    @property
    def options(self) -> Any:
        """The `CloraOptions` of the run (the estimator's, so a host switching to masks-only reaches it);
        with a user layout, the ``options`` given (None: a bare routed pass, ``base_uncond`` 0)."""
        return self.estimator.options if self.estimator is not None else self._options

    @options.setter
    def options(self, value: Any) -> None:
        self._options = value
        if self.estimator is not None:
            self.estimator.options = value

    @property
    def conds(self) -> list[Any]:
        return self._conds

    @conds.setter
    def conds(self, value: Sequence[Any]) -> None:
        """Per-branch conditionings; a host that sets them per step (A1111's prompt schedules) sets the
        estimator's too."""
        self._conds = list(value)
        if self.estimator is not None:
            self.estimator.conds = list(value)

    @property
    def unconds(self) -> list[Any]:
        return self._unconds

    @unconds.setter
    def unconds(self, value: Sequence[Any]) -> None:
        self._unconds = list(value)
        if self.estimator is not None:
            self.estimator.unconds = list(value)

    @property
    def fallback_reason(self) -> str | None:
        return self.estimator.fallback_reason if self.estimator is not None else None

    @property
    def layout_masks(self) -> torch.Tensor | None:
        if self.layout is not None:
            return self.layout
        return self.estimator.layout_masks if self.estimator is not None else None

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Any = None,
        uncond: Any = None,
        cond_scale: float = 1.0,
        **kwargs: Any,
    ) -> torch.Tensor:
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
        """The prediction of each CFG half in ``halves`` (`CloraDenoiser.predict`'s contract). Every call of
        one step (same σ) takes the path its first call took: branch fusion or the routed pass."""
        halves = tuple(h for h in (COND, UNCOND) if h in halves)
        s = float(sigma.flatten()[0])
        if self._last_sigma is not None and s > self._last_sigma and self.estimator is not None:
            self.estimator.reset()  # a new sampling run: forget the frozen layout, estimate it again
            self._routed_at = None
        if self._last_sigma is None or s > self._last_sigma:
            self.attention.reset()
        self._last_sigma = s
        masks = self.layout_masks
        if self._routed_at is None or self._routed_at[0] != s:
            self._routed_at = (s, masks is not None)
        self.x_new, self.updated_now = None, False
        if not self._routed_at[1] or masks is None:
            assert self.estimator is not None
            if COND in halves:
                self.branch_steps += 1
            out = self.estimator.predict(x, sigma, cond, uncond, halves)
            self.last_weights = self.estimator.last_weights
            self.x_new, self.updated_now = self.estimator.x_new, self.estimator.updated_now
            return out
        if COND in halves:
            self.routed_steps += 1
        return self.routed_halves(x, sigma, masks, cond, uncond, halves)

    def routed(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        masks: torch.Tensor,
        cond: Any = None,
        uncond: Any = None,
        cond_scale: float = 1.0,
    ) -> torch.Tensor:
        """One routed step: guided denoised ``[B, C, H, W]`` with region masks ``[B or 1, K, h, w]``."""
        use_cfg = cond_scale != 1.0 and (uncond is not None or all(u is not None for u in self.unconds))
        outs = self.routed_halves(x, sigma, masks, cond, uncond, (COND, UNCOND) if use_cfg else (COND,))
        if not use_cfg:
            return outs[COND]
        return outs[UNCOND] + (outs[COND] - outs[UNCOND]) * cond_scale

    def routed_halves(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        masks: torch.Tensor,
        cond: Any = None,
        uncond: Any = None,
        halves: Sequence[int] = (COND,),
    ) -> dict[int, torch.Tensor]:
        """The routed pass's prediction of each CFG half in ``halves`` (one UNet call when their token
        lengths agree)."""
        b = x.shape[0]
        halves = tuple(h for h in (COND, UNCOND) if h in halves)
        table = cond_table(self.conds, self.unconds, b, cond, uncond, halves)
        m = masks.to(device=x.device, dtype=torch.float32)
        if m.shape[0] == 1 and b > 1:
            m = m.expand(b, -1, -1, -1)
        lat = (int(x.shape[-2]), int(x.shape[-1]))
        if tuple(m.shape[-2:]) != lat:
            m = F.interpolate(m, size=lat, mode="nearest")
        self.last_weights = (m / m.sum(1, keepdim=True).clamp_min(1e-12)).unsqueeze(2)
        # blocks of B rows: (half, routed?); the base model's unconditional half (`CloraOptions.base_uncond`)
        # runs as rows whose every position is background: branch 0's text, no LoRA, unbounded attention
        lam = self._base_uncond()
        blocks = [(h, True) for h in halves if not (h == UNCOND and lam >= 1.0)]
        if UNCOND in halves and lam > 0.0:
            blocks.append((UNCOND, False))
        background = torch.zeros_like(m)
        background[:, 0] = 1.0

        # one call for all blocks when each region's texts have one token length in every block
        def text(blk: tuple[int, bool], k: int) -> Any:
            return table[(blk[0], k if blk[1] else 0)]

        same = all(len({token_length(text(blk, k)) for blk in blocks}) == 1 for k in range(self.n_branches))
        calls = [blocks] if same else [[blk] for blk in blocks]
        outs: dict[tuple[int, bool], torch.Tensor] = {}
        if self.router is not None:
            self.router.install()
        try:
            with self.attention.installed():
                for call in calls:
                    n = len(call)
                    x_in = torch.cat([x] * n)
                    sigma_in = torch.cat([sigma] * n)
                    cond_in = cat_conds([table[(h, 0)] for h, _ in call]) if n > 1 else table[(call[0][0], 0)]
                    contexts = [
                        torch.cat([crossattn(text(blk, k)) for blk in call]) for k in range(self.n_branches)
                    ]
                    weights = torch.cat([m if routed else background for _, routed in call])
                    if self.router is not None:
                        self.router.set_regions(weights)
                    self.attention.set(contexts, weights)
                    out = self.inner_model(x_in, sigma_in, cond=cond_in)
                    for i, blk in enumerate(call):
                        outs[blk] = out[i * b : (i + 1) * b]
        finally:
            if self.router is not None:
                self.router.set_regions(None)
                self.router.remove()
        routed = {h: outs[(h, True)] for h in halves if (h, True) in outs}
        if self.crops > 0 and routed:
            halves_r = tuple(routed)
            crop_calls = [halves_r] if same else [(h,) for h in halves_r]
            self._blend_crops(x, sigma, m, table, crop_calls, routed)
        if (UNCOND, False) in outs:
            base = outs[(UNCOND, False)]
            routed[UNCOND] = base if UNCOND not in routed else routed[UNCOND] + lam * (base - routed[UNCOND])
        return routed

    def _base_uncond(self) -> float:
        """`CloraOptions.base_uncond` of the run (0 without options: each region's own uncond)."""
        opts = self.options
        return opts.base_uncond_weight(self.n_branches) if opts is not None else 0.0

    def _blend_crops(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        m: torch.Tensor,
        table: dict[tuple[int, int], Any],
        calls: Sequence[Sequence[int]],
        outs: dict[int, torch.Tensor],
    ) -> None:
        """Region crops, in place on ``outs``: for every concept region k (column k ≥ 1 of the ``[B, K, h, w]``
        layout ``m``) and every crop box its rows share, one UNet call on the cropped latent with branch k's
        conditioning and LoRA on all rows; inside the region ``out += crops · m_k · (crop − out)``."""
        b = x.shape[0]
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        for k in range(1, self.n_branches):
            boxes: dict[tuple[int, int, int, int], list[int]] = {}
            for r in range(b):
                box = crop_box(m[r, k], self.multiple)
                if box is not None:
                    boxes.setdefault(box, []).append(r)
            for box, rows in boxes.items():
                y0, y1, x0, x1 = box
                idx = torch.as_tensor(rows, dtype=torch.long, device=x.device)
                xc = x[idx][..., y0:y1, x0:x1]
                sc = sigma[idx] if sigma.dim() > 0 and sigma.shape[0] == b else sigma
                wk = (self.crops * m[idx, k, y0:y1, x0:x1]).unsqueeze(1).to(x.dtype)
                for call in calls:
                    n = len(call)
                    conds = [_crop_cond(select_rows(table[(h, k)], rows, b), box, hw) for h in call]
                    if self.router is not None:
                        self.router.install()
                        self.router.select(k)
                    try:
                        self.crop_calls += 1
                        out = self.inner_model(
                            torch.cat([xc] * n),
                            torch.cat([sc] * n) if sc.dim() > 0 else sc,
                            cond=cat_conds(conds) if n > 1 else conds[0],
                        )
                    finally:
                        if self.router is not None:
                            self.router.remove()
                    for i, h in enumerate(call):
                        crop = out[i * len(rows) : (i + 1) * len(rows)]
                        region = outs[h][idx, :, y0:y1, x0:x1]
                        outs[h][idx, :, y0:y1, x0:x1] = region + wk * (crop - region)


__all__ = ["RegionalAttention", "RegionalDenoiser", "crop_box", "downsample_factor"]
