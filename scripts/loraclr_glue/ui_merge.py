"""The "LoRACLR merge" tab (``on_ui_tabs``). gradio and the WebUI modules are imported inside `build`.

The click handler goes through the WebUI's ``call_queue.wrap_gradio_gpu_call`` with the
``loraclr_merge_submit`` JavaScript (``javascript/loraclr.js``), the Checkpoint Merger's pattern:
a task id, ``requestProgress`` polling ``shared.state``, the queue lock, and an Interrupt button that
sets ``shared.state.interrupted`` (checked between merge stages; nothing is written before the end).
The handler's last output is an HTML status, as ``wrap_gradio_gpu_call`` requires.

After a LoRA is saved, an opt-in preview (on by default, small size and few steps) renders one image per
concept and one with all concepts through the WebUI's own txt2img (`preview`), shown in a gallery; a
preview that fails is reported in the status and never loses the saved file.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from lib_loraclr.folder_merge import request_from_table, result_message, table_rows
from lib_loraclr.merge.job import DEFAULT_RANK
from lib_loraclr.merge.request import PRESETS
from lib_loraclr.merge.solvers import METHODS

from . import preview
from .api import MergeService, ServiceError
from .lora_files import list_host_loras
from .ui_clora import table_height

ID = "loraclr_merge"
TABLE_HEADERS = ["LoRA", "trigger words", "TE weight", "UNet weight"]
REPORT_HEADERS = ["concept", "layers", "fidelity error", "interference", "base change"]


def lora_choices(service: MergeService, search: str = "") -> list[str]:
    return list(list_host_loras(service.shared, search))


def table_for(
    service: MergeService, selected: Sequence[str], current: Sequence[Sequence[Any]] | None
) -> list[list[Any]]:
    return table_rows(selected, current, list_host_loras(service.shared))


def status_html(text: str, error: bool = False) -> str:
    cls = "error" if error else "loraclr-status"
    return f"<div class='{cls}'>{html.escape(text).replace(chr(10), '<br>')}</div>"


def merge_click(
    service: MergeService,
    id_task: str,
    table: Any,
    method: str,
    preset: str,
    sample_steps: float,
    seed: float,
    kind: str,
    name: str,
    rank: float,
    overwrite: bool,
    show_preview: bool = False,
    preview_size: float = preview.DEFAULT_SIZE,
    preview_steps: float = preview.DEFAULT_STEPS,
    refine_steps: float = -1,
    device: str = "Auto",
) -> list[Any]:
    """Handler body (inside ``wrap_gradio_gpu_call``): ``[report rows, ready prompt, preview images, status html]``."""
    body = request_from_table(
        table, method, preset, sample_steps, seed, kind, name, rank, overwrite, refine_steps, device
    )
    try:
        result = service.merge(body, locked=False)
    except ServiceError as e:
        return [[], "", [], status_html(e.message, error=True)]
    rows = [[r[0], r[1], r[2], r[3], r[4]] for r in result["report_rows"]]
    msg = result_message(result, int(rank))
    images: list[Any] = []
    if show_preview and result["kind"] == "lora":
        settings = preview.PreviewSettings(size=int(preview_size), steps=int(preview_steps), seed=int(seed))
        try:
            images = service.preview(result, settings)
        except Exception as e:  # the merge is saved; say why the preview is missing
            msg += f" Preview failed: {type(e).__name__}: {e}"
    elif show_preview:
        msg += " (no preview for a checkpoint: load it and use txt2img)"
    return [rows, result["prompt"], images, status_html(msg)]


def gpu_present() -> bool:
    """Whether torch sees a CUDA GPU (the tab's "Merge on: GPU" choice is offered only then)."""
    import torch

    return bool(torch.cuda.is_available())


def js_kwarg(listener: Any) -> str:
    """``_js`` (gradio 3, and Forge's shim for gradio 4) or ``js`` (plain gradio 4) for an event listener."""
    import inspect

    try:
        params = inspect.signature(listener).parameters
    except (TypeError, ValueError):
        return "_js"
    return "_js" if "_js" in params or "js" not in params else "js"


def build(service: MergeService | None = None) -> list[tuple[Any, str, str]]:
    import gradio as gr
    from modules import call_queue, shared
    from modules.ui_components import FormRow, ToolButton

    service = service or MergeService()
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.HTML(
            "<p>Merge 2 or more concept LoRAs into one that still draws every concept (LoRACLR), "
            "on the loaded checkpoint.</p>"
        )
        with FormRow():
            search = gr.Textbox(label="Search LoRAs", elem_id=f"{ID}_search", scale=1)
            picker = gr.Dropdown(
                choices=lora_choices(service),
                multiselect=True,
                label="LoRAs to merge",
                elem_id=f"{ID}_loras",
                scale=3,
            )
            refresh = ToolButton(value="\U0001f504", elem_id=f"{ID}_refresh")
        table = gr.Dataframe(
            value=[["", "", 1.0, 1.0]],
            headers=TABLE_HEADERS,
            datatype=["str", "str", "number", "number"],
            col_count=(4, "fixed"),
            row_count=(1, "dynamic"),
            type="array",
            interactive=True,
            label="Trigger words and weights",
            elem_id=f"{ID}_table",
            **table_height(gr.Dataframe, 260),
        )
        with FormRow():
            method = gr.Radio(
                list(METHODS), value="loraclr", label="Method (loraclr recommended)", elem_id=f"{ID}_method"
            )
            preset = gr.Radio(
                list(PRESETS), value="recommended", label="LoRACLR preset", elem_id=f"{ID}_preset"
            )
        with gr.Accordion("Advanced", open=False, elem_id=f"{ID}_advanced"), FormRow():
            sample_steps = gr.Slider(
                1, 100, value=20, step=1, label="Feature sampling steps", elem_id=f"{ID}_steps"
            )
            seed = gr.Number(value=0, precision=0, label="Seed", elem_id=f"{ID}_seed")
            refine_steps = gr.Slider(
                -1,
                500,
                value=-1,
                step=1,
                label="Output refinement steps (-1 = automatic: 100 when the merge runs on a GPU, off on the "
                "CPU; 0 = off; slow on a CPU)",
                elem_id=f"{ID}_refine",
            )
            device = gr.Radio(
                ["Auto", "CPU", "GPU"],
                value="Auto",
                label="Merge on (Auto: the GPU when it has room beside the loaded model, else the CPU)",
                interactive=gpu_present(),
                elem_id=f"{ID}_device",
            )
        with FormRow():
            kind = gr.Radio(["LoRA", "checkpoint"], value="LoRA", label="Save as", elem_id=f"{ID}_kind")
            out_name = gr.Textbox(label="Output name", placeholder="my_merge", elem_id=f"{ID}_name")
            rank = gr.Slider(4, 256, value=DEFAULT_RANK, step=4, label="LoRA rank", elem_id=f"{ID}_rank")
            overwrite = gr.Checkbox(False, label="Overwrite", elem_id=f"{ID}_overwrite")
        with FormRow():
            show_preview = gr.Checkbox(
                True, label="Preview after merging (WebUI txt2img)", elem_id=f"{ID}_preview"
            )
            size, steps = preview.DEFAULT_SIZE, preview.DEFAULT_STEPS
            preview_size = gr.Slider(
                64, 512, value=size, step=64, label="Preview size", elem_id=f"{ID}_preview_size"
            )
            preview_steps = gr.Slider(
                1, 50, value=steps, step=1, label="Preview steps", elem_id=f"{ID}_preview_steps"
            )
        with FormRow():
            run = gr.Button("Merge", variant="primary", elem_id=f"{ID}_run")
            interrupt = gr.Button("Interrupt", elem_id=f"{ID}_interrupt")
        progress = gr.HTML(elem_id=f"{ID}_progress")
        report = gr.Dataframe(
            headers=REPORT_HEADERS,
            label="Fidelity report (lower errors are better)",
            interactive=False,
            elem_id=f"{ID}_report",
            **table_height(gr.Dataframe, 320),
        )
        with FormRow():
            prompt = gr.Textbox(label="Ready prompt", elem_id=f"{ID}_prompt", interactive=True)
            send = gr.Button("Send to txt2img", elem_id=f"{ID}_send")
        gallery = gr.Gallery(
            label="Preview: each concept, then all together",
            columns=4,
            height="auto",
            object_fit="contain",
            elem_id=f"{ID}_gallery",
        )
        status = gr.HTML(elem_id=f"{ID}_status")
        previews = [show_preview, preview_size, preview_steps]
        dummy_task = gr.Textbox(visible=False, elem_id=f"{ID}_task")

        for event in (search.change, refresh.click):
            event(fn=lambda s: gr.update(choices=lora_choices(service, s)), inputs=[search], outputs=[picker])
        picker.change(
            fn=lambda sel, cur: table_for(service, sel, cur), inputs=[picker, table], outputs=[table]
        )
        interrupt.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
        handler = call_queue.wrap_gradio_gpu_call(
            lambda *a: merge_click(service, *a), extra_outputs=[gr.update(), gr.update(), gr.update()]
        )
        js = js_kwarg(run.click)
        run.click(
            fn=handler,
            inputs=[
                dummy_task,
                table,
                method,
                preset,
                sample_steps,
                seed,
                kind,
                out_name,
                rank,
                overwrite,
                *previews,
                refine_steps,
                device,
            ],
            outputs=[report, prompt, gallery, status],
            **{js: "loraclr_merge_submit"},
        )
        send.click(fn=None, inputs=[prompt], outputs=[], **{js: "loraclr_send_to_txt2img"})
        _ = progress
    return [(tab, "LoRACLR merge", "loraclr_merge")]
