"""Comparing final latents with the recordings in ``tests/data`` (``*_reference.safetensors``).

The recordings were made with torch 2.14 (CI's). Under another torch (A1111 1.10 ships 2.1.2) kernels round
differently: measured on torch 2.1.2, mask-fusion cases moved by ≤ 3.5e-5 (values up to ~400), while cases
with CLoRA's latent update moved by up to 0.54, because the update amplifies float noise on any torch (within
torch 2.1 itself, scaling every weight by 1 ± 1e-7 moved them by as much). So under another torch the fusion
cases are compared at 1e-4 and the latent-update cases only for shape and finiteness. The same holds for the
recording torch on a CPU whose kernels differ (`torch.backends.cpu.get_cpu_capability()`): on an AVX2-only
machine (AMD EPYC, 2026-12-07) the fusion cases moved by ≤ 5.4e-5 and a latent-update case by 0.05.
"""

from __future__ import annotations

import torch

RECORDED_TORCH = (2, 14)  # torch (major, minor) of the recordings in tests/data
RECORDED_CPU = "AVX512"  # CPU kernel family assumed of the recording machine (an AVX2 one differs)


def recorded_torch() -> bool:
    """Whether the running torch, and its CPU kernels, are the ones the recordings were made with."""
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return (major, minor) == RECORDED_TORCH and torch.backends.cpu.get_cpu_capability() == RECORDED_CPU


def assert_matches_reference(
    name: str, got: torch.Tensor, ref: torch.Tensor, *, atol: float | None, latent_update: bool
) -> None:
    """``got`` equals ``ref`` (``atol=None``: bit for bit; else within ``atol`` and rtol 1e-5) under the
    recording torch; under another torch, see the module docstring."""
    assert got.shape == ref.shape and bool(torch.isfinite(got).all()), name
    diff = float((got - ref).abs().max())
    if not recorded_torch():
        if not latent_update:
            assert torch.allclose(got, ref, atol=1e-4, rtol=1e-5), (name, diff)
        return
    if atol is None:
        assert torch.equal(got, ref), (name, diff)
    else:
        assert torch.allclose(got, ref, atol=atol, rtol=atol), (name, diff)
