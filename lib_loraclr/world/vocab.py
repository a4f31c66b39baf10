"""The world's caption vocabulary and a fast word-level tokenizer equal to CLIP's on it.

Every caption of the world is lowercase words, single digits and commas. ``WordTokenizer`` maps each
word through a table built from the real CLIP tokenizer (or loaded from ``assets/word_ids.json``), so
training needs no slow BPE; ``tests/test_world.py`` checks it against ``clip_tokenizer()``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import LoraclrError

BOS_ID, EOS_ID, MAX_LENGTH = 49406, 49407, 77
# Single-token rare words (ids ≥ 47 993 in CLIP's BPE), used as concept triggers.
TRIGGERS: tuple[str, ...] = (
    "sks",
    "ohwx",
    "szn",
    "mth",
    "yte",
    "mib",
    "niu",
    "zas",
    "bsf",
    "cna",
    "ucn",
    "wbo",
    "pgs",
    "hta",
    "lun",
    "dbz",
)
WORDS: tuple[str, ...] = (
    "a",
    "and",
    "digit",
    "one",
    "handwritten",
    "next",
    "to",
    "beside",
    "then",
    ",",
    *[str(d) for d in range(10)],
    *TRIGGERS,
)
WORD_TABLE = Path(__file__).with_name("assets") / "word_ids.json"
_SPLIT = re.compile(r"[a-z]+|[0-9]|,")


class UnknownWordError(LoraclrError, ValueError):
    """A caption used a word outside the world's vocabulary."""


def build_word_table() -> dict[str, list[int]]:
    """Token ids (without BOS/EOS) of every world word, from the real CLIP tokenizer."""
    from lib_loraclr.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    return {w: tok(w).input_ids[1:-1] for w in WORDS}


class WordTokenizer:
    """``__call__(prompts) → LongTensor [b, 77]``: BOS, word ids, EOS, EOS padding (SD1's layout)."""

    def __init__(self, table: dict[str, list[int]] | None = None) -> None:
        if table is None:
            table = json.loads(WORD_TABLE.read_text()) if WORD_TABLE.is_file() else build_word_table()
        self.table = table

    def ids(self, prompt: str) -> list[int]:
        out = [BOS_ID]
        for w in _SPLIT.findall(prompt.lower()):
            if w not in self.table:
                raise UnknownWordError(f"{w!r} is not in the world's vocabulary")
            out.extend(self.table[w])
        out = [*out[: MAX_LENGTH - 1], EOS_ID]
        return out + [EOS_ID] * (MAX_LENGTH - len(out))

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.ids(p) for p in prompts], dtype=torch.long)
