"""With CLoRA off, the extension changes nothing: a generation is bit-identical (decoded pixels and
infotext) to the same host WITHOUT the extension (skipped without ``LORACLR_WEBUI_REFERENCE``).

Make the references once per host and checkpoint, with the extension NOT installed:
``LORACLR_WEBUI_URL=… python tests/webui/webui_client.py reference FOLDER LORA_NAME``; then install the
extension, restart the host with the same arguments, and run this test with
``LORACLR_WEBUI_REFERENCE=FOLDER``. Each reference case is run twice: without script arguments (the
accordion's defaults) and with the accordion explicitly off (``[False, {}]``).
"""

from __future__ import annotations

import glob
import json
import os

import pytest
from webui_client import REFERENCE_ENV, decoded_pixels


def _cases() -> list[str]:
    folder = os.environ.get(REFERENCE_ENV, "").strip()
    return sorted(glob.glob(os.path.join(folder, "*.json"))) if folder else []


@pytest.mark.parametrize("explicit_off", [False, True], ids=["defaults", "explicit_off"])
@pytest.mark.parametrize("ref_file", _cases() or [None], ids=lambda p: os.path.basename(p) if p else "none")
def test_clora_off_is_bit_identical_to_the_host_without_the_extension(webui, ref_file, explicit_off):
    if ref_file is None:
        pytest.skip(f"set {REFERENCE_ENV} to a folder of references made without the extension")
    with open(ref_file, encoding="utf8") as f:
        ref = json.load(f)
    body = dict(ref["payload"])
    if explicit_off:
        body["alwayson_scripts"] = {"CLoRA": {"args": [False, {}]}}
    r = webui.post("/sdapi/v1/txt2img", body)
    assert r.status == 200, r.text[:2000]
    info = json.loads(r.body["info"])
    assert len(r.body["images"]) == len(ref["images"])
    for i, (got, want) in enumerate(zip(r.body["images"], ref["images"])):
        assert decoded_pixels(got) == decoded_pixels(want), f"{ref['case']}: image {i} differs"
    assert info["infotexts"] == ref["infotexts"], "the infotext changed with CLoRA off"
