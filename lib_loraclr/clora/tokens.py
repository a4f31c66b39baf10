"""Branch prompts and token groups for CLoRA, from the real tokenizer.

Given a base prompt ("a cat and a dog") and concepts (trigger words + the words of the base prompt they
bind to: ``Concept("sks", "cat")``, ``Concept("<d8>", "dog")``):

- branch 0 = the base prompt (no LoRA);
- branch k (k = 1…K) = the base prompt with concept k's trigger inserted before its words
  ("a sks cat and a dog"), or replacing them (``mode="replace"``: "a sks and a dog");
- ``groups[g][b]`` = token positions of concept g in branch b's prompt: its words, plus its trigger in its
  own branch (official CLoRA: ``important_token_indices``). Every position is an embedding with label g
  in the contrastive loss;
- ``mask_tokens[b]`` = the positions of branch b's own concept (trigger + words) in branch b's prompt;
  empty for branch 0 (official: ``mask_indices``).

Positions index the flattened ``77·k`` conditioning (BOS at 0), as ``PromptEncoder.token_positions``
returns them; multi-token triggers give several positions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConceptNotFoundError

TokenPositions = Callable[[str, str], list[int]]


@dataclass(frozen=True)
class Concept:
    """A concept LoRA's trigger words and the words of the base prompt they bind to."""

    trigger: str
    words: str


@dataclass
class BranchPrompts:
    """Prompts and token groups of all branches (branch 0 = base)."""

    prompts: list[str]
    groups: list[list[list[int]]]
    mask_tokens: list[list[int]]
    concepts: list[Concept] = field(default_factory=list)
    background_tokens: list[int] = field(default_factory=list)

    @property
    def n_branches(self) -> int:
        return len(self.prompts)


def _word_pattern(words: str) -> str:
    return r"(?<![\w<])" + r"\s+".join(re.escape(w) for w in words.split()) + r"(?![\w>])"


def _find_word(text: str, words: str) -> re.Match[str] | None:
    return re.search(_word_pattern(words), text, flags=re.IGNORECASE)


def _occurrence(text: str, start: int, words: str) -> int:
    """How many occurrences of ``words`` come before character ``start``."""
    n = 0
    pos = 0
    while True:
        m = _find_word(text[pos:], words)
        if m is None or pos + m.start() >= start:
            return n
        n += 1
        pos += m.end()


def _positions_of(token_positions: TokenPositions, prompt: str, words: str, occurrence: int) -> list[int]:
    try:
        found = token_positions(prompt, words)
    except ValueError as e:  # PromptEncoder raises TriggerNotFoundError(ValueError)
        raise ConceptNotFoundError(f"{words!r} does not occur in the prompt {prompt!r}") from e
    n_tok = max(1, len(token_positions(words, words)))  # tokens per occurrence (BOS excluded)
    occurrences = [found[i : i + n_tok] for i in range(0, len(found), n_tok)]
    if occurrence >= len(occurrences):
        raise ConceptNotFoundError(
            f"{words!r} does not occur {occurrence + 1} times in the prompt {prompt!r}"
        )
    return occurrences[occurrence]


def token_positions_from(
    tokenize_line: Callable[[str], tuple[Sequence[Any], int]], chunk_width: int = 77
) -> Callable[[str, str], list[int]]:
    """A ``token_positions(prompt, words)`` for `branch_prompts` from the WebUI's
    ``tokenize_line(text) -> (chunks, token_count)`` (each chunk has ``.tokens``: 77 ids, BOS first).

    Positions index the flattened ``77·k`` conditioning; every occurrence, all tokens of multi-token words.
    Raises ValueError when ``words`` does not occur (`branch_prompts` turns it into ConceptNotFoundError).
    """

    def positions(prompt: str, words: str) -> list[int]:
        wchunks, n = tokenize_line(words)
        if not wchunks or n <= 0:
            raise ValueError(f"{words!r} has no tokens")
        pattern = list(wchunks[0].tokens[1 : 1 + min(n, chunk_width - 2)])
        out: list[int] = []
        chunks, _ = tokenize_line(prompt)
        for c, chunk in enumerate(chunks):
            ids = list(chunk.tokens)
            for s in range(1, len(ids) - len(pattern) + 1):
                if ids[s : s + len(pattern)] == pattern:
                    out.extend(c * chunk_width + s + j for j in range(len(pattern)))
        if not out:
            raise ValueError(f"{words!r} does not occur in {prompt!r}")
        return sorted(set(out))

    return positions


def branch_prompts(
    base_prompt: str,
    concepts: Sequence[Concept],
    token_positions: TokenPositions,
    mode: str = "insert",
) -> BranchPrompts:
    """Build the branch prompts, ``groups[g][b]`` and ``mask_tokens[b]`` (see the module docstring).

    ``token_positions(prompt, words)`` returns the positions of every occurrence of ``words``' token
    sequence in ``prompt`` (``PromptEncoder.token_positions``). Concepts bind in order, each to the first
    occurrence of its words that no earlier concept took. Raises `ConceptNotFoundError` when a concept's
    words are not in the base prompt, or every occurrence is taken.
    """
    if mode not in ("insert", "replace"):
        raise ValueError(f"mode must be 'insert' or 'replace', got {mode!r}")
    if not concepts:
        raise ValueError("CLoRA needs at least one concept")
    spans: list[tuple[int, int]] = []
    for c in concepts:
        if not c.words.strip() or not c.trigger.strip():
            raise ConceptNotFoundError(f"concept {c}: trigger and words must not be empty")
        found = list(re.finditer(_word_pattern(c.words), base_prompt, flags=re.IGNORECASE))
        if not found:
            raise ConceptNotFoundError(
                f"the words {c.words!r} of trigger {c.trigger!r} do not occur in the prompt {base_prompt!r}"
            )
        # the first occurrence no earlier concept took ("a 1 and a 1": the second concept gets the second "1")
        free = [m for m in found if all(not (m.start() < e and s < m.end()) for s, e in spans)]
        if not free:
            s, e = next((s, e) for s, e in spans if found[0].start() < e and s < found[0].end())
            raise ConceptNotFoundError(f"two concepts bind to overlapping words at {base_prompt[s:e]!r}")
        spans.append((free[0].start(), free[0].end()))

    prompts = [base_prompt]
    # per branch: character span of each concept's words, and of the own trigger
    for k, c in enumerate(concepts):
        s, e = spans[k]
        if mode == "insert":
            prompts.append(base_prompt[:s] + c.trigger + " " + base_prompt[s:])
        else:
            prompts.append(base_prompt[:s] + c.trigger + base_prompt[e:])

    n_branches = len(prompts)
    groups: list[list[list[int]]] = [[[] for _ in range(n_branches)] for _ in concepts]
    mask_tokens: list[list[int]] = [[] for _ in range(n_branches)]
    for b, prompt in enumerate(prompts):
        for g, c in enumerate(concepts):
            if b == g + 1:
                phrase = c.trigger + " " + c.words if mode == "insert" else c.trigger
                start = spans[g][0]
            else:
                phrase = c.words
                start = spans[g][0]
                if b >= 1 and spans[b - 1][0] < start:  # text shifted by branch b's edit
                    own = concepts[b - 1]
                    shift = (
                        len(own.trigger) + 1
                        if mode == "insert"
                        else len(own.trigger) - (spans[b - 1][1] - spans[b - 1][0])
                    )
                    start += shift
            occ = _occurrence(prompt, start, phrase)
            groups[g][b] = _positions_of(token_positions, prompt, phrase, occ)
            if b == g + 1:
                mask_tokens[b] = list(groups[g][b])
    background = content_tokens(base_prompt, spans, token_positions)
    return BranchPrompts(
        prompts=prompts,
        groups=groups,
        mask_tokens=mask_tokens,
        concepts=list(concepts),
        background_tokens=background,
    )


def region_prompts(bp: BranchPrompts, token_positions: TokenPositions, mode: str = "insert") -> BranchPrompts:
    """The routed mode's short region prompts: branch k's prompt is concept k's own phrase alone (its
    trigger and words, ``"sks cat"``; with ``mode="replace"`` as in `branch_prompts`, the trigger alone), as a
    regional-prompting user types one prompt per region, so a region's cross-attention sees only its own
    concept. Branch 0 (the base prompt), its groups and the background tokens stay; ``groups[g][k]`` =
    concept g's positions in prompt k (its own prompt only, empty in the others); ``mask_tokens[k]`` = the
    whole phrase."""
    prompts = [bp.prompts[0]]
    groups: list[list[list[int]]] = [[list(g[0])] + [[] for _ in bp.concepts] for g in bp.groups]
    mask_tokens: list[list[int]] = [[]]
    for k, c in enumerate(bp.concepts, start=1):
        phrase = c.trigger if mode == "replace" else f"{c.trigger} {c.words}"
        own = _positions_of(token_positions, phrase, phrase, 0)
        prompts.append(phrase)
        groups[k - 1][k] = list(own)
        mask_tokens.append(list(own))
    return BranchPrompts(prompts, groups, mask_tokens, list(bp.concepts), list(bp.background_tokens))


#: words that name nothing in the image (they never claim positions for the background)
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "of",
        "with",
        "in",
        "on",
        "at",
        "to",
        "from",
        "by",
        "for",
        "next",
        "beside",
        "besides",
        "near",
        "then",
        "while",
        "is",
        "are",
    ]
)


def content_tokens(
    prompt: str, taken: Sequence[tuple[int, int]], token_positions: TokenPositions
) -> list[int]:
    """Token positions in ``prompt`` of its content words outside the character spans ``taken`` (the
    concepts' words): what competes with the concepts for the image (e.g. "park" in "a sks man in a
    park"). Stop words and prompt-syntax tags are skipped; a word the tokenizer cannot find is skipped."""
    out: list[int] = []
    for m in re.finditer(r"[^\W_]+", prompt):
        if any(m.start() < e and s < m.end() for s, e in taken):
            continue
        word = m.group(0)
        if word.lower() in STOPWORDS or prompt[max(0, m.start() - 1) : m.start()] == "<":
            continue
        try:
            out += _positions_of(token_positions, prompt, word, _occurrence(prompt, m.start(), word))
        except ConceptNotFoundError:
            continue
    return sorted(set(out))
