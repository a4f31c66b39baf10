"""Attention capture at the lowest-resolution cross-attention layers only."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.clora import (
    AttentionCapture,
    CaptureError,
    count_hooks,
    efficient_attention,
    lowest_resolution_layers,
)
from lib_loraclr.clora.attention import StopForward, map_hw, override_attention
from lib_loraclr.clora.official import _explicit_forward
from lib_loraclr.models.sd import build_tiny_sd1, build_tiny_sdxl


@pytest.fixture(scope="module")
def sd1():
    return build_tiny_sd1(seed=1)


def _inputs(b: int = 2, size: int = 16, ctx: int = 64):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, 4, size, size, generator=g),
        torch.full((b,), 400.0),
        torch.randn(b, 77, ctx, generator=g),
    )


def test_layer_choice_sd1_and_sdxl(sd1):
    names = lowest_resolution_layers(sd1.model.diffusion_model)
    assert names == [
        f"{blk}.1.transformer_blocks.0.attn2"
        for blk in (
            "input_blocks.7",
            "input_blocks.8",
            "output_blocks.3",
            "output_blocks.4",
            "output_blocks.5",
        )
    ]
    xl = build_tiny_sdxl(seed=0).model.diffusion_model
    xl_names = lowest_resolution_layers(xl)
    blocks = sorted({n.split(".transformer_blocks")[0] for n in xl_names})
    assert blocks == [
        "input_blocks.7.1",
        "input_blocks.8.1",
        "output_blocks.0.1",
        "output_blocks.1.1",
        "output_blocks.2.1",
    ]
    assert len(xl_names) == 10  # depth 2 in the tiny SDXL
    assert map_hw(16, 16, 16) == (4, 4) and map_hw(30, 12, 9) == (6, 5) and map_hw(9, 12, 9) == (3, 3)
    with pytest.raises(CaptureError):
        map_hw(7, 16, 16)


def test_capture_equals_explicit_softmax_and_leaves_output_untouched(sd1):
    unet = sd1.model.diffusion_model
    x, t, c = _inputs()
    layers = lowest_resolution_layers(unet)
    store: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        with override_attention(unet, _explicit_forward(store, set(layers))):
            ref_out = unet(x, t, context=c)
        ref = torch.stack([store[n][0] for n in layers]).mean(0)
        plain = unet(x, t, context=c)
        with efficient_attention(unet):
            sdpa_plain = unet(x, t, context=c)
            n0 = count_hooks(unet)
            with AttentionCapture(unet) as cap:
                out = unet(x, t, context=c)
                maps = cap.maps()
            assert count_hooks(unet) == n0
    assert torch.equal(out, sdpa_plain)  # capture does not change the output
    assert (sdpa_plain - plain).abs().max().item() < 1e-4  # SDPA ≈ ldm's explicit attention
    assert (ref_out - plain).abs().max().item() < 1e-5
    assert maps.shape == (2, 16, 77)
    assert (maps - ref).abs().max().item() < 1e-6
    assert (maps.sum(-1) - 1).abs().max().item() < 1e-5


def test_early_stop_gives_the_same_gradient(sd1):
    unet = sd1.model.diffusion_model
    x, t, c = _inputs()
    grads = []
    for stop in (False, True):
        xv = x.clone().requires_grad_()
        with AttentionCapture(unet) as cap:
            cap.stop_after_last = stop
            try:
                unet(xv, t, context=c)
                assert not stop
            except StopForward:
                assert stop
            loss = (cap.maps()[:, :, 3] ** 2).sum()
        grads.append(torch.autograd.grad(loss, xv)[0])
    assert grads[0].abs().max() > 0
    assert torch.equal(grads[0], grads[1])


def test_gradient_checkpoint_flag_is_switched_off_and_restored():
    from lib_loraclr.models.sd import SD1Config

    m = build_tiny_sd1(seed=2, config=SD1Config())
    unet = m.model.diffusion_model
    blocks = [b for b in unet.modules() if type(b).__name__ == "BasicTransformerBlock"]
    for b in blocks:
        b.checkpoint = True
    x, t, c = _inputs()
    xv = x.clone().requires_grad_()
    with AttentionCapture(unet) as cap:
        unet(xv, t, context=c)
        maps = cap.maps()
        assert sum(b.checkpoint is False for b in blocks) == 5
    assert all(b.checkpoint is True for b in blocks)
    assert maps.requires_grad
    (g,) = torch.autograd.grad(maps[:, :, 2].sum(), xv)
    assert g.abs().max() > 0


def test_bad_layers_and_incomplete_calls(sd1):
    unet = sd1.model.diffusion_model
    with pytest.raises(CaptureError, match="does not exist"):
        AttentionCapture(unet, ["input_blocks.99.attn2"])
    with pytest.raises(CaptureError, match="not an attention"):
        AttentionCapture(unet, ["input_blocks.1.0"])
    x, t, c = _inputs()
    mixed = ["input_blocks.1.1.transformer_blocks.0.attn2", "input_blocks.7.1.transformer_blocks.0.attn2"]
    with AttentionCapture(unet, mixed), torch.no_grad(), pytest.raises(CaptureError, match="one resolution"):
        unet(x, t, context=c)
    assert count_hooks(unet) == 0
    with AttentionCapture(unet) as cap, pytest.raises(CaptureError, match="no attention"):
        cap.maps()
