"""LoRA files in a folder, by name: listing, lookup, a small read cache, and the inspect / list requests.

Names resolve like the WebUI's ``<lora:NAME>``: the file stem (a duplicate stem in a sub-folder gets its
relative path as name), case-insensitively as a fallback. A host can put its own registry first
(``lookup``: the WebUI's built-in Lora knows aliases).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .deltas import DeltaSet
from .errors import LoraclrError, ServiceError

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".pth")


class LoraNotFoundError(LoraclrError, LookupError):
    """No LoRA file of that name."""


def list_loras(folder: Path | None, search: str = "") -> dict[str, Path]:
    """``{name: path}`` of every LoRA file under ``folder`` (recursive), names filtered by ``search``
    (case-insensitive substring), sorted by name. Names are file stems; a duplicate stem in a sub-folder
    gets its relative path as name."""
    out: dict[str, Path] = {}
    if folder is None or not folder.is_dir():
        return out
    needle = search.strip().lower()
    for root, _dirs, files in os.walk(folder, followlinks=True):
        for f in sorted(files):
            p = Path(root) / f
            if p.suffix.lower() not in LORA_SUFFIXES:
                continue
            name = p.stem
            if name in out:
                name = str(p.relative_to(folder).with_suffix("")).replace(os.sep, "/")
            if needle and needle not in name.lower():
                continue
            out[name] = p
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


def list_folders(folders: Sequence[Path | None], search: str = "") -> dict[str, Path]:
    """`list_loras` over several folders (a host's LoRA folder and its extra ones, e.g. Forge Neo's
    ``--lora-dirs``): a name already found keeps its first file; sorted by name, case-insensitively."""
    out: dict[str, Path] = {}
    for folder in folders:
        for name, path in list_loras(folder, search).items():
            out.setdefault(name, path)
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


def find_lora(name: str, folder: Path | None, lookup: Callable[[str], Path | None] | None = None) -> Path:
    """Path of the LoRA called ``name``: ``lookup(name)`` first (when it names an existing file), else the
    folder; raises `LoraNotFoundError` with what was searched."""
    name = name.strip()
    hit = lookup(name) if lookup is not None else None
    if hit is not None and hit.is_file():
        return hit
    found = list_loras(folder)
    if name in found:
        return found[name]
    lower = {k.lower(): v for k, v in found.items()}
    if name.lower() in lower:
        return lower[name.lower()]
    where = f"in {folder}" if folder else "(no LoRA folder configured)"
    raise LoraNotFoundError(f"LoRA {name!r} not found {where}; use the file name without extension")


_cache: dict[tuple[str, int, int], DeltaSet] = {}
_cache_lock = threading.Lock()
CACHE_SIZE = 8


def read_lora_cached(path: Path) -> DeltaSet:
    """`lib_loraclr.readers.read_lora` with a small cache keyed by (path, mtime, size) (the WebUI reads the
    same files at every generation and merge)."""
    from .readers import read_lora

    st = os.stat(path)
    key = (str(path), int(st.st_mtime_ns), int(st.st_size))
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    ds = read_lora(path)
    with _cache_lock:
        if len(_cache) >= CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
        _cache[key] = ds
    return ds


def inspect_names(body: Any) -> list[str]:
    """The LoRA names of an inspect request ``{"name": …}`` or ``{"names": […]}``; ValueError for anything else."""
    if not isinstance(body, Mapping):
        raise ValueError("the inspect request must be a JSON object {name} or {names}")
    unknown = set(body) - {"name", "names"}
    if unknown:
        raise ValueError(f"unknown key {min(unknown)!r}; known: name, names")
    names = body.get("names") if "names" in body else [body.get("name")]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError("give a LoRA name (name) or a list of names (names)")
    return names


def inspect_request(body: Any, find: Callable[[str], Path]) -> dict[str, Any]:
    """``POST /loraclr/v1/inspect``: ``{"loras": [{name, …summary}]}`` for the names in ``body``
    (`inspect_names`), each found by ``find``; `ServiceError` 400 for a bad request or file, 404 for an
    unknown name."""
    from .inspect import inspect_file

    try:
        names = inspect_names(body)
    except ValueError as e:
        raise ServiceError(400, str(e)) from None
    out = []
    for n in names:
        try:
            out.append({"name": n, **inspect_file(find(n))})
        except LoraNotFoundError as e:
            raise ServiceError(404, str(e), type(e).__name__) from None
        except Exception as e:
            raise ServiceError(400, f"{n}: {e}", type(e).__name__) from None
    return {"loras": out}


def lora_listing(found: Mapping[str, Path]) -> list[dict[str, Any]]:
    """``[{name, file, trigger_words}]`` of LoRA files (`list_loras`), the trigger words from each file."""
    from .merge.job import file_trigger_words

    return [
        {"name": k, "file": os.fspath(v), "trigger_words": file_trigger_words(v)} for k, v in found.items()
    ]


__all__ = [
    "LORA_SUFFIXES",
    "LoraNotFoundError",
    "find_lora",
    "inspect_names",
    "inspect_request",
    "list_folders",
    "list_loras",
    "lora_listing",
    "read_lora_cached",
]
