"""The CLoRA accordion's state dict: defaults, control ↔ argument values, infotext paste."""

from __future__ import annotations

from lib_loraclr import clora_args as ca
from lib_loraclr.clora_controls import UI_DEFAULTS, arg_to_ui, default_state, paste_value, update_state


def test_default_state_validates_to_the_argument_defaults() -> None:
    state = default_state()
    assert set(state) == set(UI_DEFAULTS)
    assert state["update_steps"] is None and state["step_size"] is None  # the sliders' 0 = recommended
    args = ca.validate(state)
    assert (args.mode, args.layout, args.latent_update) == (ca.DEFAULTS.mode, ca.DEFAULTS.layout, False)


def test_each_control_writes_only_its_key() -> None:
    state = default_state()
    new = update_state(state, "layout", "1,2;1")
    assert new["layout"] == "1,2;1" and state["layout"] == UI_DEFAULTS["layout"]  # the old dict is untouched
    assert {k for k in new if new[k] != state[k]} == {"layout"}
    assert update_state(new, "update_steps", 12)["update_steps"] == 12
    assert update_state(new, "update_steps", 0)["update_steps"] is None
    assert update_state(None, "mode", "routed")["mode"] == "routed"


def test_an_infotext_pastes_back_into_the_controls() -> None:
    args = ca.validate(
        {"enabled": True, "layout": "1,1", "mode": "routed", "update_steps": 7, "refinement_steps": "0, 3"},
        loras=[["mycat", 0.9, "cat", "sks"]],
    )
    params = ca.to_infotext(args)
    assert paste_value("enabled")(params) is True
    assert paste_value("layout")(params) == "1,1"
    assert paste_value("mode")(params) == "routed"
    assert paste_value("update_steps")(params) == 7
    assert paste_value("refinement_steps")(params) == "0, 3"
    assert paste_value("loras")(params) == [["mycat", 0.9, "cat", "sks"]]
    assert paste_value("step_size")(params) == arg_to_ui("step_size", None) == 0
    assert paste_value("layout")({}) is None  # no CLoRA in the infotext: the control keeps its value
    assert paste_value("enabled")({}) is False
    assert paste_value("mode")({ca.INFOTEXT_KEY: "nonsense=1"}) is None  # a bad infotext changes nothing
