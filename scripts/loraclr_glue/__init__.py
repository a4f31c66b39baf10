"""WebUI glue of sd-webui-loraclr (A1111 1.8–1.10 and Forge), kept thin: the logic lives in ``lib_loraclr``.

This folder is a package next to ``scripts/loraclr_script.py``. The WebUI loads only the ``.py`` files
directly in ``scripts/`` (sub-folders are skipped), and ``loraclr_script.py`` imports this package by
putting ``scripts/`` on ``sys.path`` for the duration of the import.

- `host`        — capability detection (A1111 or Forge), never by version strings.
- `engine`      — the one place that calls the ``lib_loraclr`` engines (small adapter functions).
- `lora_files`  — LoRA lookup by name (the built-in Lora's registry, else the LoRA folder).
- `clora_run`   — one CLoRA run: prompt bindings → branches → a host adapter; hook bookkeeping.
- `adapters`    — `A1111Adapter` (CFG denoiser wrapper), `ForgeAdapter` (UNet function wrapper).
- `network`     — the ``clora`` extra network (our tags never reach the built-in Lora).
- `merge_job`   — merge request validation and execution, shared by the tab and the REST route.
- `api`         — ``/loraclr/v1/merge`` and ``/loraclr/v1/inspect``.
- `ui_clora`, `ui_merge` — gradio UIs (gradio imported lazily, inside the functions).
"""
