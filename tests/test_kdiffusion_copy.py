"""`lib_loraclr.models.kdiffusion` (the library's copy, used instead of the host's ``k_diffusion``, which Forge
Neo replaces with ComfyUI's: no ``CompVisDenoiser``) gives the same numbers and the same random draws as
k-diffusion 0.1.1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_loraclr.models import kdiffusion as mine

ke = pytest.importorskip("k_diffusion.external")
ks = pytest.importorskip("k_diffusion.sampling")


class _Eps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0))
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def apply_model(self, x, t, cond):
        return 0.5 * self.conv(x) + cond.mean() + t.view(-1, 1, 1, 1) / 1000


def test_schedule_is_k_diffusions():
    m = _Eps()
    a, b = ke.CompVisDenoiser(m), mine.CompVisDenoiser(m)
    for n in (1, 2, 5, 20):
        assert torch.equal(a.get_sigmas(n), b.get_sigmas(n))
        lo, hi = a.sigmas[0].item(), a.sigmas[-1].item()
        assert torch.equal(ks.get_sigmas_karras(n, lo, hi), mine.get_sigmas_karras(n, lo, hi))
    s = torch.tensor([0.05, 0.5, 3.0, 14.0])
    assert torch.equal(a.sigma_to_t(s), b.sigma_to_t(s))
    assert torch.equal(a.sigma_to_t(s, quantize=True), b.sigma_to_t(s, quantize=True))
    t = torch.tensor([0.0, 3.3, 998.7, 999.0])
    assert torch.equal(a.t_to_sigma(t), b.t_to_sigma(t))


@pytest.mark.parametrize("name", ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m"])
def test_samplers_are_k_diffusions(name):
    m = _Eps()
    a, b = ke.CompVisDenoiser(m), mine.CompVisDenoiser(m)
    sigmas = a.get_sigmas(6)
    cond = torch.randn(2, 77, 8)
    out = []
    for den, lib in ((a, ks), (b, mine)):
        torch.manual_seed(1)
        x = torch.randn(2, 4, 8, 8) * sigmas[0]
        y = getattr(lib, name)(den, x, sigmas, extra_args={"cond": cond}, disable=True)
        out.append((y, torch.randn(3)))  # the global RNG is left in the same state
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun", "dpmpp_2m", "ddim"])
def test_sampling_does_not_need_the_hosts_k_diffusion(monkeypatch, sampler):
    """Inside Forge Neo, ``k_diffusion`` is ComfyUI's (no ``external.CompVisDenoiser``): the library's sampling
    (the merge's feature runs, the refinement, the demo) must not import it. Same images as with it."""
    import sys
    import types

    from lib_loraclr.models.sampling import sample
    from lib_loraclr.models.sd import build_tiny_sd1

    model = build_tiny_sd1(seed=0)
    kw = dict(negative="", steps=3, cfg_scale=3.0, sampler=sampler, seed=5, shape=(4, 8, 16))
    want = sample(model, ["a sks"], **kw)
    comfy = types.ModuleType("k_diffusion")
    comfy.external = types.ModuleType("k_diffusion.external")  # only ForgeScheduleLinker there in Neo
    comfy.sampling = types.ModuleType("k_diffusion.sampling")
    for name, mod in (
        ("k_diffusion", comfy),
        ("k_diffusion.external", comfy.external),
        ("k_diffusion.sampling", comfy.sampling),
    ):
        monkeypatch.setitem(sys.modules, name, mod)
    assert torch.equal(sample(model, ["a sks"], **kw), want)
