"""A bug is HTTP 500, a user's mistake HTTP 400, in a real host (issue 13's real-host check).

Needs the host started with ``tests/webui/fault_extension`` installed beside the extension and
``LORACLR_FAULT=merge`` (every merge raises a deliberate ``RuntimeError`` inside the library), and
``LORACLR_WEBUI_FAULT=1`` here; skipped otherwise (a normal host would run the merge for real).
"""

from __future__ import annotations

import os

import pytest
from webui_client import TEST_PREFIX

pytestmark = pytest.mark.skipif(
    os.environ.get("LORACLR_WEBUI_FAULT") != "1",
    reason="set LORACLR_WEBUI_FAULT=1 against a host started with the fault extension and LORACLR_FAULT=merge",
)


def test_internal_error_is_500_and_user_error_is_400(webui, lora_names):
    body = {
        "loras": lora_names[:2],
        "method": "lsq",
        "output": {"kind": "lora", "name": TEST_PREFIX + "fault"},
    }
    r = webui.post("/loraclr/v1/merge", body)
    assert r.status == 500, r.text
    assert "RuntimeError" in r.text and "deliberate internal error" in r.text, (
        r.text
    )  # the log has the traceback
    r = webui.post("/loraclr/v1/merge", {**body, "loras": lora_names[:1]})
    assert r.status == 400, r.text
    assert "Traceback" not in r.text and len(r.text) > 20, r.text
    r = webui.get("/loraclr/v1/loras")
    assert r.status == 200 and TEST_PREFIX + "fault" not in r.text  # nothing was written
