"""Run by the WebUI on every launch (separate process, webui root on PYTHONPATH).

The WebUI already provides everything sd-webui-loraclr needs (torch, safetensors, gradio, numpy,
einops, tqdm, transformers), so this only checks and installs what a stripped-down install lacks.
Fast and idempotent: no pip call when everything imports.
"""

from __future__ import annotations

import importlib.util

REQUIRED = {"safetensors": "safetensors", "einops": "einops", "tqdm": "tqdm", "numpy": "numpy"}


def missing() -> list[str]:
    return [pkg for mod, pkg in REQUIRED.items() if importlib.util.find_spec(mod) is None]


def main() -> None:
    todo = missing()
    if not todo:
        return
    try:
        import launch  # the WebUI's launcher module

        if getattr(getattr(launch, "args", None), "skip_install", False):
            return
        for pkg in todo:
            launch.run_pip(f"install {pkg}", f"sd-webui-loraclr requirement: {pkg}")
    except Exception as e:  # never block the WebUI's start
        print(f"[sd-webui-loraclr] could not install {todo}: {e}")


main()
