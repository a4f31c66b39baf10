"""LoRA files by name: the built-in Lora extension's registry first, else a scan of the LoRA folder.

Names resolve like ``<lora:NAME>``: the file stem, or the alias (``ss_output_name``) the built-in
extension knows. The folder is ``shared.cmd_opts.lora_dir`` (added by the built-in Lora's preload; read
lazily, it may be missing in stripped-down installs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lib_loraclr.errors import LoraclrError

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".pth")


class LoraNotFoundError(LoraclrError, LookupError):
    """No LoRA file of that name."""


def lora_dir(shared: Any) -> Path | None:
    d = getattr(getattr(shared, "cmd_opts", None), "lora_dir", None)
    return Path(d) if d else None


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


def _builtin_lookup(name: str) -> Path | None:
    """The built-in Lora extension's ``networks`` module (A1111 and Forge use that name), when loaded."""
    networks = sys.modules.get("networks")
    if networks is None:
        return None
    for table in ("available_networks", "available_network_aliases"):
        entry = getattr(networks, table, {}).get(name)
        filename = getattr(entry, "filename", None)
        if filename:
            return Path(filename)
    return None


def find_lora(name: str, folder: Path | None) -> Path:
    """Path of the LoRA called ``name``; raises `LoraNotFoundError` with what was searched."""
    name = name.strip()
    hit = _builtin_lookup(name)
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
