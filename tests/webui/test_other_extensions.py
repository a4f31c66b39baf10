"""Another extension's CFG callbacks keep firing while CLoRA runs, in a real host (issue #10).

Needs ``tests/webui/probe_extension`` installed beside the extension (it counts ``on_cfg_denoiser``,
``on_cfg_denoised`` and ``on_cfg_after_cfg`` calls) and ``LORACLR_WEBUI_PROBE=1`` here; skipped otherwise.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("LORACLR_WEBUI_PROBE") != "1",
    reason="set LORACLR_WEBUI_PROBE=1 against a host with tests/webui/probe_extension installed",
)

STEPS = 2


def counts_after(webui, prompt: str, options: dict | None) -> dict:
    assert webui.post("/loraclr-probe/v1/reset", {}).status == 200
    payload = {"steps": STEPS}
    if options is not None:
        payload["alwayson_scripts"] = {"CLoRA": {"args": [False, options]}}
    _info, text = webui.txt2img(prompt, **payload)
    assert "CLoRA error" not in text, text
    r = webui.get("/loraclr-probe/v1/counts")
    assert r.status == 200, r.text
    return r.body


@pytest.mark.parametrize("options", [{}, {"mode": "routed", "layout": "1,1"}], ids=["fusion", "routed"])
def test_cfg_callbacks_fire_with_clora_as_without(webui, lora_names, options):
    a, b = lora_names[:2]
    plain = counts_after(webui, "a photo of a cat and a dog", None)
    assert plain["cfg_denoiser"] >= STEPS, plain  # the host calls them at all
    with_clora = counts_after(webui, f"a photo of a cat<clora:{a}> and a dog<clora:{b}>", options)
    assert with_clora == plain, (with_clora, plain)
