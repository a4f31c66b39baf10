"""Layouts (user ratio strings, boxes, colour masks), the layout mask rule, and the localising layers."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.clora.attention import (
    AttentionCapture,
    localizing_layers,
    lowest_resolution_layers,
    resize_maps,
)
from lib_loraclr.clora.layout import (
    LayoutError,
    box_masks,
    check_boxes,
    color_regions,
    columns,
    layout_weights,
    parse_ratio_layout,
    resize_regions,
)
from lib_loraclr.clora.masks import concept_scores, layout_masks, slot_masks
from lib_loraclr.models.sd import build_tiny_sd1, build_tiny_sdxl


def test_ratio_strings_as_regional_prompter_reads_them():
    assert parse_ratio_layout("1,1") == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    assert parse_ratio_layout("1,2,1") == [
        (0.0, 0.0, 0.25, 1.0),
        (0.25, 0.0, 0.75, 1.0),
        (0.75, 0.0, 1.0, 1.0),
    ]
    # rows: "height, col, col; height" -> two cells on top, one full-width cell below
    assert parse_ratio_layout("1,1,1;1") == [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)]
    assert parse_ratio_layout("1,1", rows=True) == [(0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)]
    assert columns(3) == "1,1,1"
    for bad in ("", "1,x", "1,,1", "0,1", "-1,1"):
        with pytest.raises(LayoutError):
            parse_ratio_layout(bad)


def test_box_masks_cover_each_cell_once():
    m = box_masks(parse_ratio_layout("1,2,1"), (4, 8))
    assert m.shape == (3, 4, 8)
    assert torch.equal(m.sum(0), torch.ones(4, 8))
    assert m[0].sum() == 8 and m[1].sum() == 16 and m[2].sum() == 8
    over = box_masks(check_boxes([(0, 0, 0.75, 1), (0.25, 0, 1, 1)]), (2, 4))
    assert torch.equal(over.sum(0), torch.ones(2, 4))  # the overlap goes to the first box
    with pytest.raises(LayoutError):
        check_boxes([(0.5, 0, 0.4, 1)])
    with pytest.raises(LayoutError):
        check_boxes([(0, 0, 1)])


def test_colour_mask_regions_ordered_row_major():
    img = torch.zeros(8, 16, 3, dtype=torch.uint8)
    img[:, 9:, 0] = 255  # red on the right
    img[:, :7, 1] = 200  # green on the left
    regions = color_regions(img)
    assert regions.shape == (2, 8, 16)
    assert regions[0, :, :7].all() and regions[1, :, 9:].all()  # left first
    assert not regions[:, :, 7:9].any()  # black stays background
    small = resize_regions(regions, (4, 8))
    assert small.shape == (2, 4, 8) and small[0, :, 0].all()
    with pytest.raises(LayoutError):
        color_regions(torch.zeros(4, 4, 3))


def test_layout_weights_bind_regions_to_concepts():
    regions = box_masks(parse_ratio_layout("1,1,1"), (2, 6))
    w = layout_weights(regions, 2, batch=3, assign=[2, 0])
    assert w.shape == (3, 3, 2, 6)
    assert torch.equal(w[0, 1], regions[2]) and torch.equal(w[0, 2], regions[0])
    assert torch.equal(w[0, 0], regions[1])  # the unassigned middle column is background
    assert torch.equal(w.sum(1), torch.ones(3, 2, 6))
    with pytest.raises(LayoutError):
        layout_weights(regions, 2, assign=[1, 1])
    with pytest.raises(LayoutError):
        layout_weights(regions, 4)
    with pytest.raises(LayoutError):
        layout_weights(regions, 1, assign=[3])


def _maps_with_blobs(hw=(4, 8)):
    """Branch maps [1, 3, N, 4]: concept 0's word (token 1) peaks left, concept 1's (token 2) right,
    in the base branch; the own branches put both on the left (a LoRA that does not localise)."""
    h, w = hw
    n = h * w
    maps = torch.full((1, 3, n, 4), 0.01)
    grid = torch.zeros(h, w)
    left, right = grid.clone(), grid.clone()
    left[:, : w // 2] = 1.0
    right[:, w // 2 :] = 1.0
    maps[0, 0, :, 1] = left.flatten() + 0.1
    maps[0, 0, :, 2] = right.flatten() + 0.1
    maps[0, 1, :, 1] = left.flatten()
    maps[0, 2, :, 2] = left.flatten()
    groups = [[[1], [1], [1]], [[2], [2], [2]]]
    return maps, groups


def test_layout_rule_concepts_compete_and_base_source_localises():
    maps, groups = _maps_with_blobs()
    truth = slot_masks(1, 2, [0, 1], (4, 8))
    m = layout_masks(maps, groups, (4, 8), background=0.25, source="base")
    assert torch.equal(m, truth)
    assert torch.equal(m.sum(1), torch.ones(1, 4, 8))  # one-hot: no position shared
    own = layout_masks(maps, groups, (4, 8), source="own")
    assert not own[0, 2, :, 4:].any()  # the own branch misplaces concept 1: it loses its slot
    s = concept_scores(maps, groups, "both")
    assert s.shape == (1, 3, 32) and float(s[:, 0].abs().max()) == 0.0
    # a background floor: positions where no concept map reaches it go to branch 0
    floor = layout_masks(maps, groups, (4, 8), background=1.01)
    assert floor.sum((2, 3))[0, 0] == 32
    with pytest.raises(ValueError):
        concept_scores(maps, groups, "nowhere")


def test_localizing_layers_next_to_the_bottleneck():
    sd1 = build_tiny_sd1(seed=0).model.diffusion_model
    names = localizing_layers(sd1)
    blocks = {".".join(n.split(".")[:2]) if not n.startswith("middle") else "middle_block" for n in names}
    low = {".".join(n.split(".")[:2]) for n in lowest_resolution_layers(sd1)}
    inputs = sorted(b for b in low if b.startswith("input"))
    outputs = sorted((b for b in low if b.startswith("output")), key=lambda b: int(b.split(".")[1]))
    assert blocks == {inputs[-1], "middle_block", outputs[0]}
    xl = build_tiny_sdxl(seed=0).model.diffusion_model
    assert any(n.startswith("middle_block") for n in localizing_layers(xl))


def test_capture_of_several_resolutions_resamples_to_the_finest():
    from lib_loraclr.clora.errors import CaptureError

    m = build_tiny_sd1(seed=0)
    unet = m.model.diffusion_model
    layers = localizing_layers(unet)
    x = torch.randn(2, 4, 16, 16)
    ctx = torch.randn(2, 77, unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features)
    t = torch.full((2,), 500.0)
    with torch.no_grad(), AttentionCapture(unet, layers) as cap:
        cap.latent_hw = (16, 16)
        unet(x, t, context=ctx)
        sizes = sorted(cap._sums)
        maps = cap.maps()
    assert len(sizes) == 2  # the middle block sits one level below the input/output blocks
    assert maps.shape == (2, sizes[-1], 77)
    # every query position's row stays a probability distribution over the tokens
    assert torch.allclose(maps.sum(-1), torch.ones_like(maps.sum(-1)), atol=1e-4)
    with pytest.raises(CaptureError, match="latent_hw"), torch.no_grad(), AttentionCapture(unet, layers):
        unet(x, t, context=ctx)


def test_resize_maps_keeps_distributions():
    a = torch.rand(2, 3, 8, 5).softmax(-1)
    up = resize_maps(a, (2, 4), (4, 8))
    down = resize_maps(up, (4, 8), (2, 4))
    assert up.shape == (2, 3, 32, 5)
    assert torch.allclose(up.sum(-1), torch.ones(2, 3, 32), atol=1e-5)
    assert torch.allclose(down, a, atol=0.35)


def test_other_content_words_claim_the_background():
    """ "a sks and a 7": the 7's map (base branch) takes the positions where it beats the concept."""
    maps, groups = _maps_with_blobs()
    one = [groups[0]]  # only concept 0 (left); token 2 is now another content word (right)
    m = layout_masks(maps[:, :2], one, (4, 8), background=0.0)
    assert bool(m[0, 1].all())  # no competitor: the concept takes the whole image (= the single LoRA)
    m = layout_masks(maps[:, :2], one, (4, 8), background=0.0, background_tokens=[2])
    assert bool(m[0, 1, :, :4].all()) and not bool(m[0, 1, :, 4:].any())
    assert bool(m[0, 0, :, 4:].all())


def test_content_tokens_skip_stop_words_and_concepts():
    from lib_loraclr.clora.tokens import Concept, branch_prompts, content_tokens
    from lib_loraclr.models.sd import build_tiny_sd1

    tp = build_tiny_sd1(seed=0).prompt_encoder.token_positions
    prompt = "a cat and a dog in a park"
    park = content_tokens(prompt, [(2, 5), (12, 15)], tp)  # cat and dog taken by concepts
    assert park == tp(prompt, "park")
    bp = branch_prompts(prompt, [Concept("sks", "cat")], tp)
    assert bp.background_tokens == sorted(tp(prompt, "dog") + tp(prompt, "park"))
