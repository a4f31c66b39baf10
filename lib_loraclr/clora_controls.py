"""The CLoRA accordion's state: ONE dict of every option and the table rows (validated by
`lib_loraclr.clora_args.validate` in the script's hooks), the controls' defaults, and the conversions
between a control's value, the dict's value and a pasted infotext. The gradio UI
(``scripts/loraclr_glue/ui_clora.py``) only lays the controls out and wires them to these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import clora_args as ca
from .clora_job import LOG_PREFIX

#: the accordion's help: the prompt syntax and which models CLoRA serves (HTML)
HELP = """
<div class="loraclr-help">
<b>Bind a LoRA to words of the prompt:</b>
<code>a cat&lt;clora:mycat:0.9&gt; and a dog&lt;clora:mydog&gt;</code> binds the word right before the tag.
Several words: <code>&lt;clora:mycat:words=fluffy cat&gt;</code>. Trigger words:
<code>&lt;clora:mycat:trigger=sks&gt;</code> (default: the LoRA's own). Separate weights:
<code>&lt;clora:mycat:0.8:0.6&gt;</code> or <code>te=…:unet=…</code>.
A merged LoRA: bind it once per concept, each with its trigger
(<code>&lt;clora:my_merge:trigger=sks&gt;</code>); mode routed + a layout gives each concept its region.
<code>&lt;lora:…&gt;</code> tags keep their global meaning (e.g. a style). Tags in the prompt always run
CLoRA with the options below; this switch adds the table's rows.
For SD1.x, SD2.x and SDXL-family checkpoints (Pony, Illustrious…); with Flux, SD3 and other transformer
models CLoRA stays off and says so in the image's infotext.
</div>
"""

#: option key → the control's default value (`ui_to_arg` turns a control value into the argument)
UI_DEFAULTS: dict[str, Any] = {
    "mode": ca.DEFAULTS.mode,
    "layout": ca.DEFAULTS.layout,
    "region_prompt": ca.DEFAULTS.region_prompt,
    "region_crops": ca.DEFAULTS.region_crops,
    "base_uncond": ca.DEFAULTS.base_uncond,
    "mask_rule": ca.DEFAULTS.mask_rule,
    "latent_update": ca.DEFAULTS.latent_update,
    "update_steps": 0,  # 0 = recommended (None in the arguments)
    "mask_threshold": ca.DEFAULTS.mask_threshold,
    "masks_only": False,
    "show_masks": False,
    "mask_preview": True,  # the gallery shows the masks unless the user turns it off
    "step_size": 0,  # 0 = engine default
    "refinement_steps": "0",
    "refinement_iters": ca.DEFAULTS.refinement_iters,
    "loras": [["", 1.0, "", ""]],
}


def ui_to_arg(key: str, value: Any) -> Any:
    """A control's value → the argument dict's value (0 means "recommended/default" for two sliders)."""
    if key in ("update_steps", "step_size") and (value in (None, "") or float(value) == 0):
        return None
    return value


def arg_to_ui(key: str, value: Any) -> Any:
    """The inverse of `ui_to_arg` (for pasting an infotext into the controls)."""
    if key in ("update_steps", "step_size") and value is None:
        return 0
    if key == "refinement_steps":
        return ", ".join(str(s) for s in value)
    if key == "loras":
        rows = [[r.lora, r.weight, r.words, r.trigger] for r in value]
        return rows or UI_DEFAULTS["loras"]
    return value


def default_state() -> dict[str, Any]:
    return {k: ui_to_arg(k, v) for k, v in UI_DEFAULTS.items()}


def update_state(state: dict[str, Any] | None, key: str, value: Any) -> dict[str, Any]:
    """New state dict with ``key`` set from a control's value (used by every control's change event)."""
    new = dict(state or default_state())
    new[key] = ui_to_arg(key, value)
    return new


def paste_value(key: str) -> Callable[[dict[str, Any]], Any]:
    """``infotext_fields`` callable: the control value for ``key`` from parsed infotext (None = unchanged)."""

    def get(params: dict[str, Any]) -> Any:
        try:
            args = ca.from_infotext(params)
        except ca.CloraArgsError as e:
            print(f"{LOG_PREFIX} CLoRA infotext not restored: {e}")
            return None
        if key == "enabled":
            return bool(args is not None and args.enabled)
        if args is None:
            return None
        return arg_to_ui(key, getattr(args, key))

    return get
