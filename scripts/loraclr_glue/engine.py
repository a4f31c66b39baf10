"""The one place where the glue calls the ``lib_loraclr`` engines (small adapter functions).

An engine API that does not exist yet raises `EngineUnavailable` with the missing name, so the UI and
the REST route can say so instead of failing with an ImportError stack trace.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class EngineUnavailable(RuntimeError):
    """An engine function this glue needs is missing from this build of lib_loraclr."""


# ------------------------------------------------------------------------------------------------ LoRA files

_lora_cache: dict[tuple[str, int, int], Any] = {}
_lora_cache_lock = threading.Lock()
_LORA_CACHE_SIZE = 8


def read_lora(path: Path) -> Any:
    """`lib_loraclr.readers.read_lora` with a small cache keyed by (path, mtime, size) → DeltaSet."""
    from lib_loraclr.readers import read_lora as _read

    st = os.stat(path)
    key = (str(path), int(st.st_mtime_ns), int(st.st_size))
    with _lora_cache_lock:
        hit = _lora_cache.get(key)
    if hit is not None:
        return hit
    ds = _read(path)
    with _lora_cache_lock:
        if len(_lora_cache) >= _LORA_CACHE_SIZE:
            _lora_cache.pop(next(iter(_lora_cache)))
        _lora_cache[key] = ds
    return ds


def trigger_words(path: Path) -> list[str]:
    """`lib_loraclr.merge.job.file_trigger_words`: the file's metadata, else the sidecar's activation text."""
    from lib_loraclr.merge.job import file_trigger_words

    return file_trigger_words(Path(path))


def inspect_lora(path: Path) -> dict[str, Any]:
    """`lib_loraclr.inspect.inspect_file` (plain JSON-able dict)."""
    try:
        from lib_loraclr.inspect import inspect_file
    except ImportError as e:  # pragma: no cover - depends on the build
        raise EngineUnavailable(f"lib_loraclr.inspect.inspect_file is missing ({e})") from None
    return inspect_file(path)


# ------------------------------------------------------------------------------------------------ merge


def merge_loras(
    model: Any, concepts: Sequence[Any], config: Any, progress: Callable[[str, int, int], None] | None
) -> Any:
    """`lib_loraclr.merge.pipeline.merge_loras(model, concepts, config, progress)` → MergeResult(deltas, report)."""
    try:
        from lib_loraclr.merge.pipeline import merge_loras as _merge
    except ImportError as e:
        raise EngineUnavailable(
            f"the merge pipeline (lib_loraclr.merge.pipeline.merge_loras) is not available in this build ({e})"
        ) from None
    return _merge(model, concepts, config, progress=progress)


def load_base_model(checkpoint: Path, unet_factory: Callable[[Any], Any] | None = None) -> Any:
    """The base model for the merge, built from the checkpoint FILE (A1111 keeps LoRA deltas patched into
    the live model between generations, so the live model is not a clean base).

    Uses `lib_loraclr.base_model.load_base` (SD1.x and the bundled tiny models). Its UNet is ldm's, which
    A1111 ships; a host without ldm passes ``unet_factory`` (Forge: `host_models.forge_unet_factory`).
    Without either, raises EngineUnavailable (HTTP 503) with what to do instead.
    """
    try:
        from lib_loraclr.base_model import load_base
    except ImportError as e:
        raise EngineUnavailable(f"lib_loraclr.base_model is not available in this build ({e})") from None
    try:
        return load_base(checkpoint, unet_factory=unet_factory)
    except ModuleNotFoundError as e:
        raise EngineUnavailable(
            f"merging needs the '{e.name}' package to rebuild the base model, and this WebUI does not have it "
            "(nor Forge's UNet class); run `python -m lib_loraclr merge` in a venv made by .ci/venv.sh instead"
        ) from None


def loader_gap_lines(gaps: dict[str, list[str]]) -> list[str]:
    """`lib_loraclr.keymap.format_loader_gaps`: one readable line per loader that ignores modules."""
    from lib_loraclr.keymap import format_loader_gaps

    return format_loader_gaps(gaps)


def output_path(name: str, folder: Path) -> Path:
    """`lib_loraclr.safeio.check_output_name`: a bare file name inside ``folder`` (no path tricks)."""
    from lib_loraclr.safeio import check_output_name

    return check_output_name(name, folder)
