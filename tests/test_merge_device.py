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


def test_a_job_reports_its_device_and_the_cpu_merge_is_unchanged(tmp_path, monkeypatch) -> None:
    """Without a GPU the default (``"auto"``) and an explicit ``"cpu"`` write the same tensors and recipe; the
    report names the device, the file does not (where a merge ran is not part of its recipe)."""
    from lib_loraclr.safeio import read_safetensors

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

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


# ------------------------------------------------------- defaults that follow the device (no GPU needed)
def test_the_recommended_merge_refines_by_default_on_a_gpu_only() -> None:
    """``distill_steps=None``: the recommended LoRACLR merge refines where its model runs on a GPU (100
    steps), never on the CPU, never for lsq or the official preset; a number given wins."""
    from lib_loraclr.merge.pipeline import GPU_REFINEMENT_STEPS

    assert MergeConfig().device == "auto" and MergeConfig().distill_steps is None
    rec = MergeConfig()
    assert GPU_REFINEMENT_STEPS == 100
    assert rec.effective_distill_steps("cuda") == rec.effective_distill_steps(torch.device("cuda:1")) == 100
    assert rec.effective_distill_steps("cpu") == 0
    assert MergeConfig(method="lsq").effective_distill_steps("cuda") == 0
    assert MergeConfig(preset="official").effective_distill_steps("cuda") == 0
    assert MergeConfig(distill_steps=0).effective_distill_steps("cuda") == 0
    assert MergeConfig(distill_steps=7).effective_distill_steps("cpu") == 7
    MergeConfig().validate()  # None is a valid value
    with pytest.raises(MergeInputError, match="distill_steps must be >= 0"):
        MergeConfig(distill_steps=-1).validate()


def test_an_automatic_refinement_without_gpu_memory_keeps_the_per_layer_merge(tiny, monkeypatch) -> None:
    """Out of GPU memory in a refinement the device chose: the per-layer merge is kept and the report says
    why; in a refinement the user asked for, the error reaches the user."""
    model, concepts = tiny
    monkeypatch.setattr(
        MergeConfig,
        "effective_distill_steps",
        lambda self, device: 2 if self.distill_steps is None else self.distill_steps,
    )

    def no_room(*_a, **_k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    plain = merge_loras(model, concepts, _cfg(distill_steps=0))
    monkeypatch.setattr(D, "distill_merged", no_room)
    got = merge_loras(model, concepts, _cfg())
    assert got.report["distill"]["steps"] == 0
    assert "ran out of memory for the refinement" in got.report["distill"]["skipped"]
    for k, m in plain.deltas.modules.items():
        assert torch.equal(got.deltas.modules[k].delta(), m.delta()), k
    with pytest.raises(torch.cuda.OutOfMemoryError):
        merge_loras(model, concepts, _cfg(distill_steps=2))


def test_auto_device_merges_on_the_cpu_when_the_gpu_has_no_room(tmp_path, monkeypatch) -> None:
    """``device="auto"`` (the default) with a GPU too full for the base model: the merge runs on the CPU
    and says so; an explicit ``"cuda"`` fails with the reason instead."""
    from lib_loraclr.errors import LoraclrError
    from lib_loraclr.merge import job as J
    from lib_loraclr.merge import pipeline as P

    def full(_model, device):
        raise LoraclrError(f"the base model does not fit in {device}'s free memory (test)")

    monkeypatch.setattr(J, "merge_device", lambda spec: torch.device("cuda" if spec != "cpu" else "cpu"))
    monkeypatch.setattr(P, "merge_device", lambda spec: torch.device("cuda" if spec != "cpu" else "cpu"))
    monkeypatch.setattr(J, "_to_device", full)
    for name in ("reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    concepts = tuple(JobConcept(ASSETS / "loras" / f"{s}.safetensors", s) for s in ("sks", "ohwx"))
    job = MergeJob(
        ASSETS / "base.safetensors", concepts, tmp_path / "m.safetensors", options={"sample_steps": 2}
    )
    res = run_job(job)
    assert res.report["device"] == "cpu" and "gpu_peak_gib" not in res.report
    assert res.report["notes"] == ["the GPU had no room for the base model: merged on the CPU"]
    assert "distill" not in res.report  # the CPU's default: no refinement
    explicit = replace_options(job, {"sample_steps": 2, "device": "cuda"}, tmp_path / "n.safetensors")
    with pytest.raises(LoraclrError, match="does not fit"):
        run_job(explicit)
    assert not (tmp_path / "n.safetensors").exists()


def test_auto_device_finishes_on_the_cpu_when_the_gpu_merge_fails(tmp_path, monkeypatch) -> None:
    """``"auto"``: a torch error on the GPU (a CUDA error, no memory left) → the same merge on the CPU, with
    a note; our own errors and an explicit ``"cuda"`` are not retried (out of memory then says what to do)."""
    from lib_loraclr.errors import LoraclrError
    from lib_loraclr.merge import job as J
    from lib_loraclr.merge import pipeline as P

    fake_cuda = lambda spec: torch.device("cuda" if spec != "cpu" else "cpu")  # noqa: E731
    monkeypatch.setattr(J, "merge_device", fake_cuda)
    monkeypatch.setattr(P, "merge_device", fake_cuda)
    monkeypatch.setattr(J, "_to_device", lambda model, device: model)
    for name in ("reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 2**30)
    calls: list[str] = []

    def merge(model, concepts, config, progress, error=None):
        calls.append(config.device)
        if len(calls) == 1:
            raise error or RuntimeError("CUDA error: an illegal memory access")
        return P.merge_loras(model, concepts, config, progress)

    concepts = tuple(JobConcept(ASSETS / "loras" / f"{s}.safetensors", s) for s in ("sks", "ohwx"))
    job = MergeJob(
        ASSETS / "base.safetensors",
        concepts,
        tmp_path / "m.safetensors",
        method="lsq",
        options={"sample_steps": 2},
    )
    res = run_job(job, merge=merge)
    assert len(calls) == 2 and (tmp_path / "m.safetensors").exists()
    assert res.report["device"] == "cpu" and res.report["gpu_peak_gib"] == 1.0
    assert res.report["notes"] == [
        "the merge on the GPU failed (RuntimeError: CUDA error: an illegal memory access): merged on the CPU"
    ]
    explicit = replace_options(job, {"sample_steps": 2, "device": "cuda"}, tmp_path / "n.safetensors")
    calls.clear()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_job(explicit, merge=merge)
    calls.clear()
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
    with pytest.raises(LoraclrError, match=r"cuda ran out of memory during the merge .*; merge on 'cpu'"):
        run_job(explicit, merge=lambda *a: merge(*a, error=oom))
    calls.clear()
    with pytest.raises(LoraclrError, match="ours"):
        run_job(
            replace_options(job, {"sample_steps": 2}, tmp_path / "n.safetensors"),
            merge=lambda *a: merge(*a, error=LoraclrError("ours")),
        )
    assert calls == ["auto"] and not (tmp_path / "n.safetensors").exists()


def replace_options(job: MergeJob, options: dict, out: Path) -> MergeJob:
    from dataclasses import replace

    return replace(job, options=options, out=out)


def test_the_recipe_names_refinement_steps_the_device_chose() -> None:
    """A refinement the device turned on changes the merge, so the file's recipe records its steps; a
    merge without one, or with steps the user gave, keeps the recipe as it was."""
    import json

    from lib_loraclr.merge.job import job_metadata

    concepts = (JobConcept(Path("a.safetensors"), "sks"),)
    job = MergeJob(Path("base.safetensors"), concepts, Path("m.safetensors"), options={"sample_steps": 2})

    def params(config: MergeConfig, j: MergeJob = job) -> dict:
        return json.loads(job_metadata(j, config, concepts, [{}])["loraclr_parameters"])

    assert "distill_steps" not in params(MergeConfig(sample_steps=2, distill_steps=0))
    assert params(MergeConfig(sample_steps=2, distill_steps=25))["distill_steps"] == 25
    given = MergeJob(job.base, concepts, job.out, options={"sample_steps": 2, "distill_steps": 10})
    assert params(MergeConfig(sample_steps=2, distill_steps=10), given)["distill_steps"] == 10


@cuda
def test_the_default_merge_on_the_gpu_refines(tmp_path) -> None:
    """A job with the defaults on the GPU runs the refinement the device sets and records it in the file."""
    import json

    from lib_loraclr.merge.pipeline import GPU_REFINEMENT_STEPS
    from lib_loraclr.safeio import read_safetensors_metadata

    concepts = tuple(JobConcept(ASSETS / "loras" / f"{s}.safetensors", s) for s in ("sks", "ohwx"))
    out = tmp_path / "auto.safetensors"
    res = run_job(
        MergeJob(ASSETS / "base.safetensors", concepts, out, options={"sample_steps": 2, "device": DEVICE})
    )
    want = GPU_REFINEMENT_STEPS if DEVICE.startswith("cuda") else 0
    assert (res.report.get("distill") or {}).get("steps", 0) == want
    recipe = json.loads(read_safetensors_metadata(out)["loraclr_parameters"])
    assert recipe.get("distill_steps", 0) == want
