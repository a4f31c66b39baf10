"""CLoRA arguments: one validated dict (defaults, order independence, errors), infotext round trip,
and the syntax and the table producing the same bindings."""

from __future__ import annotations

import json
import random
import re

import pytest

from lib_loraclr import clora_args as ca
from lib_loraclr.errors import LoraclrError
from lib_loraclr.prompt_syntax import PromptSyntaxError


# The WebUI's infotext quoting and parsing (modules/infotext_utils.py quote/unquote and the
# `re_param` pattern of parse_generation_parameters), re-stated to test the round trip through text.
def webui_quote(text) -> str:
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def webui_unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def infotext_line(params: dict) -> str:
    return ", ".join(f"{k}: {webui_quote(v)}" for k, v in params.items())


def parse_infotext_line(line: str) -> dict:
    return {k: webui_unquote(v) for k, v in RE_PARAM.findall(line)}


# ------------------------------------------------------------------------------------------ validation


def test_defaults_when_omitted():
    a = ca.validate({})
    assert a == ca.CloraArgs() == ca.validate(None) == ca.from_script_args([])
    assert a.enabled is False and a.latent_update is False and a.loras == ()
    assert (a.mode, a.layout, a.mask_rule) == ("fusion", "", "layout")
    assert a.mask_threshold == pytest.approx(0.3) and a.step_size is None
    assert a.update_steps is None and a.refinement_steps == (0,)


def test_order_independent():
    d = {
        "enabled": True,
        "latent_update": False,
        "update_steps": 7,
        "step_size": 12.5,
        "refinement_steps": [20, 0, 10],
        "refinement_iters": 3,
        "mask_threshold": 0.4,
        "masks_only": True,
        "show_masks": True,
        "loras": [{"words": "cat", "lora": "mycat", "trigger": "sks", "weight": 0.8}],
    }
    keys = list(d)
    rng = random.Random(0)
    results = set()
    for _ in range(20):
        rng.shuffle(keys)
        results.add(ca.validate({k: d[k] for k in keys}))
    assert len(results) == 1
    a = results.pop()
    assert a.refinement_steps == (0, 10, 20) and a.update_steps == 7 and a.step_size == 12.5
    assert a.loras == (ca.LoraRow("mycat", 0.8, "cat", "sks"),)
    assert ca.validate(a.to_dict()) == a
    assert ca.validate(a) == a


def test_string_and_numeric_forms_accepted():
    a = ca.validate(
        {
            "latent_update": "false",
            "masks_only": 1,
            "show_masks": "on",
            "update_steps": "12",
            "refinement_steps": "0, 10/20",
            "mask_threshold": "0.3",
            "step_size": "",
        }
    )
    assert (a.latent_update, a.masks_only, a.show_masks) == (False, True, True)
    assert a.update_steps == 12 and a.refinement_steps == (0, 10, 20) and a.mask_threshold == 0.3
    assert a.step_size is None
    assert ca.validate({"update_steps": "auto"}).update_steps is None
    assert ca.validate({"update_steps": ""}).update_steps is None
    assert ca.validate({"refinement_steps": []}).refinement_steps == ()
    assert ca.validate({"step_size": 0}).step_size is None
    assert ca.validate({"update_steps": 5.0}).update_steps == 5


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"enabeld": True}, "unknown CLoRA argument 'enabeld' (did you mean 'enabled'?)"),
        ({"threshold": 0.3}, "did you mean 'mask_threshold'"),
        ({"enabled": "maybe"}, "enabled must be true or false"),
        ({"update_steps": 2.5}, "whole number"),
        ({"update_steps": -1}, "between 0 and 1000"),
        ({"update_steps": True}, "must be a number"),
        ({"mask_threshold": 1.0}, "between 0 and 1"),
        ({"mask_threshold": "x"}, "must be a number"),
        ({"mask_threshold": float("nan")}, "finite"),
        ({"step_size": -3}, "step_size must be positive"),
        ({"refinement_steps": [0, -1]}, "between 0 and 10000"),
        ({"refinement_iters": 101}, "between 0 and 100"),
        ({"loras": "mycat"}, "loras must be a list"),
        (
            {"loras": [{"lora": "a", "word": "cat"}]},
            "unknown CLoRA table row 1 key 'word' (did you mean 'words'?)",
        ),
        ({"loras": [{"lora": "a"}]}, "give the words"),
        ({"loras": [{"words": "cat"}]}, "choose a LoRA"),
        ({"loras": [["a", "heavy", "cat"]]}, "table row 1 weight must be a number"),
        ({"loras": [["a", 1, "cat", "", 1, 2]]}, "at most 5"),
        ({"loras": [["a", 1, "cat"], ["a", 1, "dog"]]}, "several rows"),
        ({"loras": [["a", 1, "cat", "sks"], ["a", 1, "dog", "sks"]]}, "own trigger words"),
        ({"loras": [["a", 1, "cat", "sks"], ["a", 1, "dog"]]}, "several rows"),
        ({"loras": [42]}, "must be a dict or a list"),
    ],
)
def test_rejections(data, message):
    with pytest.raises(ca.CloraArgsError) as ei:
        ca.validate(data)
    assert message in str(ei.value)
    assert isinstance(ei.value, LoraclrError)


def test_table_rows_forms_and_blank_rows():
    rows = [
        ["mycat", 0.9, "cat", "sks"],  # gradio Dataframe (type="array") row
        ["", "", "", ""],  # blank row: skipped
        [None, float("nan"), None, None],  # pandas blank row: skipped
        {"lora": "mydog", "words": "dog"},  # API dict, defaults
        ca.LoraRow("owl", 0.5, "owl", unet_weight=0.2),
    ]
    a = ca.validate({"loras": rows})
    assert a.loras == (
        ca.LoraRow("mycat", 0.9, "cat", "sks"),
        ca.LoraRow("mydog", 1.0, "dog", ""),
        ca.LoraRow("owl", 0.5, "owl", "", 0.2),
    )
    assert (a.loras[2].te_weight, a.loras[2].unet) == (0.5, 0.2)
    assert a.loras[0].unet == 0.9


def test_from_script_args_forms():
    d = {"update_steps": 3}
    assert ca.from_script_args([True, d]) == ca.validate({"enabled": True, "update_steps": 3})
    assert ca.from_script_args([d]).enabled is False
    assert ca.from_script_args([True]).enabled is True
    assert ca.from_script_args([False, {"enabled": True}]).enabled is True  # the dict wins
    assert ca.from_script_args([True, None]) == ca.validate({"enabled": True})
    assert ca.from_script_args([True, ca.CloraArgs(update_steps=4)]).update_steps == 4
    with pytest.raises(ca.CloraArgsError, match="expects"):
        ca.from_script_args([True, {}, {}])
    with pytest.raises(ca.CloraArgsError, match="must be a dict"):
        ca.from_script_args([True, "nope"])
    with pytest.raises(ca.CloraArgsError, match="unknown CLoRA argument"):
        ca.from_script_args([True, {"bogus": 1}])


def test_gradient_free():
    assert ca.CloraArgs().gradient_free  # the default: layout masks, no latent update
    assert not ca.CloraArgs(latent_update=True).gradient_free
    assert ca.CloraArgs(masks_only=True).gradient_free
    assert ca.CloraArgs(latent_update=False).gradient_free


# ------------------------------------------------------------------------------------------ infotext


def test_infotext_round_trip_through_webui_text():
    a = ca.validate(
        {
            "enabled": True,
            "latent_update": False,
            "update_steps": 8,
            "step_size": 15,
            "refinement_steps": [0, 10],
            "refinement_iters": 4,
            "mask_threshold": 0.42,
            "masks_only": True,
            "show_masks": True,
            "loras": [
                ["my:cat", 0.75, "fluffy cat", 'sks, "x"'],
                {"lora": "dog", "words": "dog", "unet_weight": 0.5},
            ],
        }
    )
    params = ca.to_infotext(a)
    assert set(params) == {ca.INFOTEXT_KEY, ca.INFOTEXT_TABLE_KEY}
    # the options string needs no quoting in the WebUI's infotext
    assert webui_quote(params[ca.INFOTEXT_KEY]) == params[ca.INFOTEXT_KEY]
    line = infotext_line({"Steps": 20, "Sampler": "Euler a", **params, "Version": "v1.10.1"})
    parsed = parse_infotext_line(line)
    assert parsed["Steps"] == "20" and parsed["Version"] == "v1.10.1"
    back = ca.from_infotext(parsed)
    assert back == a


def test_infotext_defaults_and_no_table():
    a = ca.CloraArgs()
    params = ca.to_infotext(a)
    assert params == {
        ca.INFOTEXT_KEY: "mode=fusion layout=- regions=concept crops=0 base_uncond=1 masks=layout latent=0 steps=auto "
        "step=auto refine=0 iters=5 threshold=0.3 masks_only=0 show_masks=0"
    }
    assert ca.to_infotext(ca.CloraArgs(refinement_steps=()))[ca.INFOTEXT_KEY].count("refine=-") == 1
    back = ca.from_infotext(parse_infotext_line(infotext_line(params)))
    assert back == a  # tags-only run: the table stays off on paste (tags are in the pasted prompt)
    assert ca.from_infotext({"Steps": "20"}) is None
    assert (
        ca.to_infotext(ca.validate({"loras": [["a", 1, "cat"]], "enabled": True}), include_table=False)
        == params
    )


def test_infotext_errors():
    with pytest.raises(ca.CloraArgsError, match="key=value"):
        ca.from_infotext({ca.INFOTEXT_KEY: "latent"})
    with pytest.raises(ca.CloraArgsError, match="unknown CLoRA infotext key 'thresh'"):
        ca.from_infotext({ca.INFOTEXT_KEY: "thresh=0.3"})
    with pytest.raises(ca.CloraArgsError, match="not valid JSON"):
        ca.from_infotext({ca.INFOTEXT_KEY: "", ca.INFOTEXT_TABLE_KEY: "[oops"})
    # an older infotext with fewer keys: the rest take defaults
    assert ca.from_infotext({ca.INFOTEXT_KEY: "steps=3"}) == ca.CloraArgs(
        update_steps=3, mask_rule="paper", region_prompt="scene", base_uncond=0.0
    )
    assert ca.from_infotext({ca.INFOTEXT_KEY: "refine=-"}).refinement_steps == ()


# ------------------------------------------------------------------------------------------ syntax = table


def test_syntax_and_table_produce_the_same_bindings():
    with_tags = "a fluffy cat<clora:mycat:0.8:words=fluffy cat:trigger=sks> and a dog<clora:mydog:0.5:0.25>"
    plain = "a fluffy cat and a dog"
    from_tags = ca.resolve(ca.CloraArgs(), with_tags)
    rows = ca.rows_from_prompt(from_tags)
    assert rows == (ca.LoraRow("mycat", 0.8, "fluffy cat", "sks"), ca.LoraRow("mydog", 0.5, "dog", "", 0.25))
    from_table = ca.resolve(
        ca.validate({"enabled": True, "loras": [ca.validate_row(r) for r in rows]}), plain
    )
    assert from_table.prompt == from_tags.prompt == plain
    key = [(b.lora, b.te_weight, b.unet_weight, b.words, b.span, b.trigger) for b in from_tags.bindings]
    assert key == [
        (b.lora, b.te_weight, b.unet_weight, b.words, b.span, b.trigger) for b in from_table.bindings
    ]


def test_resolve_mixes_tags_and_table_and_checks_conflicts():
    args = ca.validate({"enabled": True, "loras": [["mydog", 1, "dog"]]})
    p = ca.resolve(args, "a cat<clora:mycat> and a dog")
    assert p.loras == ["mycat", "mydog"]
    assert [b.source for b in p.bindings] == ["tag", "table"]
    # table off: only the tags
    off = ca.validate({**args.to_dict(), "enabled": False})
    assert ca.resolve(off, "a cat<clora:mycat> and a dog").loras == ["mycat"]
    with pytest.raises(PromptSyntaxError, match="bound twice"):
        ca.resolve(args, "a cat and a dog<clora:mydog>")
    with pytest.raises(PromptSyntaxError, match="same words"):
        ca.resolve(args, "a dog<clora:other>")
    with pytest.raises(PromptSyntaxError, match="not in the prompt"):
        ca.resolve(args, "a cat")


def test_is_active():
    assert not ca.is_active(ca.CloraArgs(), "a cat")
    assert ca.is_active(ca.CloraArgs(), "a cat<clora:c>")
    assert ca.is_active(ca.CloraArgs(), "a cat<clora:c")  # malformed still counts: the parser reports it
    assert not ca.is_active(ca.validate({"enabled": False, "loras": [["a", 1, "cat"]]}), "a cat")
    assert ca.is_active(ca.validate({"enabled": True, "loras": [["a", 1, "cat"]]}), "a cat")
    assert not ca.is_active(ca.validate({"enabled": True}), "a cat")


def test_mode_layout_and_mask_rule_validated_and_round_tripped():
    a = ca.validate(
        {
            "enabled": True,
            "mode": "Routed",
            "layout": " 1, 2 ; 1 ",
            "mask_rule": "paper",
            "loras": [["cat", 1, "cat"], ["dog", 1, "dog"]],
        }
    )
    assert (a.mode, a.layout, a.mask_rule) == ("routed", "1,2;1", "paper")
    params = ca.to_infotext(a)
    assert webui_quote(params[ca.INFOTEXT_KEY]) == params[ca.INFOTEXT_KEY]  # no comma, no quoting
    assert "layout=1_2~1" in params[ca.INFOTEXT_KEY]
    assert ca.from_infotext(parse_infotext_line(infotext_line(params))) == a
    for bad, msg in (
        ({"mode": "sideways"}, "mode must be one of"),
        ({"layout": "1,x"}, "not a positive number"),
        ({"mask_rule": "magic"}, "mask_rule must be one of"),
    ):
        with pytest.raises(ca.CloraArgsError, match=msg):
            ca.validate(bad)


def test_old_infotext_without_mask_rule_restores_the_paper_masks():
    old = {
        ca.INFOTEXT_KEY: "latent=1 steps=auto step=auto refine=0 iters=5 threshold=0.3 masks_only=0 show_masks=0"
    }
    back = ca.from_infotext(old)
    assert back.mask_rule == "paper" and back.latent_update is True and back.mode == "fusion"


def test_region_prompt_and_crops_are_validated_written_and_restored():
    a = ca.validate({"mode": "routed", "layout": "1,1", "region_prompt": "Scene", "region_crops": 0.25})
    assert (a.region_prompt, a.region_crops) == ("scene", 0.25)
    assert a.to_options(20).region_crops == 0.25
    text = ca.to_infotext(a)[ca.INFOTEXT_KEY]
    assert "regions=scene crops=0.25" in text
    assert ca.from_infotext({ca.INFOTEXT_KEY: text}) == a
    with pytest.raises(ca.CloraArgsError, match="region_prompt must be one of concept, scene"):
        ca.validate({"region_prompt": "short"})
    with pytest.raises(ca.CloraArgsError, match="region_crops must lie between 0 and 1"):
        ca.validate({"region_crops": 1.5})
    # an image made before these options existed (routed regions read the scene): restored as it was made
    old = ca.from_infotext({ca.INFOTEXT_KEY: "mode=routed layout=1_1 masks=layout latent=0"})
    assert (old.region_prompt, old.region_crops) == ("scene", 0.0)


def test_base_uncond_is_validated_written_and_restored():
    assert ca.DEFAULTS.base_uncond == 1.0 and ca.DEFAULTS.to_options(20).base_uncond == 1.0
    a = ca.validate({"base_uncond": "0.5"})
    assert a.base_uncond == 0.5 and a.to_options(20).base_uncond == 0.5
    text = ca.to_infotext(a)[ca.INFOTEXT_KEY]
    assert "base_uncond=0.5" in text
    assert ca.from_infotext({ca.INFOTEXT_KEY: text}) == a
    assert (
        ca.from_infotext({ca.INFOTEXT_KEY: ca.to_infotext(ca.DEFAULTS)[ca.INFOTEXT_KEY]}).base_uncond == 1.0
    )
    for bad in (1.5, -0.1, "x"):
        with pytest.raises(ca.CloraArgsError, match="base_uncond"):
            ca.validate({"base_uncond": bad})
    # an image made before the option existed (each region's own uncond): restored as it was made
    old = ca.from_infotext({ca.INFOTEXT_KEY: "mode=routed layout=1_1 masks=layout latent=0"})
    assert old.base_uncond == 0.0 and old.to_options(20).base_uncond == 0.0


def test_a_merged_lora_may_fill_several_rows_with_their_own_triggers():
    a = ca.validate({"loras": [["m", 1, "cat", "sks"], ["m", 1, "dog", "ohwx"]]})
    assert [(r.lora, r.trigger) for r in a.loras] == [("m", "sks"), ("m", "ohwx")]
