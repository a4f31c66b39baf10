"""Branch prompts and token groups with the real CLIP tokenizer."""

from __future__ import annotations

import pytest

from lib_loraclr.clora import Concept, ConceptNotFoundError, branch_prompts
from lib_loraclr.models.tokenizer import clip_tokenizer
from lib_loraclr.text import PromptEncoder


class _NoModel:
    pass


@pytest.fixture(scope="module")
def positions():
    enc = PromptEncoder(clip_tokenizer(), _NoModel())  # tokenisation only
    return enc.token_positions


def test_insert_mode_groups_and_masks(positions):
    bp = branch_prompts("a cat and a dog", [Concept("sks", "cat"), Concept("<d8>", "dog")], positions)
    assert bp.prompts == ["a cat and a dog", "a sks cat and a dog", "a cat and a <d8> dog"]
    # BOS=0, a=1, cat=2, and=3, a=4, dog=5; "<d8>" is 4 tokens
    assert bp.groups[0] == [[2], [2, 3], [2]]
    assert bp.groups[1] == [[5], [6], [5, 6, 7, 8, 9]]
    assert bp.mask_tokens == [[], [2, 3], [5, 6, 7, 8, 9]]


def test_replace_mode_and_repeated_words(positions):
    bp = branch_prompts(
        "a dog next to a cat, a dog toy",
        [Concept("ohwx", "cat"), Concept("sks", "dog")],
        positions,
        mode="replace",
    )
    assert bp.prompts[1] == "a dog next to a ohwx, a dog toy"
    assert bp.prompts[2] == "a sks next to a cat, a dog toy"
    assert bp.groups[1][0] == [2]  # the first "dog", not the one in "dog toy"
    assert bp.groups[1][2] == [2]  # "sks" at the place of the first dog
    assert bp.groups[0] == [[6], [6], [6]]
    assert bp.mask_tokens[1] == [6] and bp.mask_tokens[2] == [2]


def test_multi_word_binding(positions):
    bp = branch_prompts(
        "a red car and a small house", [Concept("<car-lora>", "red car"), Concept("sks", "house")], positions
    )
    n_trig = len(positions("<car-lora>", "<car-lora>"))
    assert n_trig > 1
    assert bp.groups[0][0] == [2, 3]
    assert bp.groups[0][1] == list(range(2, 2 + n_trig + 2))
    assert bp.groups[1][1] == [7 + n_trig]


def test_missing_words_raise(positions):
    with pytest.raises(ConceptNotFoundError, match="'horse'"):
        branch_prompts("a cat and a dog", [Concept("sks", "horse")], positions)
    with pytest.raises(ConceptNotFoundError, match="overlapping"):
        branch_prompts("a cat and a dog", [Concept("sks", "cat"), Concept("ohwx", "a cat")], positions)
    with pytest.raises(ConceptNotFoundError, match="empty"):
        branch_prompts("a cat", [Concept("", "cat")], positions)


def test_region_prompts_give_each_concept_its_own_phrase(positions):
    """The routed mode's short region prompts: branch k = concept k's trigger and words alone, positions in
    that prompt; branch 0 (the scene) and the background tokens unchanged."""
    from lib_loraclr.clora.tokens import region_prompts

    bp = branch_prompts("a cat and a dog", [Concept("sks", "cat"), Concept("<d8>", "dog")], positions)
    rp = region_prompts(bp, positions)
    assert rp.prompts == ["a cat and a dog", "sks cat", "<d8> dog"]
    assert rp.groups == [[[2], [1, 2], []], [[5], [], [1, 2, 3, 4, 5]]]
    assert rp.mask_tokens == [[], [1, 2], [1, 2, 3, 4, 5]]
    assert rp.background_tokens == bp.background_tokens and rp.concepts == bp.concepts
    assert bp.prompts[1] == "a sks cat and a dog"  # the input is not changed
