"""One merge job for every front end: ``python -m lib_loraclr merge``, the WebUI tab and
``POST /loraclr/v1/merge`` build a `MergeJob` from their arguments and call `run_job`, so the same request
gives the same file bytes, metadata and report whichever way it came in.

`run_job`: check the job → read the LoRAs (small) → load the base (large) → merge → write the LoRA (or the
checkpoint) atomically with the recipe metadata → the report. Nothing is written before the end; an
interrupt (``should_stop``) or an error leaves no file.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraclrError
from .pipeline import Concept, MergeConfig, MergeResult, merge_device, merge_loras
from .report import json_safe, report_rows

KINDS = ("lora", "checkpoint")
#: rank cap of a saved LoRA; each module gets the smallest rank within the SVD tolerance up to it
DEFAULT_RANK = 32
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
#: a LoRA output whose dense merged ΔW would take more than this many bytes (float32, every targeted layer)
#: leaves the merge at the file's rank layer by layer (`MergeConfig.lowrank_output`): SDXL's 824 layers are
#: 6.2 GiB, SD1.5's 200 layers 0.66 GiB (kept dense: `JobResult.deltas` is then the exact merge)
LOWRANK_RESULT_BYTES = 1 << 30

Progress = Callable[[str, int, int], None]


class MergeInterrupted(LoraclrError):
    """The user stopped the merge; nothing was written."""


class MissingTriggerError(LoraclrError):
    """A concept has no trigger words: none given and none in the file's metadata or sidecar."""


@dataclass(frozen=True)
class JobConcept:
    """One LoRA to merge. ``trigger`` empty: the file's own trigger words (`file_trigger_words`)."""

    file: Path
    trigger: str = ""
    name: str = ""  # shown in reports and metadata; default: the file's stem
    te_weight: float = 1.0
    unet_weight: float = 1.0
    prompts: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.name or Path(self.file).stem


@dataclass(frozen=True)
class MergeJob:
    """A checked-at-the-door merge request. ``options``: `MergeConfig` fields (``sample_steps``, ``seed``,
    …); ``sidecar``: also write the WebUI card's ``NAME.json`` (LoRA output only)."""

    base: Path
    concepts: tuple[JobConcept, ...]
    out: Path
    kind: str = "lora"
    method: str = "loraclr"
    preset: str = "recommended"
    rank: int | None = DEFAULT_RANK
    dtype: str = "fp16"
    overwrite: bool = False
    sidecar: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    def config(self) -> MergeConfig:
        cfg = MergeConfig(method=self.method, preset=self.preset, **dict(self.options))
        cfg.validate()
        return cfg


@dataclass
class JobResult:
    """What a front end shows: the written file, the concepts with their trigger words, the JSON-safe report
    (non-finite values → None; their paths in ``replaced``) and the merge itself."""

    file: Path
    kind: str
    concepts: list[JobConcept]
    report: dict[str, Any]
    rows: list[list[Any]]
    merge: MergeResult
    seconds: float
    replaced: list[str] = field(default_factory=list)

    @property
    def triggers(self) -> list[str]:
        return [c.trigger for c in self.concepts]

    @property
    def deltas(self) -> Any:
        """The merged DeltaSet: the exact dense ΔW, or for a LoRA output above `LOWRANK_RESULT_BYTES` the
        saved file's factors."""
        return self.merge.deltas


def file_trigger_words(path: Path) -> list[str]:
    """A LoRA file's trigger words: its metadata (`lib_loraclr.metadata.trigger_words`), else the WebUI
    sidecar ``NAME.json``'s "activation text" (comma-separated)."""
    from ..metadata import trigger_words
    from ..safeio import read_safetensors_metadata

    meta: Mapping[str, str] = {}
    if path.suffix.lower() == ".safetensors":
        try:
            meta = read_safetensors_metadata(path)
        except (OSError, LoraclrError, ValueError):
            meta = {}
    words = trigger_words(meta)
    if words:
        return words
    try:
        text = json.loads(path.with_suffix(".json").read_text(encoding="utf8")).get("activation text", "")
    except (OSError, ValueError, AttributeError):
        return []
    return [w.strip() for w in str(text).split(",") if w.strip()]


def _dense_bytes(deltas: Sequence[Any]) -> int:
    """Bytes of one dense float32 ΔW on every layer the LoRAs (DeltaSets) touch."""
    shapes: dict[str, tuple[int, ...]] = {}
    for ds in deltas:
        for k, m in getattr(ds, "modules", {}).items():
            shapes.setdefault(k, tuple(m.shape))
    return 4 * sum(math.prod(s) for s in shapes.values())


def check_job(job: MergeJob) -> MergeConfig:
    """Everything checkable before any file is read: kind, dtype, rank, triggers, paths, the config."""
    from ..validate import MAX_RANK, check_input_file, check_output_file, check_trigger

    if job.kind not in KINDS:
        raise LoraclrError(f"output kind must be one of {', '.join(KINDS)}, got {job.kind!r}")
    if job.dtype not in DTYPES:
        raise LoraclrError(f"dtype must be one of {', '.join(DTYPES)}, got {job.dtype!r}")
    if job.rank is not None and not 1 <= int(job.rank) <= MAX_RANK:
        raise LoraclrError(f"rank must be a whole number from 1 to {MAX_RANK}, got {job.rank!r}")
    if not job.concepts:
        raise LoraclrError("nothing to merge: give at least one LoRA with its trigger words")
    for c in job.concepts:
        if c.trigger:
            check_trigger(c.trigger, f"LoRA {c.label!r}")
    check_input_file(job.base, "base checkpoint")
    files = [check_input_file(c.file, f"LoRA {c.label!r}") for c in job.concepts]
    check_output_file(job.out, overwrite=job.overwrite, inputs=[Path(job.base), *files], what="output")
    return job.config()


def job_metadata(
    job: MergeJob,
    config: MergeConfig,
    concepts: Sequence[JobConcept],
    tag_sources: Sequence[Mapping[str, str]],
) -> dict[str, str]:
    """The recipe fields written into the merged file (`lib_loraclr.metadata.recipe_metadata`). Parameters:
    the preset, the sampling steps and seed as used, then the other options given, sorted by name, so the
    same merge gives the same metadata from every front end. Where it ran (``device``) is not part of the
    recipe and is left out; refinement steps the device chose (``config.distill_steps`` as the merge ran
    them) are."""
    given = {k: v for k, v in sorted(job.options.items()) if k not in ("sample_steps", "seed", "device")}
    # refinement steps the device chose shape the result as much as given ones
    chosen = config.distill_steps if "distill_steps" not in given else None
    if chosen:
        given = dict(sorted({**given, "distill_steps": chosen}.items()))
    parameters = {"preset": job.preset, "sample_steps": config.sample_steps, "seed": config.seed, **given}
    from ..metadata import recipe_metadata

    return recipe_metadata(
        sources=[
            {
                "name": c.label,
                "file": Path(c.file).name,
                "trigger": c.trigger,
                "te_weight": c.te_weight,
                "unet_weight": c.unet_weight,
            }
            for c in concepts
        ],
        method=job.method,
        parameters=json_safe(parameters),
        trigger=[c.trigger for c in concepts],
        tag_sources=list(tag_sources),
    )


def _to_device(model: Any, device: torch.device) -> Any:
    """``model`` moved to ``device``; a GPU without room for it gives a `LoraclrError` that says so."""
    try:
        return model.to(device)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        raise LoraclrError(
            f"the base model does not fit in {device}'s free memory ({e}); merge on 'cpu'"
        ) from None


def _back_to_cpu(model: Any) -> tuple[Any, torch.device]:
    """``model`` on the CPU again after a failed try on the GPU, whose cached memory goes back to the host."""
    model = model.to("cpu")
    torch.cuda.empty_cache()
    return model, torch.device("cpu")


def run_job(
    job: MergeJob,
    *,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    read_lora: Callable[[Path], Any] | None = None,
    load_model: Callable[[Path], Any] | None = None,
    merge: Callable[..., MergeResult] = merge_loras,
) -> JobResult:
    """Run ``job`` (see the module docstring) → `JobResult`.

    ``read_lora`` / ``load_model`` / ``merge``: the file reader (default `lib_loraclr.readers.read_lora`),
    the base model builder (default `lib_loraclr.base_model.load_base`) and the merge; the WebUI passes its
    cached reader and its UNet factory. Raises `LoraclrError` subclasses for the user's mistakes,
    `MergeInterrupted` when ``should_stop()`` turns true.
    """
    from ..keymap import loader_gaps
    from ..safeio import read_safetensors
    from ..writers import svd_tolerance, write_checkpoint, write_kohya_lora, write_webui_sidecar

    t0 = time.perf_counter()
    config = check_job(job)
    if read_lora is None:
        from ..readers import read_lora
    if load_model is None:
        from ..base_model import load_base as load_model

    def tick(stage: str, done: int, total: int) -> None:
        if should_stop is not None and should_stop():
            raise MergeInterrupted("merge interrupted; nothing was written")
        if progress is not None:
            progress(stage, done, total)

    tick("reading the LoRAs", 0, 1)
    concepts: list[JobConcept] = []
    deltas = []
    for c in job.concepts:  # the file's own errors (damaged, pickle, NaN, rank 0) before the base
        deltas.append(read_lora(Path(c.file)))
        trigger = c.trigger or ", ".join(file_trigger_words(Path(c.file))[:1])
        if not trigger:
            raise MissingTriggerError(
                f"LoRA {c.label!r} ({Path(c.file).name}) has no trigger words in its metadata; type them"
            )
        concepts.append(JobConcept(c.file, trigger, c.label, c.te_weight, c.unet_weight, tuple(c.prompts)))
    tick("reading the base model", 0, 1)
    model = load_model(Path(job.base))
    device = merge_device(config.device)
    notes: list[str] = []
    if device.type != "cpu":
        tick(f"moving the base model to {device}", 0, 1)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            model = _to_device(model, device)
        except (LoraclrError, RuntimeError) as e:  # no room (`_to_device`'s error), or a CUDA error
            if config.device != "auto":
                raise
            model, device = _back_to_cpu(model)  # "auto": the CPU is the other choice
            why = "had no room for the base model" if isinstance(e, LoraclrError) else f"failed ({e})"
            notes.append(f"the GPU {why}: merged on the CPU")
    merge_concepts = [
        Concept(
            ds,
            c.trigger,
            name=c.label,
            te_weight=c.te_weight,
            unet_weight=c.unet_weight,
            prompts=list(c.prompts),
        )
        for ds, c in zip(deltas, concepts)
    ]
    dtype = DTYPES[job.dtype]
    if job.kind == "lora" and _dense_bytes(deltas) > LOWRANK_RESULT_BYTES:
        # each layer leaves the merge at the file's rank as soon as no later pass needs its exact ΔW; the
        # writer then keeps those factors as they are (same file)
        config = replace(config, lowrank_output=(job.rank, svd_tolerance(dtype)))
    gpu_peak = None
    try:
        try:
            result = merge(model, merge_concepts, config, tick)
        except RuntimeError as e:  # torch's errors (out of memory, a CUDA error); not ours, not an interrupt
            if device.type == "cpu":
                raise
            if config.device != "auto":
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    raise LoraclrError(
                        f"{device} ran out of memory during the merge ({e}); merge on 'cpu'"
                    ) from None
                raise
            # "auto" chose the GPU: the CPU is the other choice, so the merge still ends with a file
            gpu_peak = torch.cuda.max_memory_allocated(device) / 2**30
            model, device = _back_to_cpu(model)
            notes.append(f"the merge on the GPU failed ({type(e).__name__}: {e}): merged on the CPU")
            result = merge(model, merge_concepts, config, tick)
    finally:
        del model  # the checkpoint output reads the base file again: not both in memory (SDXL: 7 GB each)
        if device.type == "cuda":  # also after an error or an interrupt: the host gets its GPU memory back
            gpu_peak = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.empty_cache()
    tick("saving", 0, 1)
    tags = [getattr(ds, "metadata", None) or {} for ds in deltas]
    if config.distill_steps is None:  # the steps the device chose (`MergeConfig.effective_distill_steps`)
        config = replace(config, distill_steps=int((result.report.get("distill") or {}).get("steps", 0)))
    meta = job_metadata(job, config, concepts, tags)
    report = dict(result.report)
    report["device"] = str(device)
    skipped = (report.get("distill") or {}).get("skipped")
    if skipped:
        notes.append(f"refinement skipped: {skipped}")
    if notes:
        report["notes"] = notes
    if gpu_peak is not None:
        report["gpu_peak_gib"] = gpu_peak
    if job.kind == "lora":
        arch = getattr(result.deltas, "arch", "unknown")
        arch = arch if arch in ("sd1", "sd2", "sdxl") else "sd1"
        errors = write_kohya_lora(
            result.deltas,
            job.out,
            arch=arch,
            rank=job.rank,
            metadata=meta,
            overwrite=job.overwrite,
            dtype=dtype,
        )
        errors.update(getattr(result, "svd_errors", None) or {})  # modules the merge already reduced
        report["svd_tolerance"] = svd_tolerance(dtype)  # per module, below the rank cap
        if errors:
            report["svd_error"] = float(sum(errors.values()) / len(errors))
            report["svd_error_max"] = float(max(errors.values()))
        report["loader_gaps"] = loader_gaps(result.deltas.modules, arch)
        if job.sidecar:  # the card's activation text (A1111/Forge read NAME.json); a user's own one is kept
            about = f"{job.method} merge of {', '.join(c.label for c in concepts)}"
            side = write_webui_sidecar(
                job.out, [c.trigger for c in concepts], arch, overwrite=job.overwrite, description=about
            )
            report["sidecar"] = {"file": str(Path(job.out).with_suffix(".json")), "written": side is not None}
    else:
        if Path(job.base).suffix.lower() != ".safetensors":
            raise LoraclrError("checkpoint output needs a .safetensors base checkpoint")
        base_sd, base_meta = read_safetensors(job.base)
        base_meta = {k: v for k, v in base_meta.items() if not k.startswith("sshs_")}
        write_checkpoint(
            base_sd,
            result.deltas,
            job.out,
            dtype=dtype,
            metadata={**base_meta, **meta},
            overwrite=job.overwrite,
        )
    replaced: list[str] = []
    report = json_safe(report, "report", replaced)
    return JobResult(
        file=Path(job.out),
        kind=job.kind,
        concepts=concepts,
        report=report,
        rows=report_rows(report),
        merge=result,
        seconds=time.perf_counter() - t0,
        replaced=replaced,
    )
