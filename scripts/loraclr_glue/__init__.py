"""WebUI glue of sd-webui-loraclr (A1111 1.8–1.10 and Forge), kept thin: the logic lives in ``lib_loraclr``.

This folder is a package next to ``scripts/loraclr_script.py``. The WebUI loads only the ``.py`` files
directly in ``scripts/`` (sub-folders are skipped), and ``loraclr_script.py`` imports this package by
putting ``scripts/`` on ``sys.path`` for the duration of the import.

- `lora_files`  — LoRA lookup by name (the built-in Lora's registry, else `lib_loraclr.lora_folder`) and
  the merge with it.
- `clora_run`   — the CLoRA runs in progress (`lib_loraclr.clora_job` with the WebUI's LoRA lookup).
- `script_logic` — what the CLoRA script does in each WebUI hook.
- `adapters`    — `A1111Adapter`, `ForgeAdapter`: install `lib_loraclr.clora.host_calls` on each host.
- `host_models` — the merge's UNet and tokenizer from Forge's own classes and files. Capability
  detection (A1111 or Forge, never by version strings) is `lib_loraclr.host_objects`.
- `network`     — the ``clora`` extra network (our tags never reach the built-in Lora).
- `api`, `preview` — ``/loraclr/v1/*`` routes and the merge service; the merge preview by txt2img.
- `ui_clora`, `ui_merge` — gradio UIs (gradio imported lazily, inside the functions).
"""
