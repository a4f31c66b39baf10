"""LoRA files by name: the built-in Lora extension's registry first, else the LoRA folder
(`lib_loraclr.lora_folder`). The folder is ``shared.cmd_opts.lora_dir`` (added by the built-in Lora's
preload; read lazily, it may be missing in stripped-down installs); Forge Neo also scans its repeatable
``--lora-dirs`` (`extra_lora_dirs`, listed by `list_host_loras`). `run_merge`: the merge of the tab and the
REST route with this lookup."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lib_loraclr import folder_merge, lora_folder
from lib_loraclr.lora_folder import LoraNotFoundError, list_loras
from lib_loraclr.merge.request import MergeRequest

__all__ = [
    "LoraNotFoundError",
    "builtin_lookup",
    "extra_lora_dirs",
    "find_lora",
    "list_host_loras",
    "list_loras",
    "lora_dir",
    "run_merge",
]


def lora_dir(shared: Any) -> Path | None:
    d = getattr(getattr(shared, "cmd_opts", None), "lora_dir", None)
    return Path(d) if d else None


def extra_lora_dirs(shared: Any) -> list[Path]:
    """Forge Neo's ``--lora-dirs`` (repeatable): folders its Lora extension scans besides ``--lora-dir``."""
    dirs = getattr(getattr(shared, "cmd_opts", None), "lora_dirs", None) or []
    return [Path(d) for d in dirs if d]


def list_host_loras(shared: Any, search: str = "") -> dict[str, Path]:
    """`lib_loraclr.lora_folder.list_folders` over ``--lora-dir`` and `extra_lora_dirs`."""
    return lora_folder.list_folders([lora_dir(shared), *extra_lora_dirs(shared)], search)


def builtin_lookup(name: str) -> Path | None:
    """The file the built-in Lora extension's ``networks`` module (A1111 and Forge use that name) knows under
    ``name`` or as an alias, when that module is loaded."""
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
    """Path of the LoRA called ``name`` (the built-in registry, else ``folder``); `LoraNotFoundError` if none."""
    return lora_folder.find_lora(name, folder, builtin_lookup)


def run_merge(req: MergeRequest, **kwargs: Any) -> dict[str, Any]:
    """`lib_loraclr.folder_merge.run_merge` (same keyword arguments) with the WebUI's LoRA lookup."""
    return folder_merge.run_merge(req, find_lora=find_lora, **kwargs)
