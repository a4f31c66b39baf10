"""The WebUI's request logic that lives in the library: LoRA lookup by name (`lora_folder`), the merge tab's
request and status texts (`folder_merge`), the CLoRA job's checks and messages (`clora_job`), the mask
preview image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib_loraclr import folder_merge
from lib_loraclr.clora.masks import PALETTE, mask_image
from lib_loraclr.clora_args import CloraArgs
from lib_loraclr.clora_job import CloraJob, CloraUserError, JobRegistry, check_request, user_message
from lib_loraclr.errors import ServiceError
from lib_loraclr.lora_folder import (
    LoraNotFoundError,
    find_lora,
    inspect_names,
    inspect_request,
    list_loras,
    lora_listing,
    read_lora_cached,
)
from lib_loraclr.merge.job import MergeInterrupted
from lib_loraclr.merge.request import MergeRequestError
from lib_loraclr.writers import write_kohya_lora


def _lora(path: Path, trigger: str = "") -> Path:
    from lora_factory import attention_keys, random_lora

    from lib_loraclr.models.sd import build_tiny_sd1

    model = build_tiny_sd1(0)
    meta = {"loraclr_trigger": f'["{trigger}"]'} if trigger else {}
    write_kohya_lora(random_lora(model, attention_keys(model, te=False)[:2]), path, arch="sd1", metadata=meta)
    return path


def test_names_lookup_and_cache(tmp_path):
    (tmp_path / "sub").mkdir()
    a = _lora(tmp_path / "Cat.safetensors", "sks")
    b = _lora(tmp_path / "sub" / "Cat.safetensors")
    (tmp_path / "notes.txt").write_text("x")
    found = list_loras(tmp_path)
    assert found == {"Cat": a, "sub/Cat": b}
    assert list_loras(tmp_path, "CAT") == found and list_loras(tmp_path, "dog") == list_loras(None) == {}
    assert find_lora("cat", tmp_path) == a  # case-insensitive fallback
    assert find_lora("alias", tmp_path, lookup=lambda n: b if n == "alias" else None) == b
    with pytest.raises(LoraNotFoundError, match="'ghost' not found in"):
        find_lora("ghost", tmp_path)
    assert read_lora_cached(a) is read_lora_cached(a)
    assert lora_listing(found)[0] == {"name": "Cat", "file": str(a), "trigger_words": ["sks"]}


@pytest.mark.parametrize(
    ("body", "names", "error"),
    [
        ({"name": "a"}, ["a"], None),
        ({"names": ["a", "b"]}, ["a", "b"], None),
        ("a", None, "JSON object"),
        ({"nam": "a"}, None, "unknown key 'nam'"),
        ({"names": []}, None, "give a LoRA name"),
        ({"name": " "}, None, "give a LoRA name"),
    ],
)
def test_inspect_request(body, names, error):
    if error is None:
        assert inspect_names(body) == names
    else:
        with pytest.raises(ValueError, match=error):
            inspect_names(body)


def test_merge_tab_request_and_status_texts():
    table = [["cat", " sks ", 0.5, None], ["", "x", 1, 1], ["dog", None, "", 0.8]]
    req = folder_merge.request_from_table(table, "loraclr", "recommended", 20.0, 3.0, "LoRA", "m", 16.0, 1)
    assert req["loras"] == [
        {"name": "cat", "trigger": "sks", "te_weight": 0.5, "unet_weight": 1.0},
        {"name": "dog", "trigger": "", "te_weight": 1.0, "unet_weight": 0.8},
    ]
    assert req["output"] == {"kind": "lora", "name": "m", "rank": 16, "overwrite": True}
    assert req["advanced"] == {"sample_steps": 20, "seed": 3}
    refined = folder_merge.request_from_table(table, "lsq", "recommended", 20, 3, "LoRA", "m", 16, 0, 100.0)
    assert refined["advanced"] == {"sample_steps": 20, "seed": 3, "distill_steps": 100}
    on_gpu = folder_merge.request_from_table(
        table, "lsq", "recommended", 20, 3, "LoRA", "m", 16, 0, -1, "GPU"
    )
    assert on_gpu["advanced"] == {"sample_steps": 20, "seed": 3, "device": "cuda"}
    # 0 = refinement off (sent, so the device's default does not turn it on); CPU sent as chosen
    off = folder_merge.request_from_table(table, "lsq", "recommended", 20, 3, "LoRA", "m", 16, 0, 0, "CPU")
    assert off["advanced"] == {"sample_steps": 20, "seed": 3, "distill_steps": 0, "device": "cpu"}
    cleared = folder_merge.request_from_table(table, "lsq", "recommended", 20, 3, "LoRA", "m", 16, 0, None)
    assert cleared["advanced"] == {"sample_steps": 20, "seed": 3}  # an emptied field: the automatic default
    result = {
        "file": "/l/m.safetensors",
        "seconds": 2.0,
        "report": {"svd_error": 0.01234, "sidecar": {"file": "/l/m.json", "written": False}},
    }
    msg = folder_merge.result_message(result, 16)
    assert msg == (
        "Saved /l/m.safetensors in 2.0 s. LoRA rank ≤ 16: SVD truncation error 0.0123. "
        "Kept your existing m.json (its activation text was not changed)."
    )
    result["report"]["notes"] = ["the GPU had no room for the base model: merged on the CPU"]
    assert folder_merge.result_message(result, 16).endswith(
        "\nNote: the GPU had no room for the base model: merged on the CPU"
    )
    assert folder_merge.ready_prompt("m", ["sks", "", "ohwx"]) == "<lora:m:1> sks, ohwx"
    statuses = [
        folder_merge.error_status(e)
        for e in (
            MergeInterrupted("x"),
            folder_merge.EngineUnavailable("x"),
            MergeRequestError("x"),
            KeyError(),
        )
    ]
    assert statuses == [409, 503, 400, 500]


def test_merge_without_a_checkpoint_or_folder(tmp_path):
    from lib_loraclr.merge.request import validate_request

    req = validate_request({"loras": ["a", "b"], "output": {"name": "m"}})
    with pytest.raises(MergeRequestError, match="no checkpoint is loaded"):
        folder_merge.run_merge(
            req, lora_folder=tmp_path, checkpoint_folder=None, base_checkpoint=None, find_lora=find_lora
        )
    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(b"x")
    with pytest.raises(MergeRequestError, match="no LoRA folder"):
        folder_merge.run_merge(
            req, lora_folder=None, checkpoint_folder=tmp_path, base_checkpoint=ckpt, find_lora=find_lora
        )


def test_clora_job_checks_and_messages(tmp_path):
    _lora(tmp_path / "cat.safetensors", "sks")
    _lora(tmp_path / "plain.safetensors")
    job = CloraJob(args=CloraArgs(), lora_folder=tmp_path)
    job.prepare(["a cat<clora:cat> and a dog"])
    _, specs = job.concepts_for("a cat<clora:cat> and a dog")
    assert [(s.name, s.trigger, s.words) for s in specs] == [("cat", "sks", "cat")]
    with pytest.raises(CloraUserError, match="no trigger words"):
        job.prepare(["a dog<clora:plain>"])
    body = {"prompt": "a dog<clora:ghost>"}
    kind, message = check_request(body, tmp_path)
    assert kind == "CloraUserError" and "'ghost' not found" in message
    assert check_request({"prompt": "a dog"}, tmp_path) is None
    assert user_message(CloraUserError("fix it")) == "fix it"
    assert user_message(KeyError("k")).startswith("internal error KeyError")
    infotext: dict = {}
    job.infotext = infotext
    job.notice("one")
    job.notice("one")
    job.notice("two")
    assert job.notices == ["one", "two"] and infotext["CLoRA notice"] == "one; two"


def test_mask_image_colours():
    w = torch.zeros(3, 1, 2, 2)
    w[0, 0, 0, 0] = w[1, 0, 0, 1] = w[2, 0, 1, 0] = w[2, 0, 1, 1] = 1.0
    img = mask_image(w, scale=2)
    assert img.size == (4, 4) and img.getpixel((0, 0)) == PALETTE[0]
    assert img.getpixel((2, 0)) == PALETTE[1] and img.getpixel((0, 2)) == PALETTE[2]


def test_merge_tab_table_keeps_edits_and_prefills_trigger_words(tmp_path):
    a = _lora(tmp_path / "cat.safetensors", "sks")
    b = _lora(tmp_path / "dog.safetensors")
    folder = {"cat": a, "dog": b}
    rows = folder_merge.table_rows(["cat", "dog"], None, folder)
    assert rows == [["cat", "sks", 1.0, 1.0], ["dog", "", 1.0, 1.0]]
    edited = [["cat", "my words", 0.5, 0.8], ["dog", "", 1.0, 1.0]]
    assert folder_merge.table_rows(["dog", "cat"], edited, folder) == [edited[1], edited[0]]
    assert folder_merge.table_rows(["ghost"], None, folder) == [["ghost", "", 1.0, 1.0]]
    assert folder_merge.table_rows([], edited, folder) == [["", "", 1.0, 1.0]]


def test_inspect_request_statuses(tmp_path):
    _lora(tmp_path / "cat.safetensors", "sks")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")

    def find(name: str) -> Path:
        return find_lora(name, tmp_path)

    out = inspect_request({"names": ["cat"]}, find)["loras"]
    assert out[0]["name"] == "cat" and out[0]["arch"] == "sd1"
    for body, status, text in (
        ({"nam": "x"}, 400, "unknown key"),
        ({"name": "ghost"}, 404, "not found"),
        ({"name": "broken"}, 400, "broken: "),
    ):
        with pytest.raises(ServiceError) as ei:
            inspect_request(body, find)
        assert ei.value.status == status and text in ei.value.message


def test_merge_errors_become_http_statuses(capsys):
    assert folder_merge.service_error(MergeRequestError("give two LoRAs")).status == 400
    assert folder_merge.service_error(MergeInterrupted("stopped")).status == 409
    try:
        raise KeyError("diffusion_model.x")
    except KeyError as e:
        err = folder_merge.service_error(e)
    assert (err.status, err.kind) == (500, "KeyError")
    assert "Traceback" in capsys.readouterr().out  # a bug keeps its traceback for the report


class _Adapter:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple] = []
        self.fail = fail

    def install(self, p, run, base, specs, *, masks_only):
        self.calls.append(("install", p, base, [s.name for s in specs], masks_only))
        if self.fail:
            raise RuntimeError("host changed")
        return "engine"

    def remove(self, p):
        self.calls.append(("remove", p))


def test_clora_job_installs_and_removes_its_adapter(tmp_path):
    _lora(tmp_path / "cat.safetensors", "sks")
    prompt = "a cat<clora:cat> and a dog AND a tree"
    job = CloraJob(args=CloraArgs(), lora_folder=tmp_path, infotext={})
    job.prepare([prompt, "a dog"])
    first, second = _Adapter(), _Adapter()
    job.install(first, "p", prompt, masks_only=True)
    assert job.installed and job.denoiser == "engine" and job.installed_on == "p"
    assert first.calls == [("install", "p", "a cat and a dog", ["cat"], True)]  # first AND part only
    assert "first AND part" in job.infotext["CLoRA notice"]
    job.install(second, "p", prompt)  # a second install removes the first
    assert first.calls[-1] == ("remove", "p") and second.calls[0][0] == "install"
    job.install(second, "p", "a dog")  # nothing bound: nothing installed
    assert not job.installed and second.calls[-1] == ("remove", "p")
    failing = _Adapter(fail=True)
    with pytest.raises(RuntimeError):
        job.install(failing, "p", prompt)
    assert not job.installed and failing.calls[-1] == ("remove", "p")  # a failed install is undone


def test_job_registry_is_per_processing_object(tmp_path):
    class P:  # a processing object (weak-referenceable)
        pass

    reg = JobRegistry()
    p, q = P(), P()
    a, b = CloraJob(args=CloraArgs()), CloraJob(args=CloraArgs())
    adapter = _Adapter()
    a.adapter, a.installed_on = adapter, p
    reg.register(p, a)
    reg.register(q, b)
    assert reg.get(p) is a and reg.get(q) is b and reg.get(P()) is None and reg.active_count() == 2
    assert reg.finish(p) is a and adapter.calls == [("remove", p)] and reg.get(p) is None
    assert reg.finish(p) is None
    assert reg.remove_all() == 1 and reg.active_count() == 0


def test_mask_previews_join_the_results_once():
    job = CloraJob(args=CloraArgs())
    job.mask_images = ["m1", "m2"]
    images, infotexts = ["img"], ["info"]
    assert job.add_mask_previews(images, infotexts) == 2
    assert images == ["img", "m1", "m2"] and infotexts == ["info"] * 3 and job.mask_images == []
    assert job.add_mask_previews(images, infotexts) == 0  # already handed over
    job.mask_images = ["m3"]
    assert job.add_mask_previews(None, None) == 0 and job.mask_images == []  # no result list: dropped
