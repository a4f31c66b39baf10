"""Per-branch LoRA routing by forward hooks: batched rows == branches run one by one == merged weights."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.apply import patched
from lib_loraclr.clora import UNET_PREFIX, RoutedLoras, RoutingError, count_hooks, te_branch_conds, te_key
from lib_loraclr.clora.synthetic import random_lora
from lib_loraclr.deltas import DeltaSet, LoraModule
from lib_loraclr.models.sd import build_tiny_sd1


@pytest.fixture(scope="module")
def model():
    return build_tiny_sd1(seed=3)


def _loras(model):
    unet = model.model.diffusion_model
    a = random_lora(unet, 1, prefix=UNET_PREFIX, conv=True)
    b = random_lora(unet, 2, prefix=UNET_PREFIX, targets=("attn2.to_k", "attn2.to_v", "ff.net.2", "proj_in"))
    # a dense delta (LyCORIS-like) on one conv
    key = UNET_PREFIX + "input_blocks.1.0.out_layers.3"
    w = unet.get_submodule("input_blocks.1.0.out_layers.3").weight
    dense = DeltaSet(
        {key: LoraModule(key, dense=torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * 0.05)}
    )
    style = random_lora(unet, 9, std=0.2, prefix=UNET_PREFIX, targets=("attn1.to_v",))
    return a, b, dense, style


def _inputs(b: int):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, 4, 16, 16, generator=g),
        torch.full((b,), 321.0),
        torch.randn(b, 77, 64, generator=g),
    )


def test_batched_rows_equal_each_branch_alone(model):
    unet = model.model.diffusion_model
    a, b, dense, style = _loras(model)
    branches = [[(style, 0.8)], [(a, 1.0), (style, 0.8)], [(b, 0.7), (dense, 1.0), (style, 0.8)]]
    rows = [2, 0, 1, 1, 2, 0]
    x, t, c = _inputs(len(rows))
    x[1], x[2], c[1], c[2] = x[0], x[0], c[0], c[0]  # same input in branches 2, 0, 1
    with torch.no_grad(), RoutedLoras(unet, branches, prefix=UNET_PREFIX) as router:
        assert router.n_modules > 40
        router.set_rows(rows)
        batched = unet(x, t, context=c)
        alone = torch.empty_like(batched)
        for k in range(3):
            idx = [i for i, r in enumerate(rows) if r == k]
            router.select(k)
            alone[idx] = unet(x[idx], t[idx], context=c[idx])
    assert (batched - alone).abs().max().item() <= 1e-5
    # the branches really differ
    assert min((batched[i] - batched[j]).abs().max().item() for i, j in ((0, 1), (0, 2), (1, 2))) > 1e-3


def test_routed_branch_equals_merged_weights(model):
    unet = model.model.diffusion_model
    a, _b, dense, _style = _loras(model)
    x, t, c = _inputs(2)
    with torch.no_grad():
        with RoutedLoras(unet, [[], [(a, 0.6), (dense, 1.0)]], prefix=UNET_PREFIX) as router:
            router.select(1)
            routed = unet(x, t, context=c)
            router.select(0)
            base_routed = unet(x, t, context=c)
        base = unet(x, t, context=c)
        with patched(unet, [(a, 0.6), (dense, 1.0)], prefix=UNET_PREFIX):
            merged = unet(x, t, context=c)
    assert torch.equal(base_routed, base)
    assert (routed - merged).abs().max().item() <= 1e-5
    assert (routed - base).abs().max().item() > 1e-3


def test_hooks_removed_and_weights_bit_identical_after_exception(model):
    unet = model.model.diffusion_model
    a, b, _dense, _style = _loras(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_hooks = count_hooks(model)
    x, t, c = _inputs(2)
    with (
        pytest.raises(RuntimeError, match="boom"),
        RoutedLoras(unet, [[(a, 1.0)], [(b, 1.0)]], prefix=UNET_PREFIX) as router,
    ):
        router.set_rows([0, 1])
        assert count_hooks(model) > n_hooks
        with torch.no_grad():
            unet(x, t, context=c)
        raise RuntimeError("boom")
    assert count_hooks(model) == n_hooks
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_row_count_mismatch_is_a_clear_error(model):
    unet = model.model.diffusion_model
    a, *_ = _loras(model)
    x, t, c = _inputs(3)
    with RoutedLoras(unet, [[], [(a, 1.0)]], prefix=UNET_PREFIX) as router:
        router.set_rows([0, 1])
        with pytest.raises(RoutingError, match="3 rows"), torch.no_grad():
            unet(x, t, context=c)
    with pytest.raises(RoutingError, match="out of range"):
        RoutedLoras(unet, [[], [(a, 1.0)]], prefix=UNET_PREFIX).set_rows([0, 2])


def test_bad_keys_raise_before_hooking(model):
    unet = model.model.diffusion_model
    n = count_hooks(unet)
    missing = DeltaSet(
        {
            UNET_PREFIX + "nope.to_k": LoraModule(
                UNET_PREFIX + "nope.to_k", down=torch.ones(1, 2), up=torch.ones(2, 1)
            )
        }
    )
    with pytest.raises(RoutingError, match="names no module"):
        RoutedLoras(unet, [[(missing, 1.0)]], prefix=UNET_PREFIX)
    fused_key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj:q"
    fused = DeltaSet({fused_key: LoraModule(fused_key, down=torch.ones(1, 2), up=torch.ones(2, 1))})
    with pytest.raises(RoutingError, match="names no module"):  # SD1 has no OpenCLIP attention there
        RoutedLoras(model, [[(fused, 1.0)]])
    key = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    wrong = DeltaSet({key: LoraModule(key, down=torch.ones(2, 3), up=torch.ones(5, 2))})
    with pytest.raises(RoutingError, match="does not match"):
        RoutedLoras(unet, [[(wrong, 1.0)]], prefix=UNET_PREFIX)
    assert count_hooks(unet) == n


def test_text_encoder_lora_per_branch(model):
    te = random_lora(
        model.cond_stage_model.transformer,
        4,
        prefix="cond_stage_model.transformer.",
        targets=("q_proj", "v_proj", "fc1"),
    )
    assert len(te) == 6
    prompts = [["a cat", ""], ["a sks cat", ""]]
    with torch.no_grad():
        router = RoutedLoras(model, [[], [(te, 1.0)]], key_filter=te_key)
        conds = te_branch_conds(model.get_learned_conditioning, prompts, router)
        plain0 = model.get_learned_conditioning(prompts[0])
        with patched(model, te):
            merged1 = model.get_learned_conditioning(prompts[1])
    assert count_hooks(model) == 0
    assert torch.equal(conds[0], plain0)
    assert (conds[1] - merged1).abs().max().item() <= 1e-5
    assert (conds[1] - model.get_learned_conditioning(prompts[1])).abs().max().item() > 1e-3
