"""CLoRA in the quality benchmark (`bench/quality.py`: ``clora`` / ``clora_paper``) on the measuring world."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import quality as q

from lib_loraclr.clora import Concept as ClConcept
from lib_loraclr.clora import ConceptNotFoundError, branch_prompts

NAMES = ["sks", "ohwx", "mth", "yte"]  # two class concepts (digits 2, 5), two identities of digit 1


@pytest.fixture(scope="module")
def world():
    w = q.load_world(names=NAMES, steps=4)
    return w


def _method(world, **kw) -> q.CloraMethod:
    m = q.CloraMethod("recommended", **kw)
    m.setup(world, NAMES)
    return m


def test_registered_with_the_recommended_and_paper_schedules(world):
    a, b = q.METHODS["clora"](), q.METHODS["clora_paper"]()
    a.setup(world, NAMES)
    b.setup(world, NAMES)
    assert (a.name, b.name) == ("clora", "clora_paper")
    assert a.options.maps_from == "cond" and b.options.maps_from == "both"
    assert a.options.total_updates(world.steps) < b.options.total_updates(world.steps)


def test_concepts_draw_the_digits_the_base_branch_names(world):
    assert [world.concepts[n].digit for n in NAMES] == [2, 5, 1, 1]


@pytest.mark.parametrize("words", [["sks", "ohwx"], ["ohwx", "sks"], ["7", "sks"], ["ohwx", "3"], ["sks"]])
def test_branch_layout_equals_the_library_replace_mode(world, words):
    m = _method(world)
    bw, groups, mask_tokens = m.branch_layout(world, words)
    base = [str(world.concepts[w].digit) if w in world.concepts else w for w in words]
    concepts = [ClConcept(w, str(world.concepts[w].digit)) for w in words if w in world.concepts]
    tp = world.model.prompt_encoder.token_positions
    bp = branch_prompts(q.wdata.canonical_prompt(base), concepts, tp, mode="replace")
    assert [q.wdata.canonical_prompt(b) for b in bw] == bp.prompts
    assert groups == bp.groups and mask_tokens == bp.mask_tokens


def test_repeated_digits_bind_by_slot(world):
    """mth and yte both draw a 1: base "a 1 and a 1"; the library binds the second concept to the second "1"
    and agrees with the benchmark's slot binding."""
    m = _method(world)
    bw, groups, mask_tokens = m.branch_layout(world, ["mth", "yte"])
    assert bw == [["1", "1"], ["mth", "1"], ["1", "yte"]]
    assert groups == [[[2], [2], [2]], [[5], [5], [5]]] and mask_tokens == [[], [2], [5]]
    tp = world.model.prompt_encoder.token_positions
    bp = branch_prompts("a 1 and a 1", [ClConcept("mth", "1"), ClConcept("yte", "1")], tp, mode="replace")
    assert bp.prompts == ["a 1 and a 1", "a mth and a 1", "a 1 and a yte"]
    assert bp.groups == groups and bp.mask_tokens == mask_tokens
    with pytest.raises(ConceptNotFoundError, match="overlapping"):  # a third "1" concept has no "1" left
        branch_prompts("a 1 and a 1", [ClConcept(t, "1") for t in ("mth", "yte", "sks")], tp, mode="replace")


def test_a_pattern_batch_routes_each_branch_to_its_concepts_lora(world):
    m = _method(world)
    m.denoiser(world, [["ohwx", "sks"], ["ohwx", "sks"]])
    assert m.last_branches[0] == []
    assert m.last_branches[1][0][0] is world.loras["ohwx"] and m.last_branches[2][0][0] is world.loras["sks"]
    assert m.last_prompts == [["a 5 and a 2"] * 2, ["a ohwx and a 2"] * 2, ["a 5 and a sks"] * 2]
    # compose requests with different known digits share one batch, each row its own prompt
    m.denoiser(world, [["sks", "7"], ["sks", "3"]])
    assert m.last_prompts == [["a 2 and a 7", "a 2 and a 3"], ["a sks and a 7", "a sks and a 3"]]
    assert m.last_denoiser.n_branches == 2 and not m.last_denoiser.can_update  # one concept: masks only


def test_base_requests_are_plain_sampling_bit_for_bit(world):
    reqs = [["3"], ["7"], ["0"]]
    m = _method(world)
    base = q.METHODS["base"]()
    base.setup(world, NAMES)
    assert torch.equal(m.generate(world, reqs, 3.0, 11), base.generate(world, reqs, 3.0, 11))


def test_one_concept_branch_with_a_full_mask_is_the_single_lora(world):
    """Background floor 0 (the default) and no other content word: the concept mask covers every pixel, so
    the fused prediction is the concept branch alone, i.e. the single LoRA (applied by routing hooks
    instead of patched weights) when the uncond half is the branch's own (base_uncond = 0)."""
    reqs = [["sks"], ["sks"], ["ohwx"]]
    m = _method(world, base_uncond=0.0)
    single = q.METHODS["single"]()
    single.setup(world, NAMES)
    a, b = m.generate(world, reqs, 3.0, 5), single.generate(world, reqs, 3.0, 5)
    assert (a - b).abs().max() < 1e-3
    # a floor hands part of the image to the base branch: different images
    c = _method(world, mask_background=0.5, base_uncond=0.0).generate(world, reqs, 3.0, 5)
    assert (c - b).abs().max() > 1e-2
    # the default guides from the base model's uncond: not the single LoRA's CFG (the test in
    # test_clora_regional checks it is exactly u_base + s·(c_lora − u_base))
    assert (_method(world).generate(world, reqs, 3.0, 5) - b).abs().max() > 1e-2


def test_multi_concept_requests_update_the_latent_and_lower_the_loss(world):
    m = _method(world, latent_update=True)
    m.generate(world, [["sks", "ohwx"]] * 3, 3.0, 0)
    hist = m.last_denoiser.history
    first = [h["loss"] for h in hist if h["step"] == 0.0]
    assert len(first) == 1 + m.options.refinement_iters
    assert first[-1] < first[0]


def test_a_merged_lora_with_a_layout_is_routed_per_concept_as_in_the_webui(world):
    """``loraclr_routed_layout``: the merged LoRA is every concept's LoRA of a routed pass with a layout (the
    WebUI's ``<clora:merged:trigger=…>`` rows), each region reading its own short prompt; no merge is run here
    (a LoRA stands in for the merged one)."""
    m = q.METHODS["loraclr_routed_layout"]()
    q.Method.setup(m, world, NAMES[:2])
    m.deltas = world.loras["mth"]  # stands in for the merged LoRA
    m.inner_method = q.CloraMethod("recommended", m.name, **m.clora)
    m.inner_method.setup(world, NAMES[:2])
    out = m.generate(world, [["sks", "ohwx"], ["3", "7"]], 3.0, 0)
    assert out.shape == (2, 1, 8, 16) and bool(torch.isfinite(out).all())
    assert [b[0][0] for b in m.inner_method.last_branches[1:]] == [world.loras["mth"]] * 2
    assert m.inner_method.options.base_uncond == 1.0
    assert q.METHODS["loraclr_routed_layout_own_uncond"]().clora["base_uncond"] == 0.0
