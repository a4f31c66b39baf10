"""sd-webui-loraclr: the CLoRA script (txt2img / img2img accordion), the merge tab, the REST routes.

The only file the WebUI loads from ``scripts/``. It stays thin: everything it does is delegated to the
``loraclr_glue`` package next to it (imported with ``scripts/`` briefly on ``sys.path``), which in turn
calls the pure ``lib_loraclr`` library. Only one ``Script`` subclass is defined here (the WebUI
registers every ``Script`` subclass found in this module's namespace, so none is imported by name).
"""

from __future__ import annotations

import os
import sys

from modules import script_callbacks, scripts

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
try:
    from loraclr_glue import api, clora_run, network, script_logic, ui_clora, ui_merge

    from lib_loraclr import api_guard  # importable wherever the glue is (the glue imports lib_loraclr)
finally:
    if sys.path and sys.path[0] == _HERE:
        sys.path.pop(0)

LOGIC = script_logic.CloraScriptLogic()
SERVICE = api.MergeService()
# A1111 ≥ 1.10 and Forge have this hook; A1111 1.8/1.9 install at the first CFG-denoiser call instead
HAS_BEFORE_EVERY_SAMPLING = callable(getattr(scripts.Script, "process_before_every_sampling", None))


class LoraclrScript(scripts.Script):
    sorting_priority = 15  # Forge: place among the other always-on scripts

    def title(self):
        return "CLoRA"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return ui_clora.build(self, is_img2img)

    def process(self, p, *args):
        LOGIC.process(p, *args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        LOGIC.before_sampling(p)

    def postprocess_batch(self, p, *args, **kwargs):
        LOGIC.postprocess_batch(p)

    def postprocess(self, p, processed, *args):
        LOGIC.postprocess(p, processed)


def _on_before_ui():
    from modules import extra_networks

    network.register(extra_networks)


def _on_ui_tabs():
    return ui_merge.build(SERVICE)


def _on_app_started(demo, app):
    api.register_routes(app, SERVICE)
    api_guard.install(app, lambda body: clora_run.check_request(body, SERVICE.lora_folder()))


def _on_cfg_denoiser(params):
    LOGIC.cfg_denoiser(params)


def _on_unloaded():
    LOGIC.unload()


script_callbacks.on_before_ui(_on_before_ui)
script_callbacks.on_ui_tabs(_on_ui_tabs)
script_callbacks.on_app_started(_on_app_started)
script_callbacks.on_script_unloaded(_on_unloaded)
if not HAS_BEFORE_EVERY_SAMPLING:  # A1111 1.8 / 1.9
    script_callbacks.on_cfg_denoiser(_on_cfg_denoiser)

__all__ = ["LoraclrScript", "clora_run"]
