"""The ``<clora:…>`` prompt syntax: bind a LoRA to words of the prompt (pure, no WebUI import).

Syntax (one tag per LoRA, written right after the words it binds to)::

    a cat<clora:mycat:0.9> and a dog<clora:mydog>          binds "cat" / "dog" (the preceding word)
    a fluffy cat<clora:mycat:words=fluffy cat>             binds a multi-word span
    a cat<clora:mycat:trigger=sks>                         explicit trigger words for the concept branch
    a cat<clora:mycat:0.8:0.6>                             text-encoder weight 0.8, UNet weight 0.6
    a cat<clora:mycat:te=0.8:unet=0.6>                     the same with names

Fields, separated by ``:`` exactly as the WebUI splits extra-network tags:

- first: the LoRA name (file stem or alias, as for ``<lora:…>``);
- positional numbers: weight (text encoder and UNet), then a separate UNet weight (like ``<lora:…>``);
- ``te=`` / ``unet=``: the two weights by name (override the positional ones);
- ``words=`` the words to bind, searched (case-insensitively, word by word) nearest before the tag,
  else nearest after it; without ``words=`` the tag binds the one word right before it;
- ``trigger=`` the trigger words inserted in this concept's branch (default: the LoRA's own trigger
  words from its metadata, resolved by the caller).

Why words live inside the tag (and not e.g. in ``{a fluffy cat}``): the WebUI removes every
``<name:…>`` tag before it builds the conditioning, so everything inside a tag never reaches the text
encoder, while braces would (and Dynamic Prompts rewrites ``{…}``).

Coexistence: emphasis ``( )``, ``[ ]``, ``(x:1.2)``, prompt editing ``[a:b:0.5]``, ``BREAK``, ``AND``
and ordinary ``<lora:…>``/``<hypernet:…>`` tags are left untouched. A tag right after ``(cat:1.2)``
binds ``cat`` (the emphasis weight is not a word); after ``[cat:dog:0.5]`` it binds ``dog``.

Positions: :attr:`Binding.span` indexes :attr:`ParsedPrompt.prompt`, the prompt with every
extra-network tag removed exactly like the WebUI's ``extra_networks.parse_prompt`` does, i.e. the text
the text encoder sees. Errors raise :class:`PromptSyntaxError` with the position in the source prompt.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lib_loraclr.errors import LoraclrError

TAG_NAME = "clora"
# The WebUI's extra-network tag pattern (modules/extra_networks.py: re_extra_net), verbatim.
RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
RE_AND = re.compile(r"\bAND\b")
KEYWORDS = frozenset({"AND", "BREAK"})
NAMED_KEYS = ("te", "unet", "words", "trigger")

_RE_WORD = re.compile(r"[\w'\-]+")
# Numbers that are syntax, not words: emphasis / editing weights `(x:1.2)`, `[a:b:0.5]`, `AND` weights.
_RE_SYNTAX_NUMBER = re.compile(r":\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*(?=[)\]]|\bAND\b|$)")
_RE_CLORA_LIKE = re.compile(r"<\s*clora\b", re.IGNORECASE)


class PromptSyntaxError(LoraclrError, ValueError):
    """A ``<clora:…>`` tag the parser cannot accept; ``str()`` shows the message and a caret line.

    Attributes: ``message`` (one sentence), ``source`` (the prompt), ``position`` (0-based character
    offset in ``source``), ``line`` and ``column`` (1-based).
    """

    def __init__(self, message: str, source: str, position: int) -> None:
        self.message = message
        self.source = source
        self.position = max(0, min(position, len(source)))
        line_start = source.rfind("\n", 0, self.position) + 1
        self.line = source.count("\n", 0, self.position) + 1
        self.column = self.position - line_start + 1
        super().__init__(self.render())

    def caret(self, width: int = 100) -> str:
        """Two lines: the prompt line around the error (cut to ``width`` characters) and a caret under it."""
        start = self.source.rfind("\n", 0, self.position) + 1
        end = self.source.find("\n", self.position)
        end = len(self.source) if end < 0 else end
        text = self.source[start:end]
        col = self.position - start
        if len(text) > width:
            left = max(0, min(col - width // 2, len(text) - width))
            shown = text[left : left + width]
            prefix = "…" if left > 0 else ""
            suffix = "…" if left + width < len(text) else ""
            return f"{prefix}{shown}{suffix}\n{' ' * (len(prefix) + col - left)}^"
        return f"{text}\n{' ' * col}^"

    def render(self) -> str:
        where = f"column {self.column}" if self.line == 1 else f"line {self.line}, column {self.column}"
        return f"{self.message} (prompt {where})\n{self.caret()}"


@dataclass(frozen=True)
class Binding:
    """One LoRA bound to words of the prompt.

    ``span``: ``[start, end)`` character offsets of the bound words in :attr:`ParsedPrompt.prompt`;
    ``words``: that text; ``subprompt``: index of the ``AND`` part holding it; ``trigger``: explicit
    trigger words or ``None`` (use the LoRA's own); ``source``: ``"tag"`` or ``"table"``;
    ``position``: offset of the tag in the source prompt (``-1`` for table rows).
    """

    lora: str
    te_weight: float
    unet_weight: float
    words: str
    span: tuple[int, int]
    trigger: str | None = None
    subprompt: int = 0
    source: str = "tag"
    position: int = -1


@dataclass(frozen=True)
class ParsedPrompt:
    """The result of :func:`parse_prompt`.

    ``source``: the prompt as written; ``prompt``: every ``<name:…>`` tag removed (what the WebUI's text
    encoder sees; the base branch's prompt); ``prompt_without_clora``: only ``<clora:…>`` removed (other
    tags such as ``<lora:style:1>`` kept, for handing the prompt on); ``bindings``: in tag order.
    """

    source: str
    prompt: str
    prompt_without_clora: str
    bindings: tuple[Binding, ...] = field(default_factory=tuple)

    @property
    def loras(self) -> list[str]:
        return [b.lora for b in self.bindings]

    def concept_prompt(self, index: int, trigger: str | None = None) -> tuple[str, tuple[int, int]]:
        """Branch prompt of binding ``index``: its trigger words inserted before the bound words.

        Returns the prompt and the ``[start, end)`` span of ``trigger + words`` in it. Without a trigger
        (neither given here nor in the binding) the prompt is :attr:`prompt` unchanged.
        """
        b = self.bindings[index]
        trig = (trigger if trigger is not None else b.trigger) or ""
        trig = trig.strip()
        start, end = b.span
        if not trig:
            return self.prompt, (start, end)
        text = f"{self.prompt[:start]}{trig} {self.prompt[start:]}"
        return text, (start, end + len(trig) + 1)


@dataclass(frozen=True)
class _Word:
    text: str
    start: int
    end: int


def has_clora_tags(prompt: str) -> bool:
    """True when the prompt holds anything that looks like a ``<clora`` tag (well-formed or not)."""
    return bool(_RE_CLORA_LIKE.search(prompt or ""))


def strip_clora_tags(prompt: str) -> str:
    """The prompt with only the well-formed ``<clora:…>`` tags removed (what the WebUI would remove)."""
    return RE_EXTRA_NET.sub(lambda m: "" if m.group(1) == TAG_NAME else m.group(0), prompt)


def _words(text: str) -> list[_Word]:
    """Word tokens of the tag-free prompt, without the numbers that are emphasis/editing/AND syntax."""
    skip = [(m.start(), m.end()) for m in _RE_SYNTAX_NUMBER.finditer(text)]
    out = []
    for m in _RE_WORD.finditer(text):
        if any(s <= m.start() < e for s, e in skip):
            continue
        out.append(_Word(m.group(0), m.start(), m.end()))
    return out


def _parse_weight(value: str, what: str, source: str, pos: int) -> float:
    try:
        w = float(value.strip())
    except ValueError:
        raise PromptSyntaxError(f"{what} must be a number, got {value.strip()!r}", source, pos) from None
    if not math.isfinite(w):
        raise PromptSyntaxError(f"{what} must be a finite number, got {value.strip()!r}", source, pos)
    return w


def _find_phrase(words: list[_Word], phrase: Sequence[str], anchor: int) -> tuple[int, int] | None:
    """Word-index range of the occurrence of ``phrase`` nearest before ``anchor`` (else nearest after)."""
    k = len(phrase)
    want = [w.lower() for w in phrase]
    hits = [
        i
        for i in range(len(words) - k + 1)
        if [w.text.lower() for w in words[i : i + k]] == want
        and not any(w.text in KEYWORDS for w in words[i : i + k])
    ]
    if not hits:
        return None
    before = [i for i in hits if words[i + k - 1].end <= anchor]
    i = before[-1] if before else hits[0]
    return i, i + k


@dataclass
class _Tag:
    position: int  # in source
    clean_position: int  # in the tag-free prompt
    text: str
    args: str


def _split_tags(source: str) -> tuple[str, str, list[_Tag]]:
    clean_parts: list[str] = []
    keep_parts: list[str] = []
    tags: list[_Tag] = []
    last = 0
    clean_len = 0
    for m in RE_EXTRA_NET.finditer(source):
        chunk = source[last : m.start()]
        clean_parts.append(chunk)
        keep_parts.append(chunk)
        clean_len += len(chunk)
        if m.group(1) == TAG_NAME:
            tags.append(_Tag(m.start(), clean_len, m.group(0), m.group(2)))
        else:
            if m.group(1).lower() == TAG_NAME:
                raise PromptSyntaxError(
                    f"write the tag in lower case: <{TAG_NAME}:…>, not <{m.group(1)}:…>",
                    source,
                    m.start() + 1,
                )
            keep_parts.append(m.group(0))
        last = m.end()
    clean_parts.append(source[last:])
    keep_parts.append(source[last:])
    # A `<clora` the WebUI's pattern does not match would stay in the text silently: refuse it.
    matched = [(m.start(), m.end()) for m in RE_EXTRA_NET.finditer(source)]
    for m in _RE_CLORA_LIKE.finditer(source):
        if not any(s <= m.start() < e for s, e in matched):
            nxt_open = source.find("<", m.start() + 1)
            nxt_close = source.find(">", m.start() + 1)
            if nxt_close < 0 or (0 <= nxt_open < nxt_close):
                msg = "unclosed <clora:…> tag: add '>' at its end"
            else:
                msg = (
                    "malformed <clora:…> tag: write <clora:NAME> or <clora:NAME:WEIGHT>, no spaces before ':'"
                )
            raise PromptSyntaxError(msg, source, m.start())
    return "".join(clean_parts), "".join(keep_parts), tags


def _parse_tag(tag: _Tag, source: str, clean: str, words: list[_Word], ends: list[int]) -> Binding:
    if "<" in tag.args:
        raise PromptSyntaxError("unclosed <clora:…> tag: add '>' at its end", source, tag.position)
    items = tag.args.split(":")
    # offsets of each item in the source, for error carets
    offsets = []
    off = tag.position + len(TAG_NAME) + 2
    for item in items:
        offsets.append(off)
        off += len(item) + 1
    name = items[0].strip()
    if not name or "=" in items[0]:
        raise PromptSyntaxError("the first field of <clora:…> must be the LoRA name", source, offsets[0])
    positional: list[tuple[str, int]] = []
    named: dict[str, tuple[str, int]] = {}
    for item, pos in zip(items[1:], offsets[1:]):
        parts = item.split("=", 2)  # as the WebUI's ExtraNetworkParams
        if len(parts) == 2:
            key = parts[0].strip().lower()
            if key not in NAMED_KEYS:
                raise PromptSyntaxError(
                    f"unknown option {parts[0].strip()!r} in <clora:…>; known: {', '.join(NAMED_KEYS)}",
                    source,
                    pos,
                )
            if key in named:
                raise PromptSyntaxError(f"option {key!r} given twice", source, pos)
            named[key] = (parts[1], pos)
        elif "=" in item:
            raise PromptSyntaxError(f"one '=' per option, got {item!r}", source, pos)
        else:
            if named:
                raise PromptSyntaxError("put weights before the key=value options", source, pos)
            positional.append((item, pos))
    if len(positional) > 2:
        raise PromptSyntaxError(
            "too many fields: <clora:NAME:WEIGHT[:UNET_WEIGHT][:key=value…]>", source, positional[2][1]
        )
    te = unet = 1.0
    if positional:
        te = unet = _parse_weight(positional[0][0], "the weight", source, positional[0][1])
    if len(positional) == 2:
        unet = _parse_weight(positional[1][0], "the UNet weight", source, positional[1][1])
    if "te" in named:
        te = _parse_weight(named["te"][0], "te", source, named["te"][1])
    if "unet" in named:
        unet = _parse_weight(named["unet"][0], "unet", source, named["unet"][1])
    trigger = None
    if "trigger" in named:
        trigger = named["trigger"][0].strip()
        if not trigger:
            raise PromptSyntaxError(
                "trigger= needs the trigger words, e.g. trigger=sks", source, named["trigger"][1]
            )

    if "words" in named:
        value, pos = named["words"]
        phrase = _RE_WORD.findall(value)
        if not phrase:
            raise PromptSyntaxError("words= needs the words to bind, e.g. words=fluffy cat", source, pos)
        found = _find_phrase(words, phrase, tag.clean_position)
        if found is None:
            raise PromptSyntaxError(
                f"the words {' '.join(phrase)!r} are not in the prompt (outside of tags)", source, pos
            )
        first, last = found
        span = (words[first].start, words[last - 1].end)
    else:
        i = bisect_right(ends, tag.clean_position) - 1
        if i < 0:
            raise PromptSyntaxError(
                "nothing to bind to: put the tag right after a word (a cat<clora:NAME>) or give words=…",
                source,
                tag.position,
            )
        if words[i].text in KEYWORDS:
            raise PromptSyntaxError(
                f"the tag follows {words[i].text}, not a word: put it right after the word it binds to",
                source,
                tag.position,
            )
        span = (words[i].start, words[i].end)
    subprompt = len(RE_AND.findall(clean, 0, span[0]))
    return Binding(
        lora=name,
        te_weight=te,
        unet_weight=unet,
        words=clean[span[0] : span[1]],
        span=span,
        trigger=trigger,
        subprompt=subprompt,
        source="tag",
        position=tag.position,
    )


def check_overlaps(bindings: Iterable[Binding], source: str) -> None:
    """Refuse a LoRA bound twice (unless each of its bindings names its own ``trigger=``: a merged LoRA
    holding several concepts) and two bindings sharing prompt words (PromptSyntaxError)."""
    seen: dict[str, list[Binding]] = {}
    spans: list[Binding] = []
    for b in bindings:
        pos = max(b.position, 0)
        earlier = seen.setdefault(b.lora, [])
        if earlier and (not b.trigger or any(not o.trigger or o.trigger == b.trigger for o in earlier)):
            raise PromptSyntaxError(
                f"LoRA {b.lora!r} is bound twice; bind it once (use words=… for several words), or give "
                "each binding its own trigger=… (a merged LoRA holding several concepts)",
                source,
                pos,
            )
        earlier.append(b)
        for o in spans:
            if b.span[0] < o.span[1] and o.span[0] < b.span[1]:
                raise PromptSyntaxError(
                    f"{b.lora!r} and {o.lora!r} are bound to the same words ({b.words!r}); "
                    "bind each LoRA to its own words",
                    source,
                    pos,
                )
        spans.append(b)


def parse_prompt(source: str) -> ParsedPrompt:
    """Parse the ``<clora:…>`` tags of one prompt (the prompt as the user wrote it, tags included).

    Raises :class:`PromptSyntaxError` (with the position) for a malformed tag, an unknown option, a
    non-numeric weight, words that are not in the prompt, a tag with nothing to bind to, a LoRA bound
    twice without a trigger of its own per binding, or two LoRAs bound to the same words.
    """
    source = source or ""
    clean, keep, tags = _split_tags(source)
    words = _words(clean)
    ends = [w.end for w in words]
    bindings = [_parse_tag(t, source, clean, words, ends) for t in tags]
    check_overlaps(bindings, source)
    return ParsedPrompt(source=source, prompt=clean, prompt_without_clora=keep, bindings=tuple(bindings))


def bind_words(
    parsed: ParsedPrompt,
    lora: str,
    words: str,
    te_weight: float = 1.0,
    unet_weight: float | None = None,
    trigger: str | None = None,
) -> Binding:
    """A binding for a table row: ``words`` located in ``parsed.prompt`` (first occurrence).

    Raises :class:`PromptSyntaxError` (position 0 of the prompt) when the words are not in the prompt.
    """
    phrase = _RE_WORD.findall(words or "")
    if not phrase:
        raise PromptSyntaxError(
            f"the CLoRA table row for {lora!r} needs the words of the prompt it binds to", parsed.source, 0
        )
    tokens = _words(parsed.prompt)
    found = _find_phrase(tokens, phrase, -1)
    if found is None:
        raise PromptSyntaxError(
            f"CLoRA table row {lora!r}: the words {' '.join(phrase)!r} are not in the prompt",
            parsed.source,
            0,
        )
    first, last = found
    span = (tokens[first].start, tokens[last - 1].end)
    return Binding(
        lora=lora,
        te_weight=float(te_weight),
        unet_weight=float(te_weight if unet_weight is None else unet_weight),
        words=parsed.prompt[span[0] : span[1]],
        span=span,
        trigger=(trigger or "").strip() or None,
        subprompt=len(RE_AND.findall(parsed.prompt, 0, span[0])),
        source="table",
        position=-1,
    )


def with_bindings(parsed: ParsedPrompt, extra: Iterable[Binding]) -> ParsedPrompt:
    """``parsed`` with more bindings appended (checked for LoRAs bound twice and shared words)."""
    bindings = tuple(parsed.bindings) + tuple(extra)
    check_overlaps(bindings, parsed.source)
    return ParsedPrompt(parsed.source, parsed.prompt, parsed.prompt_without_clora, bindings)
