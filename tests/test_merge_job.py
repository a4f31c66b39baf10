"""One merge job (`lib_loraclr.merge.job`): the command line, the WebUI tab and ``POST /loraclr/v1/merge``
give the same file bytes and metadata for the same request, LoRA and checkpoint output alike."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from lib_loraclr.merge import cli
from lib_loraclr.merge.job import JobConcept, MergeInterrupted, MergeJob, run_job
from lib_loraclr.safeio import read_safetensors_metadata

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "lib_loraclr" / "world" / "assets"
CONCEPTS = [("sks", "sks"), ("ohwx", "ohwx")]  # (LoRA file stem, trigger)
for extra in (ROOT / "tests" / "webui_stub", ROOT / "scripts"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("Lora")
    for stem, _ in CONCEPTS:
        shutil.copy(ASSETS / "loras" / f"{stem}.safetensors", folder / f"{stem}.safetensors")
    return folder


def _cli(out: Path, kind: str, lora_folder: Path) -> None:
    argv = ["--base", str(ASSETS / "base.safetensors"), "--out", str(out), "--format", kind]
    argv += ["--method", "lsq", "--steps", "2", "--seed", "3", "--rank", "8", "--no-progress"]
    argv += ["--sidecar"] if kind == "lora" else []
    for stem, trig in CONCEPTS:
        argv += ["--concept", str(lora_folder / f"{stem}.safetensors"), trig, "--name", stem]
    assert cli.main(argv) == 0


def _webui(name: str, kind: str, lora_folder: Path, ckpt_folder: Path, *, from_tab: bool) -> Path:
    from loraclr_glue.lora_files import run_merge

    from lib_loraclr.folder_merge import request_from_table
    from lib_loraclr.merge.request import validate_request

    if from_tab:  # the tab's widgets → the request the REST route takes
        table = [[stem, trig, 1.0, 1.0] for stem, trig in CONCEPTS]
        body = request_from_table(table, "lsq", "recommended", 2, 3, kind.upper(), name, 8, False)
    else:
        body = {
            "loras": [{"name": stem, "trigger": trig} for stem, trig in CONCEPTS],
            "method": "lsq",
            "output": {"kind": kind, "name": name, "rank": 8},
            "advanced": {"seed": 3, "sample_steps": 2},
        }
    out = run_merge(
        validate_request(body),
        lora_folder=lora_folder,
        checkpoint_folder=ckpt_folder,
        base_checkpoint=ASSETS / "base.safetensors",
    )
    return Path(out["file"])


@pytest.mark.parametrize("kind", ["lora", "checkpoint"])
def test_cli_tab_and_rest_write_the_same_bytes(kind, lora_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764892800")  # modelspec.date fixed: reproducible bytes
    dirs = {}
    for front in ("cli", "tab", "rest"):  # one folder each (the WebUI writes a LoRA into its LoRA folder)
        dirs[front] = tmp_path / front
        dirs[front].mkdir()
        for stem, _ in CONCEPTS:
            shutil.copy(lora_folder / f"{stem}.safetensors", dirs[front] / f"{stem}.safetensors")
    _cli(dirs["cli"] / "m.safetensors", kind, dirs["cli"])
    files = [dirs["cli"] / "m.safetensors"]
    for front in ("tab", "rest"):
        folder = dirs[front]
        files.append(_webui("m", kind, folder, folder, from_tab=front == "tab"))
    metas = [read_safetensors_metadata(f) for f in files]
    assert metas[0] == metas[1] == metas[2]
    assert metas[0].get("modelspec.date", "2025-12-05T00:00:00") == "2025-12-05T00:00:00"
    params = json.loads(metas[0]["loraclr_parameters"])
    assert params == {"preset": "recommended", "sample_steps": 2, "seed": 3}
    sources = json.loads(metas[0]["loraclr_sources"])
    assert [(s["name"], s["file"], s["trigger"], s["te_weight"]) for s in sources] == [
        ("sks", "sks.safetensors", "sks", 1.0),
        ("ohwx", "ohwx.safetensors", "ohwx", 1.0),
    ]
    blobs = [f.read_bytes() for f in files]
    assert blobs[0] == blobs[1] == blobs[2]
    if kind == "checkpoint":  # the base's own metadata travels with the recipe
        base_meta = read_safetensors_metadata(ASSETS / "base.safetensors")
        assert all(metas[0].get(k) == v for k, v in base_meta.items() if not k.startswith("sshs_"))
        assert metas[0]["loraclr_method"] == "lsq"
    else:
        sides = [f.with_suffix(".json").read_text(encoding="utf8") for f in files]
        assert sides[0] == sides[1] == sides[2] and "sks, ohwx" in sides[0]


def test_interrupt_writes_nothing(lora_folder, tmp_path):
    out = tmp_path / "never.safetensors"
    job = MergeJob(
        base=ASSETS / "base.safetensors",
        concepts=tuple(JobConcept(lora_folder / f"{s}.safetensors", t) for s, t in CONCEPTS),
        out=out,
        method="lsq",
        options={"sample_steps": 2},
    )
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 3  # after reading the LoRAs and the base, during the merge

    with pytest.raises(MergeInterrupted, match="nothing was written"):
        run_job(job, should_stop=stop)
    assert list(tmp_path.iterdir()) == []


def test_missing_trigger_falls_back_to_the_files_then_refuses(lora_folder, tmp_path):
    from lib_loraclr.merge.job import MissingTriggerError, file_trigger_words

    assert file_trigger_words(lora_folder / "sks.safetensors") == ["sks"]
    bare = tmp_path / "bare.safetensors"
    from lib_loraclr.safeio import atomic_write_safetensors, read_safetensors

    tensors, _ = read_safetensors(lora_folder / "sks.safetensors")
    atomic_write_safetensors(tensors, bare, metadata={})
    job = MergeJob(
        base=ASSETS / "base.safetensors",
        concepts=(JobConcept(bare), JobConcept(lora_folder / "ohwx.safetensors")),
        out=tmp_path / "out.safetensors",
        method="linear",
    )
    with pytest.raises(MissingTriggerError, match=r"'bare' \(bare\.safetensors\) has no trigger words"):
        run_job(job)
    assert not (tmp_path / "out.safetensors").exists()


def test_distill_steps_reach_the_job_from_every_front_end(lora_folder, tmp_path):
    from lib_loraclr.merge.request import validate_request

    req = validate_request({"loras": ["a", "b"], "output": {"name": "m"}, "advanced": {"distill_steps": 100}})
    assert req.advanced == {"distill_steps": 100}
    argv = ["--base", str(ASSETS / "base.safetensors"), "--out", str(tmp_path / "m.safetensors")]
    argv += ["--distill-steps", "100"]
    for stem, trig in CONCEPTS:
        argv += ["--concept", str(lora_folder / f"{stem}.safetensors"), trig]
    rest, specs = cli._split_concepts(argv)
    job = cli.job_from_args(cli.build_parser().parse_args(rest), specs)
    assert job.options["distill_steps"] == 100 and job.config().distill_steps == 100


def test_a_large_lora_output_leaves_the_merge_at_its_rank_with_the_same_bytes(
    lora_folder, tmp_path, monkeypatch
):
    """Above `LOWRANK_RESULT_BYTES` of dense ΔW (SDXL: 6.2 GiB) the merge hands back each layer at the file's
    rank (`MergeConfig.lowrank_output`): same file bytes and the same reported SVD errors as the dense way."""
    from lib_loraclr.merge import job as job_mod

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764892800")  # modelspec.date fixed: reproducible bytes
    seen = []

    def spy(model, concepts, config, progress):
        seen.append(config.lowrank_output)
        return job_mod.merge_loras(model, concepts, config, progress)

    def run(folder: str):
        (tmp_path / folder).mkdir()
        concepts = tuple(JobConcept(lora_folder / f"{s}.safetensors", t, s) for s, t in CONCEPTS)
        out = tmp_path / folder / "pair.safetensors"
        job = MergeJob(
            ASSETS / "base.safetensors", concepts, out, method="lsq", rank=8, options={"sample_steps": 2}
        )
        return run_job(job, merge=spy), out.read_bytes()

    dense, dense_bytes = run("dense")
    monkeypatch.setattr(job_mod, "LOWRANK_RESULT_BYTES", 0)
    low, low_bytes = run("low")
    assert seen == [None, (8, 3e-4)]
    assert all(m.dense is not None for m in dense.deltas.modules.values())
    assert all(m.dense is None and m.rank <= 8 for m in low.deltas.modules.values())
    assert low_bytes == dense_bytes
    for k in ("svd_error", "svd_error_max", "svd_tolerance"):
        assert low.report[k] == dense.report[k], k
