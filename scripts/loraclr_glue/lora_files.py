"""LoRA files by name: the built-in Lora extension's registry first, else the LoRA folder
(`lib_loraclr.lora_folder`). The folder is ``shared.cmd_opts.lora_dir`` (added by the built-in Lora's
preload; read lazily, it may be missing in stripped-down installs). `run_merge`: the merge of the tab and
the REST route with this lookup."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lib_loraclr import folder_merge, lora_folder
from lib_loraclr.lora_folder import LoraNotFoundError, list_loras
from lib_loraclr.merge.request import MergeRequest

__all__ = ["LoraNotFoundError", "builtin_lookup", "find_lora", "list_loras", "lora_dir", "run_merge"]


def lora_dir(shared: Any) -> Path | None:
    d = getattr(getattr(shared, "cmd_opts", None), "lora_dir", None)
    return Path(d) if d else None


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
