"""WebUI glue of sd-webui-loraclr (A1111 1.8–1.10 and Forge), kept thin: the logic lives in ``lib_loraclr``.

This folder is a package next to ``scripts/loraclr_script.py``. The WebUI loads only the ``.py`` files
directly in ``scripts/`` (sub-folders are skipped), and ``loraclr_script.py`` imports this package by
putting ``scripts/`` on ``sys.path`` for the duration of the import.

- `host`        — capability detection (A1111 or Forge), never by version strings.
- `lora_files`  — LoRA lookup by name (the built-in Lora's registry, else `lib_loraclr.lora_folder`).
- `clora_run`   — one CLoRA run: prompt bindings → branches → a host adapter; hook bookkeeping.
- `adapters`    — `A1111Adapter` (model call wrapper), `ForgeAdapter` (UNet function wrapper), both over
  `lib_loraclr.clora.clora_call`.
- `network`     — the ``clora`` extra network (our tags never reach the built-in Lora).
- `merge_job`   — `lib_loraclr.folder_merge.run_merge` with the WebUI's LoRA lookup (tab and REST route).
- `api`         — ``/loraclr/v1/merge`` and ``/loraclr/v1/inspect``.
- `ui_clora`, `ui_merge` — gradio UIs (gradio imported lazily, inside the functions).
"""
