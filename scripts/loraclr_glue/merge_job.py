"""The WebUI's merge (tab and ``POST /loraclr/v1/merge``): a request (`lib_loraclr.merge.request`) → the
LoRAs found in the WebUI's folders → `lib_loraclr.merge.job.run_job` → the response.

Response: ``{"file", "kind", "prompt", "concepts": [{"name", "trigger"}], "report", "report_rows", "seconds"}``. The output is written
atomically at the end; an interrupt before that leaves no file. Trigger words default to the LoRA's
metadata (`engine.trigger_words`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib_loraclr import validate
from lib_loraclr.errors import LoraclrError
from lib_loraclr.merge.job import DEFAULT_RANK, KINDS, JobConcept, MergeInterrupted, MergeJob, run_job
from lib_loraclr.merge.request import (
    PRESETS,
    MergeRequest,
    MergeRequestError,
    validate_advanced,
    validate_request,
)
from lib_loraclr.merge.solvers import METHODS

from . import engine
from .lora_files import LoraNotFoundError, find_lora


def ready_prompt(name: str, triggers: list[str]) -> str:
    """``<lora:NAME:1> trigger1, trigger2`` for txt2img."""
    words = ", ".join(t for t in triggers if t)
    return f"<lora:{name}:1> {words}".strip()


def run_merge(
    req: MergeRequest,
    *,
    lora_folder: Path | None,
    checkpoint_folder: Path | None,
    base_checkpoint: Path | None,
    progress: Callable[[str, int, int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    unet_factory: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Run one merge (see the module docstring). Raises MergeRequestError, MergeInterrupted,
    engine.EngineUnavailable and lib_loraclr errors (all with user-facing messages).
    ``unet_factory``: builds the base model's UNet on hosts without ldm (`host_models.merge_unet_factory`)."""
    t0 = time.perf_counter()
    if base_checkpoint is None:
        raise MergeRequestError("no checkpoint is loaded: the merge needs the base model's file")
    validate.check_input_file(base_checkpoint, "base checkpoint")  # InputFileError: a folder, unreadable
    folder = lora_folder if req.kind == "lora" else checkpoint_folder
    if folder is None:
        raise MergeRequestError(f"no {'LoRA' if req.kind == 'lora' else 'checkpoint'} folder is configured")
    out_path = engine.output_path(req.name, folder)  # BadOutputNameError for path tricks
    if out_path.exists() and not req.overwrite:
        raise MergeRequestError(f"{out_path.name} already exists; choose another name or tick overwrite")
    files = []
    for spec in req.loras:
        try:
            path = find_lora(spec.name, lora_folder)
        except LoraNotFoundError as e:
            raise MergeRequestError(str(e)) from None
        validate.check_input_file(path, f"LoRA {spec.name!r}")
        engine.read_lora(path)  # the file's own errors (damaged, pickle, NaN, rank 0) first; cached
        files.append(path)
    # an output folder, an input as output (with overwrite), an unwritable folder: refused before any work
    validate.check_output_file(
        out_path, overwrite=req.overwrite, inputs=[base_checkpoint, *files], overwrite_hint="tick overwrite"
    )
    job = MergeJob(
        base=Path(base_checkpoint),
        concepts=tuple(
            JobConcept(path, s.trigger, s.name, s.te_weight, s.unet_weight, s.prompts)
            for path, s in zip(files, req.loras)
        ),
        out=out_path,
        kind=req.kind,
        method=req.method,
        preset=req.preset,
        rank=req.rank,
        overwrite=req.overwrite,
        sidecar=req.kind == "lora",  # the card's activation text in the WebUI's LoRA folder
        options=req.advanced,
    )
    try:
        job.config()
    except TypeError as e:  # MergeConfig(**advanced) with a name it does not know
        raise MergeRequestError(f"unknown advanced option: {e}") from None
    res = run_job(
        job,
        progress=progress,
        should_stop=should_stop,
        read_lora=engine.read_lora,
        load_model=lambda path: engine.load_base_model(path, unet_factory),
        merge=engine.merge_loras,
    )
    unexpected = [p for p in res.replaced if not p.split(".")[-1].startswith(("leak", "base_change_own"))]
    if unexpected:  # leak[i][i] and base_change_own of a concept with a delta are undefined by design
        print(
            f"[sd-webui-loraclr] merge report: {len(unexpected)} non-finite values written as null "
            f"(first: {', '.join(unexpected[:3])})"
        )
    triggers = res.triggers
    return {
        "file": str(res.file),
        "kind": req.kind,
        "prompt": ready_prompt(res.file.stem, triggers) if req.kind == "lora" else ", ".join(triggers),
        "concepts": [{"name": c.label, "trigger": c.trigger} for c in res.concepts],
        "report": res.report,
        "report_rows": res.rows,
        "seconds": time.perf_counter() - t0,
    }


def error_status(e: BaseException) -> int:
    """HTTP status for an error of `run_merge` / `validate_request`."""
    if isinstance(e, MergeInterrupted):
        return 409
    if isinstance(e, engine.EngineUnavailable):
        return 503
    if isinstance(e, LoraclrError):  # the user can fix it; anything else is a bug: 500 + traceback
        return 400
    return 500


__all__ = [
    "DEFAULT_RANK",
    "KINDS",
    "METHODS",
    "PRESETS",
    "MergeInterrupted",
    "MergeRequest",
    "MergeRequestError",
    "error_status",
    "ready_prompt",
    "run_merge",
    "validate_advanced",
    "validate_request",
]
