"""``modules.ui_components`` stand-in (needs gradio, like the real one): Forge's ``InputAccordion``
factory over a hidden checkbox plus an accordion; ``FormRow``; ``ToolButton``."""

import gradio as gr

try:  # gradio 4 writes a .pyi file beside every module defining a Component subclass; not in the repo
    import gradio.component_meta as _component_meta

    _component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
except ImportError:  # gradio 3
    pass


class InputAccordionImpl(gr.Checkbox):
    webui_do_not_create_gradio_pyi_thank_you = True

    def __init__(self, value=None, setup=False, **kwargs):
        if not setup:
            super().__init__(value=value, **kwargs)
            return
        self.accordion_id = kwargs.get("elem_id") or "input-accordion"
        super().__init__(
            value=value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False}
        )
        self.accordion = gr.Accordion(
            label=kwargs.get("label", "Accordion"), open=value, elem_id=self.accordion_id
        )

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)


def InputAccordion(value=None, **kwargs):
    return InputAccordionImpl(value=value, setup=True, **kwargs)


class FormRow(gr.Row):
    webui_do_not_create_gradio_pyi_thank_you = True


class ToolButton(gr.Button):
    webui_do_not_create_gradio_pyi_thank_you = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
