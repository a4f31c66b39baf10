"""The merge's device option (``MergeConfig.device``): names checked at the door, the CPU path unchanged, and
— where torch sees a CUDA GPU (`bench/device_check.sh`; CI has none, so those tests skip) — the same merge on
the GPU: forward passes and refinement there, statistics, solves and results on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lib_loraclr.merge import distill as D
from lib_loraclr.merge.job import JobConcept, MergeJob, run_job
from lib_loraclr.merge.pipeline import Concept, MergeConfig, MergeInputError, merge_device, merge_loras
from lib_loraclr.merge.request import MergeRequestError, validate_request
from lib_loraclr.models.sd import build_tiny_sd1
from tests.lora_factory import attention_keys, random_lora

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "lib_loraclr" / "world" / "assets"
SHAPE = (4, 8, 16)
# the device of the GPU tests; LORACLR_TEST_DEVICE=cpu runs them on the CPU (a check of the tests themselves)
DEVICE = os.environ.get("LORACLR_TEST_DEVICE", "cuda")
cuda = pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(),
    reason="needs a CUDA GPU (bench/device_check.sh)",
)


def test_device_names(monkeypatch) -> None:
    assert merge_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert merge_device("auto") == torch.device("cpu")
    with pytest.raises(MergeInputError, match="torch sees no CUDA GPU here; merge on 'cpu'"):
        merge_device("cuda")
    for bad in ("tpu", "gpu0", "", "cuda:x"):
        with pytest.raises(MergeInputError, match="device must be 'cpu', 'cuda', 'cuda:N' or 'auto'"):
            merge_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert merge_device("auto") == torch.device("cuda")
    assert merge_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(MergeInputError, match=r"torch sees 1 CUDA GPU\(s\) \(cuda:0 … cuda:0\)"):
        merge_device("cuda:1")


def test_requests_and_configs_check_the_device(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    body = {"loras": ["a", "b"], "output": {"name": "m"}}
    assert validate_request({**body, "advanced": {"device": "cpu"}}).advanced == {"device": "cpu"}
    assert validate_request({**body, "advanced": {"device": None}}).advanced == {}
    with pytest.raises(MergeRequestError, match=r"advanced\.device: device 'cuda': torch sees no CUDA GPU"):
        validate_request({**body, "advanced": {"device": "cuda"}})
    with pytest.raises(MergeRequestError, match=r"advanced\.device must be text"):
        validate_request({**body, "advanced": {"device": 0}})
    with pytest.raises(MergeInputError, match="device must be"):
        MergeConfig(device="gpu").validate()


def test_a_job_reports_its_device_and_the_cpu_merge_is_unchanged(tmp_path) -> None:
    """The default and an explicit ``"cpu"`` write the same tensors and recipe; the report names the device,
    the file does not (where a merge ran is not part of its recipe)."""
    from lib_loraclr.safeio import read_safetensors

    concepts = tuple(JobConcept(ASSETS / "loras" / f"{s}.safetensors", s) for s in ("sks", "ohwx"))
    files = []
    for i, options in enumerate(({"sample_steps": 2}, {"sample_steps": 2, "device": "cpu"})):
        out = tmp_path / f"m{i}.safetensors"
        job = MergeJob(ASSETS / "base.safetensors", concepts, out, method="lsq", options=options)
        res = run_job(job)
        assert res.report["device"] == "cpu" and "gpu_peak_gib" not in res.report
        files.append(read_safetensors(out))
    (t0, m0), (t1, m1) = files
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    varying = ("modelspec.date", "modelspec.title", "ss_output_name")  # the time and the file's name
    assert {k: v for k, v in m0.items() if k not in varying} == {
        k: v for k, v in m1.items() if k not in varying
    }
    assert "device" not in m1.get("loraclr_parameters", "")


# ---------------------------------------------------------------------------------- on a CUDA GPU
@pytest.fixture(scope="module")
def tiny():
    model = build_tiny_sd1(seed=0)
    keys = attention_keys(model)
    concepts = [
        Concept(random_lora(model, keys, seed=1), "sks", name="a"),
        Concept(random_lora(model, keys, seed=2), "ohwx", name="b"),
    ]
    return model, concepts


def _cfg(**kw) -> MergeConfig:
    return MergeConfig(sample_steps=2, sampler="euler", shape=SHAPE, neutral_prompts=("a photo",), **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@cuda
@pytest.mark.parametrize("sequential", [False, True])
def test_lsq_merge_on_the_gpu_equals_the_cpu_merge(tiny, sequential) -> None:
    """Same merged ΔW to float rounding (lsq: a closed form, no solver path to diverge); every result on
    the CPU; the model's weights where they were."""
    model, concepts = tiny
    cfg = _cfg(method="lsq", sequential=sequential)
    want = merge_loras(model, concepts, cfg).deltas
    gpu_model = build_tiny_sd1(seed=0).to(DEVICE)
    before = {k: v.clone() for k, v in gpu_model.state_dict().items()}
    got = merge_loras(gpu_model, concepts, cfg).deltas
    for k, m in want.modules.items():
        g = got.modules[k].delta()
        assert g.device.type == "cpu", k
        assert _rel(g, m.delta()) < 1e-3, (k, _rel(g, m.delta()))
    for k, v in gpu_model.state_dict().items():
        assert torch.equal(v, before[k]), k


@cuda
def test_loraclr_merge_and_refinement_run_on_the_gpu(tiny) -> None:
    """The recommended LoRACLR merge with two refinement steps: finite results on the CPU, the refinement's
    steps taken (two steps need not lower the loss on a random tiny model), the GPU model untouched."""
    _, concepts = tiny
    gpu_model = build_tiny_sd1(seed=0).to(DEVICE)
    before = {k: v.clone() for k, v in gpu_model.state_dict().items()}
    res = merge_loras(gpu_model, concepts, _cfg(distill_steps=2, distill_overrides={"pool": 4, "batch": 2}))
    for k, m in res.deltas.modules.items():
        d = m.delta()
        assert d.device.type == "cpu" and bool(torch.isfinite(d).all()), k
    info = res.report["distill"]
    assert info["steps"] == 2 and info["keys"] > 0
    assert all(torch.isfinite(torch.tensor([info["loss_before"], info["loss_after"]])))
    for k, v in gpu_model.state_dict().items():
        assert torch.equal(v, before[k]), k


@cuda
def test_in_place_refinement_on_the_gpu_writes_back_into_the_callers_tensors(tiny) -> None:
    model, concepts = tiny
    gpu_model = build_tiny_sd1(seed=0).to(DEVICE)
    own = [c.deltas for c in concepts] + [{}]
    merged = {
        k: ((concepts[0].deltas.modules[k].delta() + concepts[1].deltas.modules[k].delta()) / 2).flatten(1)
        for k in concepts[0].deltas.modules
    }
    cfg = _cfg(method="lsq")
    prompts = [["photo of a sks"], ["photo of a ohwx"], ["a photo"]]
    params = D.DistillParams(steps=2, pool=4, batch=2)
    want, _ = D.distill_merged(model, merged, own, prompts, cfg, params)
    work = {k: v.clone() for k, v in merged.items()}
    got, _ = D.distill_merged(gpu_model, work, own, prompts, cfg, params, in_place=True)
    for k in merged:
        assert got[k].device.type == "cpu" and got[k].data_ptr() == work[k].data_ptr(), k
        assert _rel(got[k], want[k]) < 5e-2, (k, _rel(got[k], want[k]))


@cuda
def test_a_job_on_the_gpu_writes_a_lora_and_reports_its_memory(tmp_path) -> None:
    concepts = tuple(JobConcept(ASSETS / "loras" / f"{s}.safetensors", s) for s in ("sks", "ohwx"))
    out = tmp_path / "gpu.safetensors"
    res = run_job(
        MergeJob(
            ASSETS / "base.safetensors",
            concepts,
            out,
            method="lsq",
            options={"sample_steps": 2, "device": DEVICE},
        )
    )
    assert out.exists() and res.report["device"].startswith(DEVICE)
    assert res.report["gpu_peak_gib"] > 0 if DEVICE.startswith("cuda") else "gpu_peak_gib" not in res.report


def test_an_interrupt_passes_through_on_an_older_torch(tmp_path, monkeypatch) -> None:
    """The WebUI's torch may be older (A1111 1.10 ships 2.1, which has no ``torch.OutOfMemoryError``): the
    job's out-of-memory handlers must not break the other exceptions that pass through them."""
    from lib_loraclr.merge.job import MergeInterrupted

    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    concepts = tuple(JobConcept(ASSETS / "loras" / f"{s}.safetensors", s) for s in ("sks", "ohwx"))
    job = MergeJob(ASSETS / "base.safetensors", concepts, tmp_path / "x.safetensors", method="lsq")
    calls = []
    with pytest.raises(MergeInterrupted):
        run_job(job, should_stop=lambda: bool(calls.append(1)) or len(calls) > 3)
    assert list(tmp_path.iterdir()) == []
