"""The CLoRA accordion (txt2img and img2img). gradio is imported inside `build` only.

``ui()`` returns ``[enabled, options]``: the accordion's flag and ONE ``gr.State`` dict holding every
option and the table rows (validated by `lib_loraclr.clora_args.validate` in the hooks). Each visible
control writes its key into that dict on change, so API callers send ``[enabled, {dict}]`` and the UI
sends the same shape; the controls can be reordered without breaking anyone.
"""

from __future__ import annotations

from typing import Any

from lib_loraclr import clora_args as ca
from lib_loraclr.clora_controls import HELP, UI_DEFAULTS, default_state, paste_value, update_state


def table_height(dataframe_cls: Any, pixels: int) -> dict[str, Any]:
    """``{"height": pixels}`` where the Dataframe has a fixed pixel height by default (gradio 4: 500 px, which
    a one-row table inside a collapsed accordion fills with blank space, seen in Forge), else ``{}``
    (gradio 3.41: ``height=None`` already fits the rows)."""
    import inspect

    try:
        default = inspect.signature(dataframe_cls.__init__).parameters["height"].default
    except (KeyError, TypeError, ValueError):
        return {}
    return {"height": pixels} if isinstance(default, int) and not isinstance(default, bool) else {}


def build(script: Any, is_img2img: bool) -> list[Any]:
    import gradio as gr
    from modules.ui_components import InputAccordion

    tab = "img2img" if is_img2img else "txt2img"
    controls: dict[str, Any] = {}
    with InputAccordion(False, label="CLoRA", elem_id=f"loraclr_{tab}_accordion") as enabled:
        gr.HTML(HELP, elem_id=f"loraclr_{tab}_help")
        with gr.Row():
            controls["mode"] = gr.Radio(
                list(ca.MODES),
                value=UI_DEFAULTS["mode"],
                label="Mode",
                info="fusion: one pass per LoRA; routed: one pass, each LoRA in its region",
                elem_id=f"loraclr_{tab}_mode",
            )
            controls["layout"] = gr.Textbox(
                value=UI_DEFAULTS["layout"],
                label="Layout (empty = automatic)",
                placeholder="1,1 = two columns; 1,1;1 = two on top, one below",
                elem_id=f"loraclr_{tab}_layout",
            )
            controls["mask_rule"] = gr.Radio(
                list(ca.MASK_RULES),
                value=UI_DEFAULTS["mask_rule"],
                label="Automatic masks",
                elem_id=f"loraclr_{tab}_mask_rule",
            )
        with gr.Row():
            controls["region_prompt"] = gr.Radio(
                list(ca.REGION_PROMPTS),
                value=UI_DEFAULTS["region_prompt"],
                label="Routed: each region reads",
                info="concept: its own words (sks cat); scene: the whole prompt",
                elem_id=f"loraclr_{tab}_region_prompt",
            )
            for key, label, info in (
                ("region_crops", "Routed: region crops (0 = off)", None),
                (
                    "base_uncond",
                    "Guide from the base model (1 = recommended, 0 = the paper's CFG)",
                    "the concepts' negative half without their LoRAs",
                ),
            ):  # weights in [0, 1]
                controls[key] = gr.Slider(
                    0.0,
                    1.0,
                    value=UI_DEFAULTS[key],
                    step=0.05,
                    label=label,
                    info=info,
                    elem_id=f"loraclr_{tab}_{key}",
                )
        with gr.Row():
            controls["latent_update"] = gr.Checkbox(
                UI_DEFAULTS["latent_update"], label="Latent update", elem_id=f"loraclr_{tab}_latent_update"
            )
            controls["masks_only"] = gr.Checkbox(
                UI_DEFAULTS["masks_only"],
                label="Masks only (fast, no gradients)",
                elem_id=f"loraclr_{tab}_masks_only",
            )
            controls["show_masks"] = gr.Checkbox(
                UI_DEFAULTS["show_masks"],
                label="Save masks beside the images",
                elem_id=f"loraclr_{tab}_show_masks",
            )
            controls["mask_preview"] = gr.Checkbox(
                UI_DEFAULTS["mask_preview"],
                label="Show masks in the gallery",
                elem_id=f"loraclr_{tab}_mask_preview",
            )
        with gr.Row():
            controls["update_steps"] = gr.Slider(
                0,
                150,
                value=UI_DEFAULTS["update_steps"],
                step=1,
                label="Latent update steps (0 = recommended)",
                elem_id=f"loraclr_{tab}_update_steps",
            )
            controls["mask_threshold"] = gr.Slider(
                0.05,
                0.95,
                value=UI_DEFAULTS["mask_threshold"],
                step=0.05,
                label="Mask threshold",
                elem_id=f"loraclr_{tab}_mask_threshold",
            )
        with gr.Accordion("Advanced", open=False, elem_id=f"loraclr_{tab}_advanced"), gr.Row():
            controls["step_size"] = gr.Number(
                value=UI_DEFAULTS["step_size"],
                label="Step size (0 = default)",
                elem_id=f"loraclr_{tab}_step_size",
            )
            controls["refinement_steps"] = gr.Textbox(
                value=UI_DEFAULTS["refinement_steps"],
                label="Refinement at steps (comma-separated)",
                elem_id=f"loraclr_{tab}_refinement_steps",
            )
            controls["refinement_iters"] = gr.Slider(
                0,
                50,
                value=UI_DEFAULTS["refinement_iters"],
                step=1,
                label="Refinement iterations",
                elem_id=f"loraclr_{tab}_refinement_iters",
            )
        controls["loras"] = gr.Dataframe(
            value=UI_DEFAULTS["loras"],
            headers=list(ca.TABLE_HEADERS),
            datatype=["str", "number", "str", "str"],
            row_count=(1, "dynamic"),
            col_count=(4, "fixed"),
            type="array",
            interactive=True,
            label="LoRAs bound to words (used when the switch is on)",
            elem_id=f"loraclr_{tab}_table",
            **table_height(gr.Dataframe, 180),
        )
    options = gr.State(value=default_state())
    for key, comp in controls.items():
        comp.change(
            fn=lambda state, value, _k=key: update_state(state, _k, value),
            inputs=[options, comp],
            outputs=[options],
            show_progress="hidden",
        )
    script.infotext_fields = [(enabled, paste_value("enabled"))] + [
        (comp, paste_value(key)) for key, comp in controls.items()
    ]
    script.paste_field_names = [ca.INFOTEXT_KEY, ca.INFOTEXT_TABLE_KEY]
    return [enabled, options]
