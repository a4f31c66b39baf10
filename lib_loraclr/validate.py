"""Validation at the door: every path, number and name of a request is checked before any work starts.

The CLI (``python -m lib_loraclr merge`` / ``inspect``), the WebUI's REST routes and CLoRA's script
arguments call these checks first, so bad input ends in one :class:`~lib_loraclr.errors.LoraclrError`
line that names the file, the key and the fix, never in a traceback after minutes of work.

Bounds (module constants, documented in the README's "Headless use"):

- a LoRA's tensors hold finite values of magnitude ≤ :data:`MAX_LORA_VALUE`; every module has rank ≥ 1
  and ``|alpha| / rank`` ≤ :data:`MAX_LORA_SCALE` (checked by ``readers`` while reading);
- a concept weight (merge ``--weight``/``te_weight``/``unet_weight``, CLoRA row weights) is finite and
  ``|w|`` ≤ :data:`MAX_CONCEPT_WEIGHT`;
- a base checkpoint holds at most :data:`MAX_BASE_PARAMS` numbers (checked before allocating).
"""

from __future__ import annotations

import argparse
import math
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from lib_loraclr.errors import (
    BadOutputNameError,
    InputFileError,
    NonFiniteWeightsError,
    OutputExistsError,
    OutputNotWritableError,
    ValueRangeError,
)

#: largest magnitude of any LoRA tensor element (working LoRAs stay far below 100; fp16 tops out at 65504)
MAX_LORA_VALUE = 1e4
#: largest ``|alpha| / rank`` of a LoRA module (kohya files use ≤ 1, a few styles up to 16 or so)
MAX_LORA_SCALE = 1024.0
#: largest ``|weight|`` of a concept (typical 0…1.5; negative weights subtract a LoRA)
MAX_CONCEPT_WEIGHT = 10.0
#: largest base model, in numbers (SDXL with both text encoders is about 3.5e9)
MAX_BASE_PARAMS = 6_000_000_000
#: largest rank of a saved LoRA, and the most sampling steps of a merge's feature runs
MAX_RANK = 4096
MAX_STEPS = 1000


# ------------------------------------------------------------------------------------------------ files
def check_input_file(path: str | os.PathLike[str], what: str = "input file") -> Path:
    """``path`` as a Path when it is an existing, regular, readable file; else `InputFileError`.

    The message names the path and what to do: missing, a folder, a device/pipe/socket (never opened,
    reading one could block), no permission (checked by opening it, so it holds for root and ACLs too).
    """
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str) or not text.strip():
        raise InputFileError(f"no {what} given; pass the path of a .safetensors file")
    p = Path(text)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputFileError(f"{what} {p} does not exist; check the path and the file name") from None
    except PermissionError:
        raise InputFileError(
            f"{what} {p}: permission denied on a folder of its path; make the folder readable or move the file"
        ) from None
    except OSError as e:  # name too long, a symlink loop, a file used as a folder
        raise InputFileError(f"{what} {p}: {e.strerror or e}; check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputFileError(f"{what} {p} is a folder, not a file; give the path of the file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(
            f"{what} {p} is not a regular file (a device, pipe or socket); give the path of a saved file"
        )
    try:
        with p.open("rb"):
            pass
    except PermissionError:
        raise InputFileError(
            f"{what} {p}: no permission to read it; fix its permissions (chmod u+r) or copy it somewhere readable"
        ) from None
    except OSError as e:
        raise InputFileError(f"{what} {p} cannot be opened ({e.strerror or e})") from None
    return p


def _existing_folder(folder: Path) -> Path:
    """The nearest existing ancestor of ``folder`` (writers create missing folders)."""
    f = folder
    while not f.exists() and f != f.parent:
        f = f.parent
    return f


def check_writable_folder(folder: str | os.PathLike[str], what: str = "output") -> Path:
    """`OutputNotWritableError` unless a file can be created in ``folder`` (or the nearest existing
    folder above it). Probes with a temporary file that is removed at once."""
    f = _existing_folder(Path(folder) if str(folder) else Path("."))
    if not f.is_dir():
        raise OutputNotWritableError(
            f"cannot write the {what}: {f} is a file, not a folder; choose another path"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".loraclr-probe-", suffix=".tmp", dir=f)
    except OSError as e:
        raise OutputNotWritableError(
            f"cannot write the {what} in {f} ({e.strerror or e}); choose a folder you can write to"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return f


def check_output_file(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    what: str = "output",
    overwrite_hint: str = "pass --overwrite",
) -> Path:
    """Check an output path before any work: not a folder, not one of ``inputs``, absent unless
    ``overwrite``, in a writable folder. Raises BadOutputNameError, OutputExistsError,
    OutputNotWritableError."""
    p = Path(path)
    if p.is_dir():
        raise BadOutputNameError(f"{what} {p} is an existing folder; give a file name inside it")
    if p.exists():
        for src in inputs:
            try:
                same = os.path.samefile(p, src)
            except OSError:
                same = False
            if same:
                raise BadOutputNameError(
                    f"{what} {p} is also an input ({src}); the merge would overwrite its own input. "
                    "Choose another output name"
                )
        if not overwrite:
            raise OutputExistsError(f"{what} {p} already exists; choose another name or {overwrite_hint}")
    check_writable_folder(p.parent, what)
    return p


# ------------------------------------------------------------------------------------------------ numbers
def check_number(value: Any, what: str, lo: float, hi: float, *, integer: bool = False) -> float:
    """``value`` as a finite number in ``[lo, hi]`` (whole when ``integer``); else `ValueRangeError`
    (`NonFiniteWeightsError` for NaN/Inf) naming ``what``."""
    if isinstance(value, bool):
        raise ValueRangeError(f"{what} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueRangeError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise NonFiniteWeightsError(f"{what} is {value!r}; give a finite number between {lo:g} and {hi:g}")
    if integer and x != int(x):
        raise ValueRangeError(f"{what} must be a whole number, got {value!r}")
    if not lo <= x <= hi:
        raise ValueRangeError(f"{what} is {value!r}; it must be between {lo:g} and {hi:g}")
    return x


def check_concept_weight(value: Any, what: str) -> float:
    """A concept's LoRA weight: finite, ``|w|`` ≤ `MAX_CONCEPT_WEIGHT`."""
    return check_number(value, what, -MAX_CONCEPT_WEIGHT, MAX_CONCEPT_WEIGHT)


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type=``: a whole number in ``[lo, hi]`` (else an argparse error, exit 2)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {v}")
        return v

    parse.__name__ = "whole number"
    return parse


def check_trigger(trigger: Any, what: str) -> str:
    """Trigger words: non-empty text without control characters; `ValueRangeError` otherwise."""
    if not isinstance(trigger, str) or not trigger.strip():
        raise ValueRangeError(
            f'{what} has no trigger words; give the words the LoRA was trained with (e.g. "sks")'
        )
    if any(ord(ch) < 32 and ch not in "\t" for ch in trigger):
        raise ValueRangeError(
            f"{what}: trigger words {trigger!r} contain a control character; type plain words"
        )
    return trigger.strip()


# ------------------------------------------------------------------------------------------------ LoRA values
def check_rank(rank: int, key: str, source: str, detail: str = "") -> None:
    """`ValueRangeError` when a LoRA module's rank is below 1 (an empty factor: nothing to scale by)."""
    if rank < 1:
        raise ValueRangeError(
            f"{source}: module {key} has rank {rank}{f' ({detail})' if detail else ''}; a LoRA module needs "
            "rank ≥ 1. The file is broken: export it again or drop this module"
        )


def check_alpha(alpha: float, rank: int, key: str, source: str) -> None:
    """`ValueRangeError` when ``|alpha| / rank`` exceeds `MAX_LORA_SCALE` (NaN/Inf are caught on reading)."""
    scale = abs(alpha) / max(rank, 1)
    if scale > MAX_LORA_SCALE:
        raise ValueRangeError(
            f"{source}: {key}.alpha is {alpha:g} at rank {rank} (scale alpha/rank {scale:.3g}, working LoRAs "
            f"stay below {MAX_LORA_SCALE:g}); the file is damaged or its alpha was saved wrongly. Export it again"
        )


def check_values(peak: float, n_bad: int, key: str, source: str) -> None:
    """Refuse a LoRA tensor whose largest magnitude ``peak`` is NaN/Inf (``n_bad`` values) or too large."""
    if n_bad:
        raise NonFiniteWeightsError(
            f"{source}: tensor {key} holds {n_bad} NaN/Inf value(s); the LoRA is broken (often a training run "
            "that diverged, or fp16 overflow). Retrain or export it again."
        )
    if peak > MAX_LORA_VALUE:
        raise ValueRangeError(
            f"{source}: tensor {key} holds values up to {peak:.3g}; working LoRA weights stay below "
            f"{MAX_LORA_VALUE:g}, so the file is damaged or was saved wrongly. Export it again"
        )


def check_mapping_keys(data: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """`ValueRangeError` for a key of ``data`` not in ``known`` (with the list of known keys)."""
    known = list(known)
    for k in data:
        if k not in known:
            raise ValueRangeError(f"unknown key {k!r} in {where}; known: {', '.join(known)}")


# ------------------------------------------------------------------------------------------------ requests
def check_merge_paths(
    base: str | os.PathLike[str],
    lora_files: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    report: str | os.PathLike[str] | None = None,
) -> None:
    """The paths of a headless merge, before any file is read: the base and LoRA files readable, the
    output (and report) writable, absent unless ``overwrite``, none of them an input, report ≠ output."""
    check_input_file(base, "base checkpoint (--base)")
    files = [check_input_file(f, "LoRA file (--concept)") for f in lora_files]
    inputs = [Path(base), *files]
    check_output_file(out, overwrite=overwrite, inputs=inputs, what="output (--out)")
    if report is not None:
        if Path(report).resolve() == Path(out).resolve():
            raise BadOutputNameError(
                f"report (--report) {report} is the output file too; give it another name"
            )
        check_output_file(report, overwrite=True, inputs=inputs, what="report (--report)")


__all__ = [
    "MAX_BASE_PARAMS",
    "MAX_CONCEPT_WEIGHT",
    "MAX_LORA_SCALE",
    "MAX_LORA_VALUE",
    "MAX_RANK",
    "MAX_STEPS",
    "check_alpha",
    "check_concept_weight",
    "check_input_file",
    "check_mapping_keys",
    "check_merge_paths",
    "check_number",
    "check_output_file",
    "check_rank",
    "check_trigger",
    "check_values",
    "check_writable_folder",
    "int_in",
]
