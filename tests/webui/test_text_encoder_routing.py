"""CLoRA encodes each concept's prompt with that concept LoRA's text-encoder part, on every text encoder of
the model: SD1 CLIP ViT-L; SDXL CLIP ViT-L and OpenCLIP bigG (whose output also gives the pooled vector).
Skipped without ``LORACLR_WEBUI_URL`` (see conftest.py).

- ``test_concept_loras_have_one_architecture_and_text_encoder_parts``: the concept LoRAs the other HTTP
  tests use match each other (``/loraclr/v1/inspect``), an SDXL one has both text-encoder parts.
- ``test_sdxl_second_text_encoder_is_routed``: LoRAs with ONLY text-encoder-2 (``lora_te2_…``) modules,
  named by ``LORACLR_WEBUI_TE2_LORAS=A,B`` or found in the LoRA folder (parts ``{"te2": …}``), bound in
  the table form: the run must not report that their text-encoder parts are unused (Forge's
  ``clip_g`` was not routed before). Skipped when there are none (SD1 hosts). Whether the routed parts
  reach the encoders' output is checked without a host (``tests/test_te_routing_hf_names.py``): over
  HTTP the images also change with a row's weight when no text-encoder part is routed (seen on reForge
  SDXL, cause not found), so an image comparison here would prove nothing.
"""

from __future__ import annotations

import os

import pytest
from webui_client import TEST_PREFIX, infotext_params

TE2_ENV = "LORACLR_WEBUI_TE2_LORAS"


def _table_run(webui, rows: list[dict]) -> dict[str, str]:
    """One fusion-mode CLoRA txt2img (no latent update) with the table ``rows`` → its infotext parameters."""
    _info, text = webui.txt2img(
        "a photo of a cat and a dog",
        alwayson_scripts={"CLoRA": {"args": [True, {"latent_update": False, "loras": rows}]}},
    )
    params = infotext_params(text)
    assert "CLoRA error" not in params and "CLoRA" in params, text
    return params


def _inspect(webui, names: list[str]) -> dict[str, dict]:
    r = webui.post("/loraclr/v1/inspect", {"names": names})
    assert r.status == 200, r.text[:1000]
    return {x["name"]: x for x in r.body["loras"]}


def test_concept_loras_have_one_architecture_and_text_encoder_parts(webui, lora_names):
    """The concept LoRAs the other checks use match each other; an SDXL one covers both text encoders."""
    info = _inspect(webui, lora_names[:2])
    archs = {x["arch"] for x in info.values()}
    assert len(archs) == 1, info
    for x in info.values():
        parts = set(x["parts"])
        assert "unet" in parts, x["parts"]
        assert parts & {"te", "te1", "te2"}, f"{x['name']} has no text-encoder part: {x['parts']}"
        if x["arch"] == "sdxl":
            assert {"te1", "te2"} <= parts, x["parts"]


def _te2_only_loras(webui) -> list[str]:
    names = [n.strip() for n in os.environ.get(TE2_ENV, "").split(",") if n.strip()]
    if names:
        for n, x in _inspect(webui, names).items():
            assert set(x["parts"]) == {"te2"}, f"{TE2_ENV}: {n} has parts {x['parts']}, expected te2 only"
        return names[:2]
    listed = [x["name"] for x in webui.get("/loraclr/v1/loras").body["loras"]]
    candidates = [n for n in listed if not n.startswith(TEST_PREFIX)]
    found = [
        n
        for n, x in (_inspect(webui, candidates).items() if candidates else ())
        if x["arch"] == "sdxl" and set(x["parts"]) == {"te2"}
    ]
    return found[:2]


def test_sdxl_second_text_encoder_is_routed(webui):
    """SDXL LoRAs with only OpenCLIP bigG modules (q/k/v: the fused ``in_proj`` in the checkpoint, and
    out_proj) bound to concepts: no notice that their text-encoder parts are not used."""
    te2 = _te2_only_loras(webui)
    if not te2:
        pytest.skip(f"no SDXL LoRA with only text-encoder-2 modules (set {TE2_ENV} on an SDXL host)")
    rows = [{"lora": n, "words": w, "weight": 1, "unet_weight": 0} for n, w in zip(te2, ("cat", "dog"))]
    params = _table_run(webui, rows)
    notice = params.get("CLoRA notice", "")
    assert "text-encoder" not in notice and "text encoder" not in notice, notice
