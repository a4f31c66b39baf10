"""sd-webui-loraclr inside a RUNNING Forge (2024 ``backend/``), over HTTP; skipped unless ``LORACLR_FORGE_URL``
names the server (e.g. ``http://127.0.0.1:7862``, started with ``--api`` or ``--nowebui`` and
``--always-cpu`` on a machine without a GPU). Uses `webui_client` (urllib only).

The checks a person does by hand after every glue change (issue 6, "Testing", Forge):
1. ``POST /loraclr/v1/merge`` writes a LoRA file (the base model is rebuilt from the checkpoint FILE with
   Forge's own UNet class, Forge has no ``ldm``); it runs first, so on a fresh server it also covers the
   checkpoint being found before the first generation (Forge loads its model lazily);
2. txt2img with ``<lora:NAME:1>`` of a kohya LoRA (ours, and the merged one) names it in ``Lora hashes``
   and changes the image (Forge's log says ``[LORA] Loaded … (skipped 0 keys)``);
3. a CLoRA txt2img through ``alwayson_scripts`` with two ``<clora:…>`` LoRAs completes with the CLoRA
   parameters in the infotext, without ``CLoRA error``; the latent update either ran (no notice) or
   the infotext's ``CLoRA notice`` says "masks-only"; the built-in Lora never loads those LoRAs;
4. in UI mode the page holds the merge tab and the accordion (skipped with ``--nowebui``).

Environment: ``LORACLR_FORGE_URL`` (required), ``LORACLR_WEBUI_LORAS`` (two LoRA names with trigger
words; default: the first two the extension lists), ``LORACLR_WEBUI_TIMEOUT`` (seconds per request).
"""

from __future__ import annotations

import base64
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_client import TEST_PREFIX, WebUI, infotext_params, pick_loras

FORGE_URL_ENV = "LORACLR_FORGE_URL"
#: a short CLoRA run for a CPU host: one latent-update step, no refinement iterations
CLORA_OPTIONS = {"latent_update": True, "update_steps": 1, "refinement_steps": [0], "refinement_iters": 0}


@pytest.fixture(scope="module")
def forge() -> WebUI:
    base = os.environ.get(FORGE_URL_ENV, "").strip()
    if not base:
        pytest.skip(f"no running Forge: set {FORGE_URL_ENV}=http://127.0.0.1:7862 to run these HTTP tests")
    client = WebUI(base, float(os.environ.get("LORACLR_WEBUI_TIMEOUT", "3600")))
    deadline = time.monotonic() + 60
    while True:
        try:
            if client.get("/sdapi/v1/sd-models", timeout=10).status == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{FORGE_URL_ENV}={base} does not answer /sdapi/v1/sd-models")
        time.sleep(2)
    opts = client.get("/sdapi/v1/options", timeout=30)
    assert opts.status == 200
    return client


@pytest.fixture(scope="module")
def forge_loras(forge: WebUI) -> list[str]:
    return pick_loras(forge, "Forge")


@pytest.fixture(scope="module")
def forge_merged(forge, forge_loras) -> dict[str, Any]:
    """``POST /loraclr/v1/merge`` of the two LoRAs (a fresh name) → the response body and the name."""
    name = f"{TEST_PREFIX}forge_{int(time.time())}"
    body = {
        "loras": forge_loras[:2],
        "output": {"kind": "lora", "name": name, "rank": 8},
        "advanced": {"sample_steps": 2},
    }
    r = forge.post("/loraclr/v1/merge", body)
    assert r.status == 200, f"merge → {r.status}: {r.text[:2000]}"
    return {"name": name, "response": r.body}


def test_merge_route_writes_a_file(forge, forge_merged):
    """Runs before any txt2img of this module: on a fresh server Forge has not loaded its model yet."""
    res, name = forge_merged["response"], forge_merged["name"]
    path = Path(res["file"])
    assert path.name == f"{name}.safetensors" and res["kind"] == "lora"
    if path.exists():  # the test runs on the server's machine
        assert path.stat().st_size > 10_000
    assert res["prompt"].startswith(f"<lora:{name}:1> ") and res["report_rows"], res["prompt"]
    assert forge.post("/sdapi/v1/refresh-loras").status == 200
    assert name in {x["name"] for x in forge.get("/sdapi/v1/loras").body}


def test_merged_lora_loads_in_txt2img(forge, forge_merged):
    name = forge_merged["name"]
    trigger = forge_merged["response"]["concepts"][0]["trigger"]
    plain, _ = forge.txt2img(f"a photo of {trigger}")
    info, text = forge.txt2img(f"a photo of {trigger} <lora:{name}:1>")
    assert f"{name}: " in infotext_params(text).get("Lora hashes", ""), text
    assert _image(info) != _image(plain), "the merged LoRA did not change the image"


#: infotext ``Version`` values of the Forge forks that do not start with ``f``: Haoming02's Forge Neo writes
#: ``neo`` and Forge Classic ``classic`` (their ``modules_forge/forge_version.py``)
FORGE_FORK_VERSIONS = ("neo", "classic")


def is_forge_version(version: str) -> bool:
    """Whether an infotext ``Version`` names a Forge build: ``f…`` (Forge main ``f2.0.1v1.10.1…``, reForge
    ``f1.0.0v2-v1.10.1RC-1.10.1``) or one of `FORGE_FORK_VERSIONS`."""
    return version.startswith("f") or version in FORGE_FORK_VERSIONS


def test_is_forge_version():
    """Runs without a server: the version strings of the Forge builds checked so far, and A1111's."""
    assert is_forge_version("f2.0.1v1.10.1")
    assert is_forge_version("f1.0.0v2-v1.10.1RC-1.10.1")
    assert is_forge_version("neo") and is_forge_version("classic")
    assert not is_forge_version("v1.10.1") and not is_forge_version("")


def test_forge_is_the_host(forge):
    """The server is Forge (`is_forge_version`), so these checks mean what they say."""
    _, text = forge.txt2img("a photo")
    version = infotext_params(text).get("Version", "")
    assert is_forge_version(version), f"not a Forge server: Version {version!r}"


def test_script_registered_in_both_tabs(forge):
    r = forge.get("/sdapi/v1/script-info")
    assert r.status == 200
    ours = [s for s in r.body if s["name"] == "clora"]
    assert sorted(s["is_img2img"] for s in ours) == [False, True] and all(s["is_alwayson"] for s in ours)


def test_inspect_and_list_routes(forge, forge_loras):
    r = forge.post("/loraclr/v1/inspect", {"names": forge_loras})
    assert r.status == 200, r.text[:1000]
    assert [x["name"] for x in r.body["loras"]] == forge_loras
    r = forge.post("/loraclr/v1/inspect", {"name": "no_such_lora_xyz"})
    assert r.status == 404 and "not found" in r.body["error"]


def _image(info: dict[str, Any]) -> bytes:
    return base64.b64decode(info["images"][0])


def test_lora_tag_loads_our_kohya_file(forge, forge_loras):
    name = forge_loras[0]
    plain, _ = forge.txt2img("a photo of a dog")
    info, text = forge.txt2img(f"a photo of a dog <lora:{name}:1>")
    hashes = infotext_params(text).get("Lora hashes", "")
    assert f"{name}: " in hashes, text
    assert _image(info) != _image(plain), "the LoRA did not change the image (zero output layers?)"


def test_clora_txt2img_completes_with_its_infotext(forge, forge_loras):
    a, b = forge_loras[:2]
    prompt = f"a cat<clora:{a}:0.9> and a dog<clora:{b}>"
    before, _ = forge.txt2img("a cat and a dog")
    info, text = forge.txt2img(prompt, alwayson_scripts={"CLoRA": {"args": [True, dict(CLORA_OPTIONS)]}})
    params = infotext_params(text)
    assert "CLoRA" in params and "latent=1" in params["CLoRA"], text
    assert "CLoRA error" not in params, params.get("CLoRA error")
    notice = params.get("CLoRA notice", "")
    assert notice == "" or "masks-only" in notice, notice
    assert a not in params.get("Lora hashes", "") and b not in params.get("Lora hashes", "")  # never global
    assert _image(info) != _image(before)  # the LoRA branches changed the image
    after, _ = forge.txt2img("a cat and a dog")
    assert _image(after) == _image(before), (
        "a plain run after CLoRA differs: a hook or weight was left behind"
    )


def test_ui_page_has_tab_and_accordion(forge):
    r = forge.get("/", timeout=120)
    if r.status == 404:
        pytest.skip("Forge runs with --nowebui: no page to check")
    assert r.status == 200
    cfg = forge.get("/config", timeout=120)
    assert cfg.status == 200
    text = cfg.text
    assert "loraclr" in text.lower() and "CLoRA" in text
