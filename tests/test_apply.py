"""Weight patching: deltas land where the canonical key says, and every weight comes back bit-for-bit."""

import pytest
import torch
from torch import nn

from lib_loraclr.apply import patched, summed_deltas, target_weight
from lib_loraclr.deltas import DeltaSet, LoraModule


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.model = nn.Module()
    m.model.diffusion_model = nn.Sequential(nn.Linear(6, 5), nn.Conv2d(5, 4, 1))
    m.te = nn.MultiheadAttention(6, 2)
    return m


def _lora(key: str, out: int, inp: int, conv: bool = False, alpha: float | None = 2.0) -> LoraModule:
    g = torch.Generator().manual_seed(hash(key) % 1000)
    down = torch.randn(3, inp, generator=g)
    up = torch.randn(out, 3, generator=g)
    if conv:
        down, up = down[:, :, None, None], up[:, :, None, None]
    return LoraModule(key=key, down=down, up=up, alpha=alpha)


def test_patched_adds_delta_and_restores_bits() -> None:
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ds = DeltaSet(
        {
            "model.diffusion_model.0": _lora("model.diffusion_model.0", 5, 6),
            "model.diffusion_model.1": _lora("model.diffusion_model.1", 4, 5, conv=True),
            "te.in_proj:k": _lora("te.in_proj:k", 6, 6, alpha=None),
        }
    )
    with patched(m, [(ds, 0.5)]):
        w = m.model.diffusion_model[0].weight
        expected = before["model.diffusion_model.0.weight"] + 0.5 * ds["model.diffusion_model.0"].delta()
        torch.testing.assert_close(w, expected)
        conv = m.model.diffusion_model[1].weight
        assert conv.shape == (4, 5, 1, 1)
        torch.testing.assert_close(
            conv, before["model.diffusion_model.1.weight"] + 0.5 * ds["model.diffusion_model.1"].delta()
        )
        inproj = m.te.in_proj_weight
        torch.testing.assert_close(inproj[:6], before["te.in_proj_weight"][:6])  # q untouched
        torch.testing.assert_close(
            inproj[6:12], before["te.in_proj_weight"][6:12] + 0.5 * ds["te.in_proj:k"].delta()
        )
        torch.testing.assert_close(inproj[12:], before["te.in_proj_weight"][12:])  # v untouched
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_patched_restores_after_exception_and_unknown_key() -> None:
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ds = DeltaSet({"model.diffusion_model.0": _lora("model.diffusion_model.0", 5, 6)})
    with pytest.raises(RuntimeError), patched(m, ds):
        raise RuntimeError("boom")
    bad = DeltaSet(
        {
            "model.diffusion_model.0": _lora("model.diffusion_model.0", 5, 6),
            "model.diffusion_model.9": _lora("model.diffusion_model.9", 5, 6),
        }
    )
    with pytest.raises(KeyError, match=r"diffusion_model\.9"), patched(m, bad):
        pass
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_prefix_skips_other_parts_and_summed_is_linear() -> None:
    m = _model()
    unet = m.model.diffusion_model
    a = DeltaSet(
        {
            "model.diffusion_model.0": _lora("model.diffusion_model.0", 5, 6),
            "cond_stage_model.x": _lora("cond_stage_model.x", 5, 6),
        }
    )
    b = DeltaSet({"model.diffusion_model.0": _lora("model.diffusion_model.0", 5, 6, alpha=1.0)})
    s = summed_deltas([(a, 1.0), (b, -2.0)])
    torch.testing.assert_close(
        s["model.diffusion_model.0"],
        a["model.diffusion_model.0"].delta() - 2.0 * b["model.diffusion_model.0"].delta(),
    )
    w0 = unet[0].weight.clone()
    with patched(unet, [(a, 1.0)], prefix="model.diffusion_model."):
        assert not torch.equal(unet[0].weight, w0)
    assert torch.equal(unet[0].weight, w0)
    weight, rows = target_weight(m, "te.in_proj:v")
    assert rows == slice(12, 18) and weight is m.te.in_proj_weight
