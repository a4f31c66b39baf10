"""Faithful re-implementation of the official CLoRA per-branch loop, for speed comparisons only.

gemlab-vt/clora ``pipeline_clora.py`` (commit 76def7c), transcribed to a k-diffusion denoiser so
that it runs under the same samplers as `CloraDenoiser`:

- every branch runs the UNet SEPARATELY on ``[uncond, cond]`` (its LoRAs selected for all rows);
- EVERY attention layer uses an explicit ``softmax(QKᵀ/√d)`` (the official attention processor
  replaces all processors); the probabilities of the capture layers are kept;
- maps = mean over capture layers, heads and BOTH CFG halves;
- at update steps the whole forward of all branches is kept for autograd (gradient "through
  everything"); ``z ← z − s·∇_z L`` with constant s, repeated ``refinement_iters`` times at refinement
  steps (1 + iters updates, each preceded by a forward of all branches);
- the prediction used for the sampler step comes from the forward BEFORE the last update (stale ε):
  in x-space it returns ``D_old + (x_new − x_old)`` (= ``x_new − σ·ε_old``, what diffusers' DDIM
  step with the stale ε on the updated z gives) and writes ``x_new`` into ``x`` in place;
- masks from the maps of that same last forward.
Forwards outside the update window run under ``no_grad`` (generous to the official code).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .attention import lowest_resolution_layers, map_hw, override_attention
from .conds import cat_conds
from .denoiser import default_input_scale
from .loss import clora_loss
from .masks import concept_masks, fuse, fusion_weights
from .options import CloraOptions
from .routing import RoutedLoras


def _explicit_forward(
    store: dict[str, list[torch.Tensor]], capture: set[str]
) -> Callable[[nn.Module, str], Any]:
    def make(m: nn.Module, name: str) -> Any:
        keep = name in capture

        def forward(
            self: nn.Module,
            x: torch.Tensor,
            context: torch.Tensor | None = None,
            mask: Any = None,
            **kwargs: Any,
        ) -> torch.Tensor:
            h = self.heads
            q = self.to_q(x)
            ctx = x if context is None else context
            k = self.to_k(ctx)
            v = self.to_v(ctx)
            b, n, c = q.shape
            d = c // h
            qh, kh, vh = (t.reshape(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
            probs = (qh @ kh.transpose(-1, -2) * (d**-0.5)).softmax(dim=-1)
            if keep:
                store.setdefault(name, []).append(probs.float().mean(dim=1))
            out = (probs @ vh).transpose(1, 2).reshape(b, n, c)
            return self.to_out(out)

        return types.MethodType(forward, m)

    return make


class OfficialCloraLoop:
    """The official per-branch CLoRA loop as a k-diffusion denoiser (same call protocol as
    `CloraDenoiser`; ``conds``/``unconds`` per branch, no ``None`` entries)."""

    def __init__(
        self,
        inner_model: Callable[..., torch.Tensor],
        unet: nn.Module,
        conds: Sequence[Any],
        unconds: Sequence[Any],
        groups: Sequence[Sequence[Sequence[int]]],
        mask_tokens: Sequence[Sequence[int]],
        options: CloraOptions,
        router: RoutedLoras | None = None,
        capture_layers: Sequence[str] | None = None,
        input_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.inner_model = inner_model
        self.unet = unet
        self.conds = list(conds)
        self.unconds = list(unconds)
        self.n_branches = len(self.conds)
        self.groups = [[list(t) for t in g] for g in groups]
        self.mask_tokens = [list(t) for t in mask_tokens]
        self.options = options
        self.router = router
        self.capture_layers = (
            list(capture_layers) if capture_layers is not None else lowest_resolution_layers(unet)
        )
        self.input_scale = input_scale or default_input_scale(inner_model)
        self.history: list[dict[str, float]] = []
        self.step = -1
        self._last_sigma: float | None = None

    def _advance(self, sigma: torch.Tensor) -> int:
        s = float(sigma.flatten()[0])
        if self._last_sigma is None or s > self._last_sigma:
            self.step = 0
            self.history.clear()
        elif s < self._last_sigma:
            self.step += 1
        self._last_sigma = s
        return self.step

    def _forward_all(
        self, x: torch.Tensor, sigma: torch.Tensor, store: dict[str, list[torch.Tensor]]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per branch: UNet on [uncond, cond]; returns outputs per branch ``[2B, …]`` and maps
        ``[B, K, N, T]`` (mean over layers, heads, both halves)."""
        b = x.shape[0]
        outs: list[torch.Tensor] = []
        maps: list[torch.Tensor] = []
        for k in range(self.n_branches):
            store.clear()
            if self.router is not None:
                self.router.select(k)
            out = self.inner_model(
                torch.cat([x, x]), torch.cat([sigma, sigma]), cond=cat_conds([self.unconds[k], self.conds[k]])
            )
            outs.append(out)
            per_layer = torch.stack([store[n][0] for n in self.capture_layers]).mean(dim=0)  # [2B, N, T]
            maps.append((per_layer[:b] + per_layer[b:]) / 2)
        return outs, torch.stack(maps, dim=1)

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Any = None,
        uncond: Any = None,
        cond_scale: float = 1.0,
        **kwargs: Any,
    ) -> torch.Tensor:
        step = self._advance(sigma)
        opts = self.options
        n_updates = opts.updates_at(step) if len(self.groups) > 1 else 0
        b = x.shape[0]
        store: dict[str, list[torch.Tensor]] = {}
        c_in = self.input_scale(sigma).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        scale = opts.step_size / c_in**2
        if self.router is not None:
            self.router.install()
        try:
            with override_attention(self.unet, _explicit_forward(store, set(self.capture_layers))):
                xv = x.detach().clone()
                if n_updates == 0:
                    with torch.no_grad():
                        outs, maps = self._forward_all(xv, sigma, store)
                else:
                    for it in range(n_updates):
                        xv.requires_grad_(True)
                        with torch.enable_grad():
                            outs, maps = self._forward_all(xv, sigma, store)
                            loss = clora_loss(maps, self.groups, opts.tau)
                        (grad,) = torch.autograd.grad(loss, xv)
                        self.history.append({"step": float(step), "iter": float(it), "loss": float(loss)})
                        outs = [o.detach() for o in outs]
                        maps = maps.detach()
                        xv = (xv - scale * grad).detach()
        finally:
            if self.router is not None:
                self.router.remove()
        with torch.no_grad():
            hw = map_hw(maps.shape[2], x.shape[-2], x.shape[-1])
            masks = concept_masks(maps, self.mask_tokens, hw, opts.mask_threshold, opts.dilate, opts.erode)
            weights = fusion_weights(masks, (x.shape[-2], x.shape[-1]))
            unc = fuse(torch.stack([o[:b] for o in outs], dim=1), weights)
            con = fuse(torch.stack([o[b:] for o in outs], dim=1), weights)
            den = unc + (con - unc) * cond_scale
            shift = xv - x
            x.copy_(xv)
        return den + shift
