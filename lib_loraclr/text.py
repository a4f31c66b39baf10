"""Prompt → text-encoder conditioning, following the WebUI's SD1 conventions (no WebUI import).

Reproduces A1111's ``FrozenCLIPEmbedderWithCustomWords`` for SD1:

- emphasis syntax ``(x)`` ×1.1, ``[x]`` ÷1.1, ``(x:1.3)``, escapes ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\``
  (``prompt_parser.parse_prompt_attention``); the weights multiply the encoder's hidden states, which are
  then rescaled so that the mean of the whole chunk batch is unchanged (A1111's "Original" emphasis —
  note the mean is taken over every prompt of the batch, exactly as the WebUI does);
- ``BREAK`` starts a new chunk;
- 75-token chunks, each wrapped as ``BOS + 75 tokens + EOS``, short chunks padded with EOS (SD1), with
  A1111's comma back-tracking (a chunk that fills up within ``comma_padding_backtrack`` tokens of a comma
  moves the text after the comma into the next chunk);
- every prompt of a batch padded to the same number of chunks with empty chunks;
- ``clip_skip``: 1 = last layer; k > 1 = ``hidden_states[-k]`` followed by ``final_layer_norm``.

Output of `PromptEncoder.encode`: ``[B, 77·k, D]`` (k = chunks, D = hidden size).
The encoder calls the ``CLIPTextModel`` module normally, so forward hooks on its sub-modules fire.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lib_loraclr.errors import LoraclrError

BOS_ID = 49406
EOS_ID = 49407
CHUNK_LENGTH = 75

_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.VERBOSE,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


class TriggerNotFoundError(LoraclrError, ValueError):
    """The trigger words' tokens do not occur in the prompt."""


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs like the WebUI; ``("BREAK", -1.0)`` marks a chunk break.

    >>> parse_prompt_attention("a (cat:1.5) [dog]")
    [('a ', 1.0), ('cat', 1.5), (' ', 1.0), ('dog', 0.9090909090909091)]
    """
    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        part = m.group(0)
        weight = m.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_brackets.append(len(res))
        elif part == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif part == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif part == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, piece in enumerate(re.split(_RE_BREAK, part)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([piece, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0  # merge runs of identical weights
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(str(t), float(w)) for t, w in res]


@dataclass
class PromptChunk:
    """One 77-token chunk: ``tokens`` (BOS + 75 + EOS) and their emphasis ``multipliers``."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)


class PromptEncoder:
    """WebUI-style prompt encoder around a tokenizer and a transformers ``CLIPTextModel``.

    Args:
        tokenizer: a transformers CLIP tokenizer (``lib_loraclr.models.tokenizer.clip_tokenizer()``).
        text_model: a transformers-4 ``CLIPTextModel`` (module names ``text_model.*``).
        clip_skip: 1 = last layer; k > 1 = ``hidden_states[-k]`` (+ final layer norm unless
            ``final_norm_on_skip`` is False, which is SDXL's CLIP-L convention).
        emphasis: parse ``(x:1.2)`` weights (A1111 "Original"); False = take the prompt literally.
        comma_padding_backtrack: A1111's option of the same name (default 20).
        id_pad: token after the first EOS of each chunk (SD1: EOS; OpenCLIP-tokenised SD2/SDXL-te2: 0).
    """

    def __init__(
        self,
        tokenizer: Any,
        text_model: nn.Module,
        clip_skip: int = 1,
        emphasis: bool = True,
        comma_padding_backtrack: int = 20,
        final_norm_on_skip: bool = True,
        id_pad: int = EOS_ID,
    ) -> None:
        if clip_skip < 1:
            raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
        self.tokenizer = tokenizer
        self.text_model = text_model
        self.clip_skip = int(clip_skip)
        self.emphasis = emphasis
        self.comma_padding_backtrack = int(comma_padding_backtrack)
        self.final_norm_on_skip = final_norm_on_skip
        self.id_start = BOS_ID
        self.id_end = EOS_ID
        self.id_pad = id_pad
        self.chunk_length = CHUNK_LENGTH
        self.comma_token = int(tokenizer(",", add_special_tokens=False)["input_ids"][0])

    # ---------------------------------------------------------------- tokenisation
    def _parse(self, prompt: str) -> list[tuple[str, float]]:
        return parse_prompt_attention(prompt) if self.emphasis else [(prompt, 1.0)]

    def _tokenize_texts(self, texts: list[str]) -> list[list[int]]:
        return [
            list(ids)
            for ids in self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]
        ]

    def tokenize(self, prompt: str) -> list[tuple[int, float]]:
        """Token ids with their emphasis weights, without BOS/EOS (``BREAK`` markers are dropped)."""
        parsed = self._parse(prompt)
        out: list[tuple[int, float]] = []
        for ids, (text, weight) in zip(self._tokenize_texts([t for t, _ in parsed]), parsed):
            if text == "BREAK" and weight == -1:
                continue
            out.extend((i, weight) for i in ids)
        return out

    def chunks(self, prompt: str) -> list[PromptChunk]:
        """The prompt's 77-token chunks (A1111 ``tokenize_line``), at least one."""
        parsed = self._parse(prompt)
        tokenized = self._tokenize_texts([t for t, _ in parsed])
        chunks: list[PromptChunk] = []
        chunk = PromptChunk()
        last_comma = -1

        def next_chunk() -> None:
            nonlocal chunk, last_comma
            to_add = self.chunk_length - len(chunk.tokens)
            if to_add > 0:
                chunk.tokens += [self.id_end] * to_add
                chunk.multipliers += [1.0] * to_add
            chunk.tokens = [self.id_start, *chunk.tokens, self.id_end]
            chunk.multipliers = [1.0, *chunk.multipliers, 1.0]
            last_comma = -1
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == "BREAK" and weight == -1:
                next_chunk()
                continue
            for token in tokens:
                if token == self.comma_token:
                    last_comma = len(chunk.tokens)
                elif (
                    self.comma_padding_backtrack != 0
                    and len(chunk.tokens) == self.chunk_length
                    and last_comma != -1
                    and len(chunk.tokens) - last_comma <= self.comma_padding_backtrack
                ):
                    cut = last_comma + 1
                    reloc_tokens, reloc_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                    chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                    next_chunk()
                    chunk.tokens, chunk.multipliers = reloc_tokens, reloc_mults
                if len(chunk.tokens) == self.chunk_length:
                    next_chunk()
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
        if chunk.tokens or not chunks:
            next_chunk()
        return chunks

    def empty_chunk(self) -> PromptChunk:
        """The chunk used to pad a shorter prompt: BOS followed by 76 EOS."""
        n = self.chunk_length + 2
        return PromptChunk([self.id_start] + [self.id_end] * (n - 1), [1.0] * n)

    def chunk_ids(self, prompt: str) -> list[list[int]]:
        """Token ids per chunk, 77 each (BOS … EOS/padding)."""
        return [c.tokens for c in self.chunks(prompt)]

    def token_positions(self, prompt: str, words: str) -> list[int]:
        """Positions in the flattened ``77·k`` sequence of every occurrence of ``words``' token sequence.

        Multi-token words are matched as a whole and every one of their positions is returned
        (e.g. ``"<d8>"`` is 4 tokens → 4 positions per occurrence). Occurrences are searched within
        each chunk. Raises `TriggerNotFoundError` when absent.
        """
        pattern = [i for i, _ in self.tokenize(words)]
        if not pattern:
            raise TriggerNotFoundError(f"trigger words {words!r} contain no tokens")
        width = self.chunk_length + 2
        positions: list[int] = []
        for c, ids in enumerate(self.chunk_ids(prompt)):
            n = len(pattern)
            for s in range(1, len(ids) - n + 1):
                if ids[s : s + n] == pattern:
                    positions.extend(c * width + s + j for j in range(n))
        if not positions:
            raise TriggerNotFoundError(f"trigger words {words!r} do not occur in the prompt {prompt!r}")
        return sorted(set(positions))

    def eot_position(self, prompt: str) -> int:
        """Index of the first EOS token of the first chunk."""
        return self.chunk_ids(prompt)[0].index(self.id_end)

    # ---------------------------------------------------------------- encoding
    def _device(self) -> torch.device:
        return next(self.text_model.parameters()).device

    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states ``[B, 77, D]`` and pooled output ``[B, D']`` (or None) for one chunk batch."""
        out = self.text_model(input_ids=tokens, output_hidden_states=self.clip_skip > 1)
        if self.clip_skip > 1:
            z = out.hidden_states[-self.clip_skip]
            if self.final_norm_on_skip:
                z = self.text_model.text_model.final_layer_norm(z)
        else:
            z = out.last_hidden_state
        return z, getattr(out, "pooler_output", None)

    def _process_chunk_batch(self, batch: list[PromptChunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self._device()
        token_lists = [list(c.tokens) for c in batch]
        if self.id_end != self.id_pad:
            for row in token_lists:
                first = row.index(self.id_end)
                row[first + 1 :] = [self.id_pad] * (len(row) - first - 1)
        tokens = torch.tensor(token_lists, dtype=torch.long, device=device)
        z, pooled = self.encode_tokens(tokens)
        mult = torch.tensor([c.multipliers for c in batch], dtype=z.dtype, device=z.device)
        if bool((mult != 1.0).any()):
            original_mean = z.mean()
            z = z * mult.unsqueeze(-1)
            z = z * (original_mean / z.mean())
        return z, pooled

    def encode_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([B, 77·k, D], pooled of the first chunk [B, D'] or None)``."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a string")
        batch_chunks = [self.chunks(p) for p in prompts]
        n_chunks = max(len(c) for c in batch_chunks)
        zs: list[torch.Tensor] = []
        pooled_first: torch.Tensor | None = None
        for i in range(n_chunks):
            batch = [c[i] if i < len(c) else self.empty_chunk() for c in batch_chunks]
            z, pooled = self._process_chunk_batch(batch)
            if i == 0:
                pooled_first = pooled
            zs.append(z)
        return torch.cat(zs, dim=1), pooled_first

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Conditioning ``[B, 77·k, D]`` for a batch of prompts (k = most chunks in the batch)."""
        return self.encode_with_pooled(prompts)[0]


class OpenClipPromptEncoder(PromptEncoder):
    """WebUI prompt encoding for an OpenCLIP text tower (SD2 ``cond_stage_model.model``, SDXL
    ``conditioner.embedders.1.model``): same tokenizer, emphasis and chunking as `PromptEncoder`,
    tokens after the first EOS of each chunk replaced by 0 (A1111's ``id_pad`` for OpenCLIP).

    ``text_model`` needs open_clip ``CLIP``'s attributes: ``token_embedding``, ``positional_embedding``,
    ``transformer.resblocks`` (sequence-first), ``attn_mask``, ``ln_final``, ``text_projection``
    (the real ``open_clip`` CLIP minus ``visual``, or `lib_loraclr.models.openclip_text.OpenClipTextModel`).

    ``layer``: ``"penultimate"`` (the input of the last block) or ``"last"``; ``final_norm``: apply
    ``ln_final`` to it (SD2 / ldm: True; SDXL / sgm: False). Pooled output (``encode_with_pooled``):
    ``ln_final(last)`` at the EOS token ``@ text_projection`` (sgm's ``pooled``).
    """

    def __init__(
        self,
        tokenizer: Any,
        text_model: nn.Module,
        layer: str = "penultimate",
        final_norm: bool = False,
        emphasis: bool = True,
        comma_padding_backtrack: int = 20,
    ) -> None:
        if layer not in ("penultimate", "last"):
            raise ValueError(f"layer must be 'penultimate' or 'last', got {layer!r}")
        super().__init__(
            tokenizer,
            text_model,
            clip_skip=1,
            emphasis=emphasis,
            comma_padding_backtrack=comma_padding_backtrack,
            id_pad=0,
        )
        self.layer = layer
        self.final_norm = final_norm

    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.text_model
        x = m.token_embedding(tokens) + m.positional_embedding
        x = x.permute(1, 0, 2)  # [77, B, D], open_clip is sequence-first
        blocks = m.transformer.resblocks
        penultimate = x
        for i, r in enumerate(blocks):
            if i == len(blocks) - 1:
                penultimate = x
            x = r(x, attn_mask=m.attn_mask)
        last = x.permute(1, 0, 2)
        z = last if self.layer == "last" else penultimate.permute(1, 0, 2)
        if self.final_norm:
            z = m.ln_final(z)
        o = m.ln_final(last)
        pooled = o[torch.arange(o.shape[0], device=o.device), tokens.argmax(dim=-1)] @ m.text_projection
        return z, pooled
