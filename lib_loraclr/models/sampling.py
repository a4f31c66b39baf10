"""WebUI-style sampling for the tiny models: batched classifier-free guidance over k-diffusion.

Denoiser protocol (what `sample` calls at every step; what a CLoRA wrapper replaces)::

    denoiser(x, sigma, cond=cond, uncond=uncond, cond_scale=cfg_scale) -> denoised

- ``x``: ``[B, C, H, W]`` latents in k-diffusion space (``x0 + sigma·noise``);
- ``sigma``: ``[B]`` noise levels;
- ``cond`` / ``uncond``: what ``model.get_learned_conditioning`` returned for the prompts / negative
  prompts — a tensor ``[B, 77·k, D]`` (SD1) or a dict ``{"crossattn": [B, 77·k, D], "vector": [B, A]}``
  (SDXL); ``uncond`` may have a different token length than ``cond``;
- ``cond_scale``: CFG scale (float);
- returns the guided denoised latents ``[B, C, H, W]`` (k-diffusion convention, not ε).

`CFGDenoiser` is the reference implementation (A1111 ``CFGDenoiser`` without AND/img2img): cond and
uncond in one batched model call (``x_in = cat[x, x]``, cond first) when their token lengths are equal,
two calls otherwise; ``cond_scale == 1`` skips the uncond pass. Its ``inner_model`` is a
``CompVisDenoiser`` around the tiny model (``inner_model(x, sigma, cond=c)``): `kdiffusion`'s copy of
k-diffusion's, as are the samplers (a WebUI's ``k_diffusion`` may differ: Forge Neo's is ComfyUI's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import LoraclrError

SAMPLERS = ("euler", "euler_a", "dpmpp_2m", "ddim", "heun")

Cond = Any  # torch.Tensor (SD1) or dict[str, torch.Tensor] (SDXL)


class UnknownSamplerError(LoraclrError, ValueError):
    """The sampler name is not one of `SAMPLERS`."""


def cond_token_length(cond: Cond) -> int:
    """Number of context tokens (77·k) of a conditioning."""
    if isinstance(cond, dict):
        return int(cond["crossattn"].shape[1])
    return int(cond.shape[1])


def cat_conds(conds: list[Cond]) -> Cond:
    """Concatenate conditionings along the batch (tensors, or dicts key by key)."""
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds], dim=0) for k in conds[0]}
    return torch.cat(conds, dim=0)


def wrap_model(model: nn.Module) -> nn.Module:
    """``CompVisDenoiser(model)`` (ε-prediction, discrete SD schedule): the library's copy of k-diffusion's
    (`kdiffusion`), not the host's ``k_diffusion`` (Forge Neo's has no ``CompVisDenoiser``)."""
    from .kdiffusion import CompVisDenoiser

    return CompVisDenoiser(model)


class CFGDenoiser(nn.Module):
    """Batched classifier-free guidance like the WebUI: ``uncond + cond_scale·(cond − uncond)``.

    ``inner_model`` is the k-diffusion wrapper (``CompVisDenoiser``) of the tiny model; pass a tiny
    model or an existing wrapper.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if hasattr(model, "apply_model"):
            model = wrap_model(model)
        self.inner_model = model

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Cond,
        uncond: Cond | None = None,
        cond_scale: float = 1.0,
    ) -> torch.Tensor:
        if uncond is None or cond_scale == 1.0:
            return self.inner_model(x, sigma, cond=cond)
        b = x.shape[0]
        if cond_token_length(cond) == cond_token_length(uncond):
            x_in = torch.cat([x, x])
            sigma_in = torch.cat([sigma, sigma])
            out = self.inner_model(x_in, sigma_in, cond=cat_conds([cond, uncond]))
            denoised_cond, denoised_uncond = out[:b], out[b:]
        else:
            denoised_cond = self.inner_model(x, sigma, cond=cond)
            denoised_uncond = self.inner_model(x, sigma, cond=uncond)
        return denoised_uncond + (denoised_cond - denoised_uncond) * cond_scale


def _negatives(negative: str | list[str], n: int) -> list[str]:
    if isinstance(negative, str):
        return [negative] * n
    negatives = list(negative)
    if len(negatives) != n:
        raise ValueError(f"{len(negatives)} negative prompts for {n} prompts")
    return negatives


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """ldm's uniform DDIM timesteps ``range(0, 1000, 1000 // steps) + 1`` (ascending, clipped to 999)."""
    c = max(num_train_timesteps // steps, 1)
    return (torch.arange(0, num_train_timesteps, c) + 1).clamp(max=num_train_timesteps - 1)


def sampler_sigmas(model_wrap: nn.Module, sampler: str, steps: int, karras: bool) -> torch.Tensor:
    """Descending noise levels ``[steps + 1]`` for a sampler (last one 0, except DDIM: sigma(t=0))."""
    from . import kdiffusion as ks

    if sampler == "ddim":
        t = ddim_timesteps(steps).flip(0).to(model_wrap.sigmas.device)
        sig = model_wrap.t_to_sigma(t)
        return torch.cat([sig, model_wrap.sigmas[:1]])
    if karras:
        return ks.get_sigmas_karras(
            n=steps,
            sigma_min=model_wrap.sigmas[0].item(),
            sigma_max=model_wrap.sigmas[-1].item(),
            device=model_wrap.sigmas.device,
        )
    return model_wrap.get_sigmas(steps)


def image_noise(seed: int, n: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Per-image CPU noise ``[n, *shape]``: image i from ``torch.Generator().manual_seed(seed + i)``
    (the WebUI's seeds). Returns the generators too, for the ancestral noise that follows."""
    gens = [torch.Generator(device="cpu").manual_seed(int(seed) + i) for i in range(n)]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


def sample(
    model: nn.Module,
    prompts: list[str],
    negative: str | list[str] = "",
    steps: int = 20,
    cfg_scale: float = 3.0,
    sampler: str = "dpmpp_2m",
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    karras: bool = True,
    denoiser: Callable[..., torch.Tensor] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """Sample latents ``[B, C, H, W]`` from a tiny model (`SD1Model` or `SDXLModel`), under ``no_grad``.

    - ``shape``: latent ``(C, H, W)``; None = ``model.latent_shape`` ((4, 16, 16) for the default SD1
      layout, whose 4 levels need a 2×2 bottom; (4, 8, 8) for 2-level UNets), else (4, 8, 8);
    - prompts → ``model.get_learned_conditioning``; ``negative``: one string for all or one per prompt
      (SDXL models get ``is_negative_prompt=True``: all-empty negatives become zeros, as in A1111);
    - image i uses seed ``seed + i`` (initial noise and, for ``euler_a``, its ancestral noise from the
      same per-image generator, like the WebUI), so a batch equals the images sampled one by one;
    - samplers: ``euler``, ``euler_a``, ``dpmpp_2m``, ``heun`` (k-diffusion; Karras sigmas when
      ``karras``, else the model's uniform-in-t schedule) and ``ddim``: deterministic DDIM (η = 0) with
      ldm's uniform timesteps, run exactly as Euler in k-diffusion space (DDIM η=0 ≡ Euler on
      ``x/√ᾱ``), started from unit noise and ending at ``t = 0`` scaled back by ``√ᾱ₀`` like ldm's DDIM.
      ``karras`` is ignored for DDIM. The WebUI's DDIM (timestep sampler) may pick a slightly
      different timestep list when 1000 is not a multiple of ``steps``;
    - ``denoiser``: replaces the `CFGDenoiser` (protocol in the module docstring); it is called as
      ``denoiser(x, sigma, cond=cond, uncond=uncond, cond_scale=cfg_scale)``;
    - ``callback``: k-diffusion's per-step callback (dict with ``x``, ``i``, ``sigma``, ``denoised``).
    """
    from . import kdiffusion as ks

    if sampler not in SAMPLERS:
        raise UnknownSamplerError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shape is None:
        shape = tuple(getattr(model, "latent_shape", (4, 8, 8)))
    prompts = list(prompts)
    n = len(prompts)
    device = next(model.parameters()).device
    with torch.no_grad():
        cond = model.get_learned_conditioning(prompts)
        if getattr(model, "is_sdxl", False):  # A1111 zeroes all-empty SDXL negatives
            uncond = model.get_learned_conditioning(_negatives(negative, n), is_negative_prompt=True)
        else:
            uncond = model.get_learned_conditioning(_negatives(negative, n))
        cfg = CFGDenoiser(model)
        den = denoiser if denoiser is not None else cfg
        model_wrap = cfg.inner_model
        sigmas = sampler_sigmas(model_wrap, sampler, steps, karras).to(device)
        noise, gens = image_noise(seed, n, tuple(shape))
        noise = noise.to(device)
        extra = {"cond": cond, "uncond": uncond, "cond_scale": float(cfg_scale)}
        if sampler == "ddim":
            x = noise * (1.0 + sigmas[0] ** 2).sqrt()
            x = ks.sample_euler(den, x, sigmas, extra_args=extra, callback=callback, disable=True)
            return x / (1.0 + sigmas[-1] ** 2).sqrt()
        x = noise * sigmas[0]
        if sampler == "euler":
            return ks.sample_euler(den, x, sigmas, extra_args=extra, callback=callback, disable=True)
        if sampler == "heun":
            return ks.sample_heun(den, x, sigmas, extra_args=extra, callback=callback, disable=True)
        if sampler == "dpmpp_2m":
            return ks.sample_dpmpp_2m(den, x, sigmas, extra_args=extra, callback=callback, disable=True)

        def noise_sampler(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device)

        return ks.sample_euler_ancestral(
            den, x, sigmas, extra_args=extra, callback=callback, disable=True, noise_sampler=noise_sampler
        )
