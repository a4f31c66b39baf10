"""One error family: a user's mistake is a `LoraclrError` (HTTP 400, message only); anything else is a bug
(HTTP 500, traceback in the console), through the merge service and the CLoRA script alike."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lib_loraclr.clora.errors import CloraError
from lib_loraclr.errors import LoraclrError
from lib_loraclr.models.sampling import UnknownSamplerError
from lib_loraclr.models.sd import TinyCheckpointError
from lib_loraclr.world.vocab import UnknownWordError

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT / "tests" / "webui_stub", ROOT / "scripts"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))


def test_every_user_error_class_is_a_loraclr_error():
    from loraclr_glue.lora_files import LoraNotFoundError

    from lib_loraclr.clora_job import CloraUserError
    from lib_loraclr.merge.request import MergeRequestError

    for cls in (
        CloraError,
        TinyCheckpointError,
        UnknownSamplerError,
        UnknownWordError,
        CloraUserError,
        LoraNotFoundError,
        MergeRequestError,
    ):
        assert issubclass(cls, LoraclrError), cls


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (LoraclrError("sks.safetensors: rank 0 in lora_unet_x; retrain"), 400),
        (ValueError("shapes (3,4) and (5,6) not aligned"), 500),  # a bug, not the user's input
        (RuntimeError("boom"), 500),
        (KeyError("diffusion_model.x"), 500),
    ],
)
def test_merge_service_status_and_traceback(monkeypatch, tmp_path, capsys, error, status):
    from loraclr_glue import api
    from loraclr_glue.api import MergeService, ServiceError

    def run_merge(*args, **kwargs):
        raise error

    monkeypatch.setattr(api, "run_merge", run_merge)
    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(b"")
    sh = SimpleNamespace(
        cmd_opts=SimpleNamespace(lora_dir=str(tmp_path), ckpt_dir=str(tmp_path)),
        state=None,
        sd_model=SimpleNamespace(sd_checkpoint_info=SimpleNamespace(filename=str(ckpt))),
    )
    svc = MergeService(shared=sh, runner=lambda fn: fn())
    body = {"loras": ["a", "b"], "output": {"name": "merged"}}
    with pytest.raises(ServiceError) as ei:
        svc.merge(body, locked=False)
    out = capsys.readouterr().out
    assert ei.value.status == status
    assert str(error).strip("'") in ei.value.message
    if status == 500:
        assert "Traceback" in out and "run_merge" in out and type(error).__name__ in out
    else:
        assert "Traceback" not in out


def test_clora_failure_message_and_traceback(capsys):
    from lib_loraclr import clora_job

    p = SimpleNamespace(extra_generation_params={})
    msg = clora_job.fail(p, CloraError("concept 'sks' is not in the prompt"))
    out = capsys.readouterr().out
    assert msg == "concept 'sks' is not in the prompt" and "Traceback" not in out
    assert p.extra_generation_params[clora_job.INFOTEXT_ERROR_KEY] == msg

    try:
        raise ValueError("index 3 is out of bounds")  # a bug inside the step
    except ValueError as e:
        msg = clora_job.fail(p, e)
    out = capsys.readouterr()
    assert msg.startswith("internal error ValueError: index 3 is out of bounds")
    assert "Traceback" in out.err and "test_clora_failure_message_and_traceback" in out.err
