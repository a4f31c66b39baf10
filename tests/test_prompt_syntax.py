"""The ``<clora:…>`` prompt syntax: bindings, coexistence with the WebUI's syntax, errors with positions."""

from __future__ import annotations

import random
import re
from collections import defaultdict

import pytest

from lib_loraclr.errors import LoraclrError
from lib_loraclr.prompt_syntax import (
    RE_EXTRA_NET,
    Binding,
    PromptSyntaxError,
    bind_words,
    has_clora_tags,
    parse_prompt,
    strip_clora_tags,
    with_bindings,
)


def webui_parse_prompt(prompt: str) -> tuple[str, dict[str, list[list[str]]]]:
    """The WebUI's ``extra_networks.parse_prompt`` re-stated: strip every tag, split args on ':'."""
    res: dict[str, list[list[str]]] = defaultdict(list)

    def found(m: re.Match) -> str:
        res[m.group(1)].append(m.group(2).split(":"))
        return ""

    return re.sub(r"<(\w+):([^>]+)>", found, prompt), res


def words_of(p, i=0):
    b = p.bindings[i]
    return p.prompt[b.span[0] : b.span[1]]


# ------------------------------------------------------------------------------------------ basic binding


def test_binds_preceding_word_and_weights():
    p = parse_prompt("a cat<clora:mycat:0.9> and a dog<clora:mydog>")
    assert p.prompt == "a cat and a dog"
    assert [b.lora for b in p.bindings] == ["mycat", "mydog"]
    cat, dog = p.bindings
    assert (cat.words, cat.span, cat.te_weight, cat.unet_weight) == ("cat", (2, 5), 0.9, 0.9)
    assert (dog.words, dog.span, dog.te_weight, dog.unet_weight) == ("dog", (12, 15), 1.0, 1.0)
    assert cat.trigger is None and cat.source == "tag" and cat.position == 5
    assert p.prompt[slice(*dog.span)] == "dog"


def test_te_and_unet_weights_positional_and_named():
    p = parse_prompt("x cat<clora:a:0.8:0.6> y dog<clora:b:te=0.5:unet=-0.25> z owl<clora:c:0.7:unet=2>")
    a, b, c = p.bindings
    assert (a.te_weight, a.unet_weight) == (0.8, 0.6)
    assert (b.te_weight, b.unet_weight) == (0.5, -0.25)
    assert (c.te_weight, c.unet_weight) == (0.7, 2.0)


def test_space_between_word_and_tag_and_punctuation():
    p = parse_prompt("a cat <clora:c>, a dog, <clora:d> on grass")
    assert [b.words for b in p.bindings] == ["cat", "dog"]
    assert p.prompt == "a cat , a dog,  on grass"  # exactly the WebUI's stripping


def test_multiword_span_with_words():
    p = parse_prompt("a fluffy white cat<clora:c:words=fluffy white cat> on a mat")
    assert words_of(p) == "fluffy white cat" and p.bindings[0].span == (2, 18)


def test_words_case_insensitive_and_nearest_before_tag():
    p = parse_prompt("a cat and a dog, then another Cat<clora:c:words=cat> and a cat")
    b = p.bindings[0]
    assert b.words == "Cat"
    assert b.span == (p.prompt.index("Cat"), p.prompt.index("Cat") + 3)


def test_words_after_tag_when_none_before():
    p = parse_prompt("<clora:c:words=red fox>a red fox")
    assert words_of(p) == "red fox" and p.bindings[0].span == (2, 9)


def test_words_across_emphasis_brackets():
    p = parse_prompt("a (fluffy cat:1.2)<clora:c:words=fluffy cat>")
    assert words_of(p) == "fluffy cat"


def test_trigger_words():
    p = parse_prompt("a cat<clora:c:trigger=sks> and a man<clora:m:0.5:trigger=ohwx man>")
    assert [b.trigger for b in p.bindings] == ["sks", "ohwx man"]
    text, span = p.concept_prompt(0)
    assert text == "a sks cat and a man" and text[slice(*span)] == "sks cat"
    text, span = p.concept_prompt(1)
    assert text == "a cat and a ohwx man man" and text[slice(*span)] == "ohwx man man"
    text, span = p.concept_prompt(0, trigger="")  # explicit "no trigger": the base prompt
    assert text == p.prompt and span == (2, 5)
    text, span = p.concept_prompt(1, trigger="zz")
    assert text[slice(*span)] == "zz man"


def test_no_tags_is_identity():
    s = "a (cat:1.2) [dog] [a:b:0.5] BREAK x AND y <lora:style:1>"
    p = parse_prompt(s)
    assert p.bindings == () and p.prompt_without_clora == s
    assert p.prompt == webui_parse_prompt(s)[0]
    assert not has_clora_tags(s)


def test_empty_prompt():
    p = parse_prompt("")
    assert p.prompt == "" and p.bindings == ()
    assert parse_prompt(None).prompt == ""  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ coexistence


@pytest.mark.parametrize(
    ("prompt", "bound"),
    [
        ("a (cat:1.2)<clora:c>", "cat"),
        ("a ((cat))<clora:c>", "cat"),
        ("a [cat]<clora:c>", "cat"),
        ("a (fluffy cat:1.3)<clora:c>", "cat"),
        ("a (cat<clora:c>:1.3)", "cat"),
        ("a [cat:dog:0.5]<clora:c>", "dog"),
        ("a [cat<clora:c>:dog:0.5]", "cat"),
        ("a [cat:dog:10]<clora:c>", "dog"),
        ("a [cat|dog]<clora:c>", "dog"),
        ("a cat :1.2<clora:c> AND a dog", "cat"),
        ("a \\(cat\\)<clora:c>", "cat"),
        ("a black-cat<clora:c>", "black-cat"),
        ("a cat's<clora:c>", "cat's"),
        ("an ünïcödé_kätze<clora:c>", "ünïcödé_kätze"),
        ("a cat<lora:style:0.7><clora:c>", "cat"),
        ("a cat<clora:c><lora:style:0.7> BREAK a dog", "cat"),
        ("1girl, solo<clora:c>", "solo"),
    ],
)
def test_coexists_with_webui_syntax(prompt, bound):
    p = parse_prompt(prompt)
    assert len(p.bindings) == 1 and p.bindings[0].words == bound
    # the text the WebUI's text encoder sees is exactly our `prompt`
    assert p.prompt == webui_parse_prompt(prompt)[0]


def test_other_extra_networks_keep_their_global_meaning():
    s = "<lora:style:0.6> a cat<clora:c:0.9> and a dog<clora:d> <hypernet:h:1>"
    p = parse_prompt(s)
    assert p.prompt_without_clora == "<lora:style:0.6> a cat and a dog <hypernet:h:1>"
    assert strip_clora_tags(s) == p.prompt_without_clora
    cleaned, nets = webui_parse_prompt(s)
    assert cleaned == p.prompt
    assert nets["lora"] == [["style", "0.6"]] and nets["hypernet"] == [["h", "1"]]
    assert nets["clora"] == [["c", "0.9"], ["d"]]  # what our ExtraNetwork receives
    # ... and parsing the prompt without our tags yields the same WebUI view, minus our network
    assert webui_parse_prompt(p.prompt_without_clora)[0] == p.prompt


def test_break_and_and_subprompts():
    p = parse_prompt("a cat<clora:c> BREAK on grass AND a dog<clora:d> :0.8 AND sky")
    assert [b.words for b in p.bindings] == ["cat", "dog"]
    assert [b.subprompt for b in p.bindings] == [0, 1]
    p = parse_prompt("x AND y AND a fox<clora:f>")
    assert p.bindings[0].subprompt == 2


def test_multiline_prompt():
    p = parse_prompt("masterpiece,\na cat<clora:c>\nand a dog<clora:d>")
    assert [b.words for b in p.bindings] == ["cat", "dog"]


def test_name_with_spaces_trimmed_and_dots():
    p = parse_prompt("a cat<clora: my.cat-v2 :0.5>")
    assert p.bindings[0].lora == "my.cat-v2"


# ------------------------------------------------------------------------------------------ table rows


def test_bind_words_for_table_rows():
    p = parse_prompt("a cat and a fluffy dog")
    b = bind_words(p, "dogl", "fluffy dog", 0.7, None, " sks ")
    assert (b.span, b.words, b.te_weight, b.unet_weight, b.trigger, b.source) == (
        (12, 22),
        "fluffy dog",
        0.7,
        0.7,
        "sks",
        "table",
    )
    assert bind_words(p, "x", "cat", 1.0, 0.3).unet_weight == 0.3
    with pytest.raises(PromptSyntaxError, match="not in the prompt"):
        bind_words(p, "x", "horse")
    with pytest.raises(PromptSyntaxError, match="needs the words"):
        bind_words(p, "x", "  ")


def test_with_bindings_checks_conflicts():
    p = parse_prompt("a cat<clora:c> and a dog")
    p2 = with_bindings(p, [bind_words(p, "d", "dog")])
    assert p2.loras == ["c", "d"]
    with pytest.raises(PromptSyntaxError, match="bound twice"):
        with_bindings(p, [bind_words(p, "c", "dog")])
    with pytest.raises(PromptSyntaxError, match="same words"):
        with_bindings(p, [bind_words(p, "e", "a cat")])


def test_a_merged_lora_binds_once_per_concept_with_its_own_trigger():
    """One merged LoRA holding two concepts: each binding names its concept's trigger words."""
    p = parse_prompt("a cat<clora:merged:trigger=sks> and a dog<clora:merged:trigger=ohwx>")
    assert [(b.lora, b.words, b.trigger) for b in p.bindings] == [
        ("merged", "cat", "sks"),
        ("merged", "dog", "ohwx"),
    ]


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("prompt", "column", "message"),
    [
        ("<clora:x> a cat", 1, "nothing to bind to"),
        ("a cat<clora:x:abc>", 15, "must be a number"),
        ("a cat<clora:x:1:zz>", 17, "UNet weight must be a number"),
        ("a cat<clora:x:inf>", 15, "finite"),
        ("a cat<clora:x:foo=1>", 15, "unknown option 'foo'"),
        ("a cat<clora:x:te=1:te=2>", 20, "given twice"),
        ("a cat<clora:x:a=b=c>", 15, "one '='"),
        ("a cat<clora:x:1:2:3>", 19, "too many fields"),
        ("a cat<clora:x:te=1:0.5>", 20, "weights before"),
        ("a cat<clora::1>", 13, "LoRA name"),
        ("a cat<clora:te=1>", 13, "LoRA name"),
        ("a cat<clora:x:trigger= >", 15, "trigger="),
        ("a cat<clora:x:words=,>", 15, "words= needs"),
        ("a cat<clora:x:words=dog>", 15, "not in the prompt"),
        ("a cat<clora:x", 6, "unclosed"),
        ("a cat <clora x>", 7, "malformed"),
        ("a cat<clora:>", 6, "malformed"),
        ("a cat<Clora:x>", 7, "lower case"),
        ("a cat BREAK<clora:x>", 12, "follows BREAK"),
        ("a cat AND <clora:x>", 11, "follows AND"),
        ("a cat<clora:x><clora:y>", 15, "same words"),
        ("a cat<clora:x> a dog<clora:x>", 21, "bound twice"),
        ("a cat<clora:x:trigger=sks> a dog<clora:x>", 33, "bound twice"),
        ("a cat<clora:x:trigger=sks> a dog<clora:x:trigger=sks>", 33, "own trigger"),
        ("a fluffy cat<clora:y> <clora:x:words=fluffy cat>", 23, "same words"),
        ("a cat<clora:x <lora:y:1>", 6, "unclosed"),
    ],
)
def test_errors_with_position(prompt, column, message):
    with pytest.raises(PromptSyntaxError) as ei:
        parse_prompt(prompt)
    e = ei.value
    assert message in e.message
    assert (e.line, e.column) == (1, column)
    assert e.position == column - 1
    # the rendered text: message, position, the prompt line and a caret under the column
    text_line, caret_line = str(e).splitlines()[-2:]
    assert text_line == prompt and caret_line == " " * (column - 1) + "^"
    assert f"column {column}" in str(e)
    assert isinstance(e, LoraclrError) and isinstance(e, ValueError)


def test_error_on_second_line_and_long_line():
    with pytest.raises(PromptSyntaxError) as ei:
        parse_prompt("first line\nsecond cat<clora:x:oops>")
    assert (ei.value.line, ei.value.column) == (2, 20)
    assert "line 2, column 20" in str(ei.value)
    assert str(ei.value).splitlines()[-1] == " " * 19 + "^"

    long = "word " * 100 + "cat<clora:x:oops>" + " tail" * 100
    with pytest.raises(PromptSyntaxError) as ei:
        parse_prompt(long)
    text, caret = str(ei.value).splitlines()[-2:]
    assert len(text) <= 102 and text.startswith("…") and text.endswith("…")
    assert text[caret.index("^") :].startswith("oops")


# ------------------------------------------------------------------------------------------ properties

WORDS = ["a", "cat", "dog", "fluffy", "red", "fox", "1girl", "solo", "on", "grass", "night", "sks"]
SYNTAX = [", ", " ", " BREAK ", " AND ", "(", ")", "[", "]", ":1.2)", " <lora:style:0.5> ", "\n"]


def _random_prompt(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """A prompt mixing WebUI syntax with clora tags each right after a fresh word; returns the
    expected (lora, word) pairs."""
    parts: list[str] = []
    expected = []
    for i in range(rng.randint(1, 12)):
        if rng.random() < 0.4:
            parts.append(rng.choice(SYNTAX))
        word = f"{rng.choice(WORDS)}{i}"
        parts.append(word)
        if rng.random() < 0.3:
            name = f"lora{i}"
            w = rng.choice(["", ":0.5", ":1:0.3", ":te=0.2", ":trigger=sks"])
            parts.append(f"<clora:{name}{w}>")
            expected.append((name, word))
        parts.append(" ")
    return "".join(parts), expected


def test_random_prompts_bind_the_preceding_word():
    rng = random.Random(1234)
    for _ in range(500):
        prompt, expected = _random_prompt(rng)
        p = parse_prompt(prompt)
        assert [(b.lora, b.words) for b in p.bindings] == expected, prompt
        assert p.prompt == webui_parse_prompt(prompt)[0]
        assert not RE_EXTRA_NET.search(p.prompt)
        for b in p.bindings:
            assert p.prompt[b.span[0] : b.span[1]] == b.words
            assert b.subprompt == len(re.findall(r"\bAND\b", p.prompt[: b.span[0]]))
            assert prompt[b.position :].startswith(f"<clora:{b.lora}")


def test_random_garbage_never_crashes():
    """Any text: either a ParsedPrompt or a PromptSyntaxError, never another exception."""
    rng = random.Random(99)
    alphabet = "ab <>:=()[]|,\\.-1 clora\nBREAKAND"
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.5:
            s = s[: len(s) // 2] + "<clora:" + s[len(s) // 2 :]
        try:
            p = parse_prompt(s)
        except PromptSyntaxError as e:
            assert 0 <= e.position <= len(s)
            assert "^" in str(e).splitlines()[-1]
        else:
            assert all(isinstance(b, Binding) for b in p.bindings)
            assert p.prompt == webui_parse_prompt(s)[0]


def test_hypothesis_properties():
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(st.text(alphabet="ab c<>:=()[],\\.0-9BREAKANDlor\n", max_size=60))
    def prop(s):
        try:
            p = parse_prompt(s)
        except PromptSyntaxError as e:
            assert 0 <= e.position <= len(s)
        else:
            assert p.prompt == webui_parse_prompt(s)[0]
            for b in p.bindings:
                assert p.prompt[b.span[0] : b.span[1]] == b.words

    prop()
