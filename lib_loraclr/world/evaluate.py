"""Scoring generated scenes with the world's judges.

A request is a list of slot words left to right (``["sks", "7"]``); its prompt is
``data.canonical_prompt(words)`` ("a sks and a 7"). A generated image ``[1, 8, 8k]`` is split into ``k``
slots; each slot gets a class from `DigitClassifier` (0–9 or not-a-digit) and, when that digit has
identity (style) concepts, the closest of them by `IdentityJudge`.

- a known digit ``"7"`` in a slot is *correct* when the classifier says 7 (any style);
- a class concept (``sks`` = 2) is *correct* when the classifier says its digit;
- an identity concept (``zas`` = a style of 7) is correct when the classifier says its digit AND the
  identity judge, choosing among all identity concepts of that digit (``zas`` vs ``bsf``), picks it;
- a scene is a *success* when the slots can be matched one-to-one to the requested items (order-free:
  the model may swap positions), i.e. every requested item appears, none is missing or duplicated.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lib_loraclr.world import data as wdata
from lib_loraclr.world.concepts import Concept
from lib_loraclr.world.judges import DigitClassifier, IdentityJudge


@dataclass
class SlotReading:
    """What one slot shows: ``digit`` (0–9, or ``NOT_A_DIGIT``) and ``style``: the identity concept whose
    style it has, among all identity concepts of that digit (None for digits without identity concepts)."""

    digit: int
    style: str | None


class SceneJudge:
    """Reads slots of generated scenes and matches them against requests."""

    def __init__(
        self, classifier: DigitClassifier, identity: IdentityJudge, concepts: dict[str, Concept]
    ) -> None:
        self.classifier = classifier
        self.identity = identity
        self.concepts = concepts
        self.styles: dict[int, list[str]] = {}
        for n, c in concepts.items():
            if c.kind == "identity":
                self.styles.setdefault(c.digit, []).append(n)

    def read(self, images: torch.Tensor) -> list[list[SlotReading]]:
        """``images [b, 1, 8, 8k]`` → per image, per slot, a `SlotReading`."""
        slots = wdata.split_slots(images.float())
        b, k = slots.shape[:2]
        flat = slots.reshape(b * k, 1, 8, 8)
        digits = self.classifier.predict(flat).tolist()
        styles: list[str | None] = [None] * len(digits)
        for dgt, names in self.styles.items():
            rows = [i for i, d in enumerate(digits) if d == dgt]
            if rows:
                for r, p in zip(rows, self.identity.identify(flat[rows], names).tolist()):
                    styles[r] = names[p]
        return [[SlotReading(digits[i * k + j], styles[i * k + j]) for j in range(k)] for i in range(b)]

    def matches(self, word: str, slot: SlotReading) -> bool:
        """Does ``slot`` show ``word`` (a known digit "7" or a concept name)?"""
        c = self.concepts.get(word)
        if c is None:
            return slot.digit == int(word)
        return slot.digit == c.digit and (c.kind == "class" or slot.style == c.name)

    def success(self, words: Sequence[str], reading: Sequence[SlotReading]) -> bool:
        """Every requested item shown by its own slot (order-free), nothing else: a perfect matching."""
        if len(words) != len(reading):
            return False
        return any(
            all(self.matches(w, reading[j]) for w, j in zip(words, perm))
            for perm in itertools.permutations(range(len(reading)))
        )

    def present(self, word: str, reading: Sequence[SlotReading]) -> bool:
        return any(self.matches(word, r) for r in reading)


def make_identity_judge(
    mean: torch.Tensor, components: torch.Tensor, concepts: dict[str, Concept]
) -> IdentityJudge:
    """Identity judge whose references are every concept's train images."""
    return IdentityJudge(mean, components, {n: c.images("train") for n, c in concepts.items()})
