"""Fixtures of the HTTP tests against a RUNNING WebUI; see `webui_client` for the environment variables.

Everything here is skipped unless ``LORACLR_WEBUI_URL`` is set, so CI collects and skips these tests.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_client import TEST_PREFIX, URL_ENV, WebUI, pick_loras


@pytest.fixture(scope="session")
def webui() -> WebUI:
    base = os.environ.get(URL_ENV, "").strip()
    if not base:
        pytest.skip(f"no running WebUI: set {URL_ENV}=http://127.0.0.1:7861 to run the HTTP tests")
    client = WebUI(base, float(os.environ.get("LORACLR_WEBUI_TIMEOUT", "1800")))
    deadline = time.monotonic() + 60
    while True:
        try:
            r = client.get("/sdapi/v1/sd-models", timeout=10)
            if r.status == 200:
                break
            problem = f"HTTP {r.status} (is the WebUI started with --api?)"
        except OSError as e:
            problem = str(e)
        if time.monotonic() > deadline:
            pytest.fail(f"{URL_ENV}={base}: the WebUI does not answer /sdapi/v1/sd-models: {problem}")
        time.sleep(2)
    return client


@pytest.fixture(scope="session")
def lora_names(webui: WebUI) -> list[str]:
    """Two LoRAs with trigger words (``LORACLR_WEBUI_LORAS`` or the first two the extension lists)."""
    return pick_loras(webui)


@pytest.fixture(scope="session")
def merged(webui: WebUI, lora_names: list[str]) -> dict[str, Any]:
    """One merge through ``POST /loraclr/v1/merge`` (a fresh output name) → its response and name."""
    name = f"{TEST_PREFIX}{int(time.time())}"
    advanced = json.loads(os.environ.get("LORACLR_WEBUI_MERGE", '{"sample_steps": 2}'))
    body = {
        "loras": lora_names[:2],
        "method": "loraclr",
        "output": {"kind": "lora", "name": name, "rank": 8},
        "advanced": advanced,
    }
    t0 = time.monotonic()
    r = webui.post("/loraclr/v1/merge", body)
    assert r.status == 200, f"merge → {r.status}: {r.text[:2000]}"
    return {"name": name, "response": r.body, "request": body, "seconds": time.monotonic() - t0}
