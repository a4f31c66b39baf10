"""The measuring world's data: scikit-learn's real 8×8 handwritten digits, scenes and captions.

Images are float tensors in ``[-1, 1]`` shaped ``[1, 8, 8·k]`` (one channel; ``k`` = 1, 2 or 3 digits
side by side, each in its own fixed 8×8 slot). ``load_digits`` pixel values (0…16) map as ``x/8 − 1``.

The split (80 % train / 20 % test, stratified by class) is fixed by ``SPLIT_SEED``. The base model never
sees the ``HELD_OUT`` classes; they (and style clusters of known classes) become concepts
(``lib_loraclr.world.concepts``).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

SPLIT_SEED = 1234
TEST_FRACTION = 0.2
HELD_OUT: tuple[int, ...] = (2, 5, 8)
KNOWN: tuple[int, ...] = tuple(d for d in range(10) if d not in HELD_OUT)
SLOT = 8  # pixels per digit slot

SINGLE_TEMPLATES = ("a {0}", "{0}", "a digit {0}", "one {0}", "a handwritten {0}")
PAIR_TEMPLATES = (
    "a {0} and a {1}",
    "{0} and {1}",
    "a {0} next to a {1}",
    "a {0}, a {1}",
    "a {0} beside a {1}",
    "a {0} then a {1}",
)
TRIPLE_TEMPLATES = (
    "a {0}, a {1} and a {2}",
    "{0}, {1} and {2}",
    "a {0} then a {1} then a {2}",
    "a {0}, a {1}, a {2}",
)
TEMPLATES = {1: SINGLE_TEMPLATES, 2: PAIR_TEMPLATES, 3: TRIPLE_TEMPLATES}


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """``load_digits`` images ``[n, 8, 8]`` (0…16) → float32 ``[n, 1, 8, 8]`` in ``[-1, 1]``."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32) / 8.0 - 1.0).unsqueeze(1)


@dataclass(frozen=True)
class Digits:
    """The real digits with a fixed split. images: ``[n, 1, 8, 8]`` in [-1, 1]; labels ``[n]`` int64."""

    images: torch.Tensor
    labels: torch.Tensor
    train_idx: np.ndarray
    test_idx: np.ndarray

    def subset(self, split: str, classes: Sequence[int] | None = None) -> np.ndarray:
        """Indices (into ``images``) of ``split`` ("train" | "test" | "all"), optionally only ``classes``."""
        idx = {"train": self.train_idx, "test": self.test_idx}.get(split)
        if idx is None:
            if split != "all":
                raise ValueError(f"unknown split {split!r}")
            idx = np.arange(len(self.labels))
        if classes is None:
            return idx
        lab = self.labels.numpy()[idx]
        return idx[np.isin(lab, list(classes))]


@functools.lru_cache(maxsize=1)
def load_digit_data() -> Digits:
    """All 1797 real digits with the stratified train/test split fixed by ``SPLIT_SEED``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    labels = np.asarray(d.target, dtype=np.int64)
    rng = np.random.RandomState(SPLIT_SEED)
    train, test = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = round(len(idx) * TEST_FRACTION)
        test.extend(idx[:n_test].tolist())
        train.extend(idx[n_test:].tolist())
    return Digits(to_pixels(d.images), torch.from_numpy(labels), np.sort(train), np.sort(test))


def caption(words: Sequence[str], rng: random.Random | None = None, template: int | None = None) -> str:
    """Caption for a scene whose slots hold ``words`` left to right (a digit "3" or a trigger "sks").

    ``template`` picks a fixed template (index), else one is drawn from ``rng``.
    """
    temps = TEMPLATES[len(words)]
    if template is None:
        template = (rng or random).randrange(len(temps))
    return temps[template].format(*words)


def canonical_prompt(words: Sequence[str]) -> str:
    """The evaluation prompt of a scene: "a 3", "a 3 and a 7", "a 3, a 7 and a 1"."""
    return caption(words, template=0)


def canvas_for(prompt: str) -> tuple[int, int, int]:
    """Image shape ``(1, 8, 8·k)`` for a caption of k digits ("a 3 and a 7" → 16 wide; "" and "a 3" → 8): the
    merge's feature runs draw each prompt on the canvas the world samples it at."""
    k = 1 + prompt.count(" and ") + prompt.count(", ")
    return (1, SLOT, SLOT * min(k, 3))


def compose(slots: Sequence[torch.Tensor]) -> torch.Tensor:
    """Put 8×8 digit images ``[1, 8, 8]`` side by side → ``[1, 8, 8·len(slots)]``."""
    return torch.cat(list(slots), dim=-1)


def split_slots(images: torch.Tensor) -> torch.Tensor:
    """``[b, 1, 8, 8·k]`` → ``[b, k, 1, 8, 8]`` (slot j = columns 8j … 8j+7)."""
    b, c, h, w = images.shape
    if w % SLOT or h != SLOT:
        raise ValueError(f"scene images must be 8 × 8·k pixels, got {h}×{w}")
    k = w // SLOT
    return images.reshape(b, c, h, k, SLOT).permute(0, 3, 1, 2, 4).contiguous()


class SceneSampler:
    """Draws training batches of scenes of known digits (for the base model).

    Each batch has one width (``k`` digits); ``k`` is drawn with ``width_probs``. Slot contents are drawn
    independently from the train split of ``classes`` (repeats allowed: "a 3 and a 3").
    """

    def __init__(
        self,
        digits: Digits,
        classes: Sequence[int] = KNOWN,
        width_probs: Sequence[float] = (0.3, 0.4, 0.3),
        seed: int = 0,
    ) -> None:
        self.digits = digits
        self.idx = digits.subset("train", classes)
        self.width_probs = list(width_probs)
        self.rng = random.Random(seed)

    def batch(self, size: int) -> tuple[torch.Tensor, list[str]]:
        """``(images [size, 1, 8, 8k], captions)``."""
        k = self.rng.choices([1, 2, 3], weights=self.width_probs)[0]
        picks = [[int(self.rng.choice(self.idx)) for _ in range(k)] for _ in range(size)]
        flat = torch.tensor([i for p in picks for i in p])
        imgs = self.digits.images[flat].reshape(size, k, 1, SLOT, SLOT)
        imgs = imgs.permute(0, 2, 3, 1, 4).reshape(size, 1, SLOT, SLOT * k)
        caps = [caption([str(int(self.digits.labels[i])) for i in p], self.rng) for p in picks]
        return imgs, caps
