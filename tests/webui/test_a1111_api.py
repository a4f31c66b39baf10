"""sd-webui-loraclr inside a RUNNING WebUI, over HTTP (see conftest.py; skipped without LORACLR_WEBUI_URL).

The checks a person does by hand after every glue change (issue 6, "Testing"):
1. ``POST /loraclr/v1/merge`` on two kohya LoRAs writes a LoRA file that the WebUI then lists;
2. txt2img with ``<lora:MERGED:1>`` names it in the infotext's ``Lora hashes`` (and changes the image);
3. a CLoRA txt2img through ``alwayson_scripts`` with two ``<clora:…>`` LoRAs completes with the CLoRA
   parameters in the infotext (and the built-in Lora never loads those LoRAs);
4. in UI mode the merge tab and the txt2img accordion are part of the page (skipped with ``--nowebui``).
Written for A1111 1.8–1.10; every route used here exists in Forge too.
"""

from __future__ import annotations

import base64
from pathlib import PurePath

from webui_client import TEST_PREFIX, infotext_params

CLORA_TITLE = "clora"
#: a short CLoRA run (the latent update is off by default; on here): one latent-update step, one refinement iteration (CPU hosts)
CLORA_OPTIONS = {"latent_update": True, "update_steps": 1, "refinement_steps": [0], "refinement_iters": 1}


def clora_scripts(args: list) -> dict:
    return {"alwayson_scripts": {"CLoRA": {"args": args}}}


# ---------------------------------------------------------------------------------------------- discovery


def test_script_is_registered_as_always_on_in_both_tabs(webui):
    r = webui.get("/sdapi/v1/script-info")
    assert r.status == 200, r.text[:500]
    ours = [s for s in r.body if s["name"] == CLORA_TITLE]
    assert sorted(s["is_img2img"] for s in ours) == [False, True], ours
    assert all(s["is_alwayson"] for s in ours)


def test_loras_route_lists_trigger_words(webui, lora_names):
    r = webui.get("/loraclr/v1/loras")
    assert r.status == 200
    by_name = {x["name"]: x for x in r.body["loras"]}
    for n in lora_names:
        assert by_name[n]["trigger_words"], by_name[n]
        assert by_name[n]["file"].endswith(".safetensors")
    r = webui.get(f"/loraclr/v1/loras?search={lora_names[0][:3]}")
    assert lora_names[0] in {x["name"] for x in r.body["loras"]}


def test_inspect_route(webui, lora_names):
    r = webui.post("/loraclr/v1/inspect", {"names": lora_names[:2]})
    assert r.status == 200, r.text[:1000]
    assert [x["name"] for x in r.body["loras"]] == lora_names[:2]
    r = webui.post("/loraclr/v1/inspect", {"name": "no_such_lora_xyz"})
    assert r.status == 404 and "not found" in r.body["error"]


# ---------------------------------------------------------------------------------------------- merge


def test_merge_writes_a_lora_the_webui_lists(webui, merged, lora_names):
    res = merged["response"]
    name = merged["name"]
    assert res["kind"] == "lora"
    assert PurePath(res["file"]).name == f"{name}.safetensors"
    assert res["prompt"].startswith(f"<lora:{name}:1>")
    concepts = {row[0] for row in res["report_rows"]}
    assert set(lora_names[:2]) <= concepts, res["report_rows"]
    assert webui.post("/sdapi/v1/refresh-loras").status == 200
    r = webui.get("/sdapi/v1/loras")
    assert r.status == 200
    assert name in {x["name"] for x in r.body}, "the merged LoRA is not in the WebUI's LoRA list"


def test_merge_refuses_bad_requests_without_writing(webui, merged, lora_names):
    again = dict(merged["request"])
    r = webui.post("/loraclr/v1/merge", again)
    assert r.status == 400 and "already exists" in r.body["error"], r.text[:500]
    bad_name = {**again, "output": {"kind": "lora", "name": "../escape"}}
    r = webui.post("/loraclr/v1/merge", bad_name)
    assert r.status == 400, r.text[:500]
    r = webui.post("/loraclr/v1/merge", {"loras": lora_names[:1], "output": {"name": TEST_PREFIX + "one"}})
    assert r.status == 400 and "two" in r.body["error"]
    r = webui.post("/loraclr/v1/merge", {**again, "methd": "lsq"})
    assert r.status == 400 and "methd" in r.body["error"]
    on_gpu = {
        **again,
        "output": {"kind": "lora", "name": TEST_PREFIX + "gpu"},
        "advanced": {"device": "cuda:9"},
    }
    r = webui.post("/loraclr/v1/merge", on_gpu)  # no host here has ten GPUs: refused at the door
    assert r.status == 400 and "advanced.device" in r.body["error"], r.text[:500]
    listed = {x["name"] for x in webui.get("/loraclr/v1/loras").body["loras"]}
    assert "escape" not in listed and TEST_PREFIX + "one" not in listed and TEST_PREFIX + "gpu" not in listed


def test_txt2img_with_the_merged_lora_names_it_in_lora_hashes(webui, merged):
    name = merged["name"]
    trigger = merged["response"]["prompt"].split(">", 1)[1].strip()
    plain_info, plain_text = webui.txt2img(f"a photo of {trigger}")
    info, text = webui.txt2img(f"a photo of {trigger} <lora:{name}:1>")
    params = infotext_params(text)
    assert "Lora hashes" in params, text
    assert params["Lora hashes"].split(":")[0].strip() == name, params["Lora hashes"]
    assert "Lora hashes" not in infotext_params(plain_text)
    assert info["images"][0] != plain_info["images"][0], "the merged LoRA did not change the image"


# ---------------------------------------------------------------------------------------------- CLoRA


def test_clora_txt2img_through_alwayson_scripts(webui, lora_names):
    a, b = lora_names[:2]
    prompt = f"a photo of a cat<clora:{a}> and a dog<clora:{b}>"
    info, text = webui.txt2img(prompt, **clora_scripts([False, dict(CLORA_OPTIONS)]))
    params = infotext_params(text)
    assert "CLoRA error" not in params, text
    assert "CLoRA" in params, text
    opts = dict(kv.split("=", 1) for kv in params["CLoRA"].split())
    assert opts["steps"] == "1" and opts["iters"] == "1" and opts["latent"] == "1", opts
    assert "Lora hashes" not in params, "a <clora:…> LoRA was loaded globally by the built-in Lora"
    assert f"<clora:{a}>" in info["prompt"], "the prompt in the infotext must keep the <clora:…> tags"
    assert len(base64.b64decode(info["images"][0])) > 100


def test_clora_table_form_and_masks_only(webui, lora_names):
    a, b = lora_names[:2]
    rows = [{"lora": a, "words": "cat"}, {"lora": b, "words": "dog", "weight": 0.8}]
    _info, text = webui.txt2img(
        "a photo of a cat and a dog", **clora_scripts([True, {"masks_only": True, "loras": rows}])
    )
    params = infotext_params(text)
    assert "CLoRA error" not in params, text
    assert "masks_only=1" in params["CLoRA"]
    assert a in params["CLoRA table"] and b in params["CLoRA table"]


def test_clora_routed_mode_with_a_layout_region_prompts_and_crops(webui, lora_names):
    """The routed mode on every host (Forge's before 2026-12-06: branch fusion with a notice): no notice, no
    error, the options in the infotext, the layout's two columns as the mask preview; region crops and the
    old whole-prompt regions (``scene``) change the image."""
    a, b = lora_names[:2]
    prompt = f"a photo of a cat<clora:{a}> and a dog<clora:{b}>"
    base = {"mode": "routed", "layout": "1,1", "mask_preview": True}
    runs = {}
    for name, extra in (
        ("concept", {}),
        ("scene", {"region_prompt": "scene"}),
        ("crops", {"region_crops": 0.5}),
    ):
        info, text = webui.txt2img(prompt, **clora_scripts([False, {**base, **extra}]))
        params = infotext_params(text)
        assert "CLoRA error" not in params and "CLoRA notice" not in params, text
        opts = dict(kv.split("=", 1) for kv in params["CLoRA"].split())
        assert opts["mode"] == "routed" and opts["layout"] == "1_1", opts
        assert opts["regions"] == extra.get("region_prompt", "concept"), opts
        assert float(opts["crops"]) == extra.get("region_crops", 0.0), opts
        assert len(info["images"]) == 2, "the mask preview is the second image"
        runs[name] = info["images"][0]
    assert runs["scene"] != runs["concept"] and runs["crops"] != runs["concept"]


def test_clora_bad_arguments_answer_422_before_queueing(webui, lora_names):
    a, b = lora_names[:2]
    body = {
        "prompt": f"a cat<clora:{a}> and a dog<clora:{b}>",
        **clora_scripts([False, {"mask_treshold": 0.3}]),
    }
    r = webui.post("/sdapi/v1/txt2img", body)
    assert r.status == 422 and "mask_threshold" in r.body["detail"], r.text[:1000]


def test_clora_unknown_lora_answers_422(webui, lora_names):
    r = webui.post(
        "/sdapi/v1/txt2img",
        {"prompt": f"a cat<clora:{TEST_PREFIX}missing_xyz> and a dog<clora:{lora_names[0]}>"},
    )
    assert r.status == 422 and "not found" in r.body["detail"], r.text[:1000]


# ---------------------------------------------------------------------------------------------- UI mode


def test_ui_mode_has_the_merge_tab_and_the_accordion(webui):
    import pytest

    r = webui.get("/config")
    if r.status == 404 or not isinstance(r.body, dict):
        pytest.skip("the WebUI runs without its UI (--nowebui)")
    ids = {c.get("props", {}).get("elem_id") for c in r.body.get("components", [])}
    for elem_id in (
        "tab_loraclr_merge",
        "loraclr_merge_loras",
        "loraclr_merge_run",
        "loraclr_txt2img_accordion",
        "loraclr_img2img_accordion",
    ):
        assert elem_id in ids, elem_id
