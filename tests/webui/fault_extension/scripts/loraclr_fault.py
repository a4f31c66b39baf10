"""A test-only WebUI extension: a DELIBERATE internal error inside sd-webui-loraclr's merge, for the real-host
check that a bug answers HTTP 500 ("internal error", traceback in the console) and a user error 400.

Install it beside the extension (symlink this folder into the host's ``extensions/``) and start the host
with ``LORACLR_FAULT=merge``: every merge then raises ``RuntimeError`` inside the library's pipeline (after
the request was validated, where a real bug would). Without the variable it does nothing. Never shipped:
it lives under ``tests/webui/``.
"""

from __future__ import annotations

import os


def _inject() -> None:
    from lib_loraclr.merge import pipeline

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("deliberate internal error (LORACLR_FAULT=merge)")

    pipeline._validate = broken  # type: ignore[assignment]
    print("[loraclr-fault] merges will raise a deliberate RuntimeError")


if "merge" in os.environ.get("LORACLR_FAULT", "").split(","):
    from modules import script_callbacks  # type: ignore[import-not-found]

    script_callbacks.on_app_started(lambda *_: _inject())
