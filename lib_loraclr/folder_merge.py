"""A merge request run against a LoRA folder and a checkpoint folder: the WebUI's merge tab and its
``POST /loraclr/v1/merge`` (a request `lib_loraclr.merge.request` → the LoRAs found by name →
`lib_loraclr.merge.job.run_job` → the response), plus the tab's request and status texts.

Response: ``{"file", "kind", "prompt", "concepts": [{"name", "trigger"}], "report", "report_rows", "seconds"}``.
The output is written atomically at the end; an interrupt before that leaves no file. Trigger words default
to the LoRA's metadata (`lib_loraclr.merge.job.file_trigger_words`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import validate
from .errors import LoraclrError, ServiceError
from .lora_folder import LoraNotFoundError, read_lora_cached
from .merge.job import JobConcept, MergeInterrupted, MergeJob, run_job
from .merge.pipeline import merge_loras
from .merge.request import MergeRequest, MergeRequestError
from .safeio import check_output_name


class EngineUnavailable(RuntimeError):
    """A part the job needs is missing from this environment (HTTP 503), with what to do instead."""


def load_base_model(checkpoint: Path, unet_factory: Callable[[Any], Any] | None = None) -> Any:
    """The base model for the merge, built from the checkpoint FILE (A1111 keeps LoRA deltas patched into
    the live model between generations, so the live model is not a clean base).

    Uses `lib_loraclr.base_model.load_base` (SD1.x, SDXL-family and the bundled tiny models). Its UNet is ldm's, which
    A1111 ships; a host without ldm passes ``unet_factory`` (Forge's UNet class). Without either, raises
    `EngineUnavailable` with what to do instead.
    """
    from .base_model import load_base

    try:
        return load_base(checkpoint, unet_factory=unet_factory)
    except ModuleNotFoundError as e:
        raise EngineUnavailable(
            f"merging needs the '{e.name}' package to rebuild the base model, and this WebUI does not have it "
            "(nor Forge's UNet class); run `python -m lib_loraclr merge` in a venv made by .ci/venv.sh instead"
        ) from None


def ready_prompt(name: str, triggers: Sequence[str]) -> str:
    """``<lora:NAME:1> trigger1, trigger2`` for txt2img."""
    words = ", ".join(t for t in triggers if t)
    return f"<lora:{name}:1> {words}".strip()


def run_merge(
    req: MergeRequest,
    *,
    lora_folder: Path | None,
    checkpoint_folder: Path | None,
    base_checkpoint: Path | None,
    find_lora: Callable[[str, Path | None], Path],
    progress: Callable[[str, int, int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    unet_factory: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Run one merge (see the module docstring). ``find_lora(name, folder)`` resolves the request's names.
    Raises MergeRequestError, MergeInterrupted, `EngineUnavailable` and lib_loraclr errors (all with
    user-facing messages). ``unet_factory``: builds the base model's UNet on hosts without ldm."""
    t0 = time.perf_counter()
    if base_checkpoint is None:
        raise MergeRequestError("no checkpoint is loaded: the merge needs the base model's file")
    validate.check_input_file(base_checkpoint, "base checkpoint")  # InputFileError: a folder, unreadable
    folder = lora_folder if req.kind == "lora" else checkpoint_folder
    if folder is None:
        raise MergeRequestError(f"no {'LoRA' if req.kind == 'lora' else 'checkpoint'} folder is configured")
    out_path = check_output_name(req.name, folder)  # BadOutputNameError for path tricks
    if out_path.exists() and not req.overwrite:
        raise MergeRequestError(f"{out_path.name} already exists; choose another name or tick overwrite")
    files = []
    for spec in req.loras:
        try:
            path = find_lora(spec.name, lora_folder)
        except LoraNotFoundError as e:
            raise MergeRequestError(str(e)) from None
        validate.check_input_file(path, f"LoRA {spec.name!r}")
        read_lora_cached(path)  # the file's own errors (damaged, pickle, NaN, rank 0) first; cached
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
        read_lora=read_lora_cached,
        load_model=lambda path: load_base_model(path, unet_factory),
        merge=lambda *a, **k: merge_loras(*a, **k),  # looked up per call (tests replace it)
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
    if isinstance(e, EngineUnavailable):
        return 503
    if isinstance(e, LoraclrError):  # the user can fix it; anything else is a bug: 500 + traceback
        return 400
    return 500


def service_error(e: BaseException) -> ServiceError:
    """The HTTP error of a failed merge (`error_status`); for a 5xx (not the user's fault) the traceback
    goes to the console for the bug report."""
    status = error_status(e)
    if status >= 500:
        import traceback

        print(
            f"[sd-webui-loraclr] merge failed:\n{''.join(traceback.format_exception(type(e), e, e.__traceback__))}"
        )
    return ServiceError(status, str(e), type(e).__name__)


def table_rows(
    selected: Sequence[str], current: Sequence[Sequence[Any]] | None, folder: Mapping[str, Path]
) -> list[list[Any]]:
    """The merge tab's table ``[name, trigger words, TE weight, UNet weight]`` for the ``selected`` LoRAs of
    ``folder`` (`lora_folder.list_loras`): rows already in ``current`` keep the user's edits, new rows get
    the file's first three trigger words; one blank row when nothing is selected."""
    from .merge.job import file_trigger_words

    keep = {str(r[0]): list(r) for r in (current or []) if r and str(r[0]).strip()}
    rows = []
    for name in selected or []:
        path = folder.get(name)
        words = file_trigger_words(path)[:3] if name not in keep and path is not None else []
        rows.append(keep.get(name) or [name, ", ".join(words), 1.0, 1.0])
    return rows or [["", "", 1.0, 1.0]]


def request_from_table(
    table: Sequence[Sequence[Any]],
    method: str,
    preset: str,
    sample_steps: float,
    seed: float,
    kind: str,
    name: str,
    rank: float,
    overwrite: bool,
    distill_steps: float = -1,
    device: str = "Auto",
) -> dict[str, Any]:
    """The merge tab's values (table rows ``[name, trigger, TE weight, UNet weight]``, blank rows skipped)
    → the same JSON request the REST route takes. ``distill_steps``: the output-level refinement's steps
    (0 = off; negative = the default, which the device sets); ``device``: "Auto" (the default: a CUDA GPU
    when there is one with room), "CPU" or "GPU" (the first CUDA GPU)."""
    loras = []
    for row in table or []:
        if not row or not str(row[0] or "").strip():
            continue
        loras.append(
            {
                "name": str(row[0]).strip(),
                "trigger": str(row[1] or "").strip(),
                "te_weight": row[2] if row[2] not in (None, "") else 1.0,
                "unet_weight": row[3] if row[3] not in (None, "") else 1.0,
            }
        )
    return {
        "loras": loras,
        "method": method,
        "preset": preset,
        "output": {"kind": kind.lower(), "name": name, "rank": int(rank), "overwrite": bool(overwrite)},
        "advanced": {"sample_steps": int(sample_steps), "seed": int(seed)}
        | (
            {"distill_steps": int(distill_steps)}
            if distill_steps is not None and int(distill_steps) >= 0
            else {}
        )
        | ({"GPU": {"device": "cuda"}, "CPU": {"device": "cpu"}}.get(str(device).upper(), {})),
    }


def result_message(result: Mapping[str, Any], rank: int) -> str:
    """The tab's status line for a finished merge: the file and time, the SVD truncation error, a kept
    sidecar, and one note per loader that ignores some of the merged modules."""
    from .keymap import format_loader_gaps

    msg = f"Saved {result['file']} in {result['seconds']:.1f} s."
    rep = result["report"]
    if rep.get("svd_error") is not None:
        msg += f" LoRA rank ≤ {int(rank)}: SVD truncation error {rep['svd_error']:.4f}."
    side = rep.get("sidecar") or {}
    if side.get("file") and not side.get("written"):
        msg += f" Kept your existing {Path(side['file']).name} (its activation text was not changed)."
    notes = [*rep.get("notes", []), *format_loader_gaps(rep.get("loader_gaps") or {})]
    if notes:
        msg += "\n" + "\n".join(f"Note: {line}" for line in notes)
    return msg


def release_memory() -> None:
    """Give a merge's memory back to the system: a merge rebuilds the base model from its file next to the
    WebUI's own model (several GB on SD1.5), and glibc keeps freed arenas mapped, so without this the WebUI's
    resident size stays at its peak and a second merge was OOM-killed on a 24 GB machine (A1111 1.10.1, CPU)."""
    import gc

    gc.collect()
    try:
        import ctypes
        import sys

        if sys.platform.startswith("linux"):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


__all__ = [
    "EngineUnavailable",
    "error_status",
    "load_base_model",
    "ready_prompt",
    "release_memory",
    "request_from_table",
    "result_message",
    "run_merge",
]
