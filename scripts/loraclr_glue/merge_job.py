"""The WebUI's merge (tab and ``POST /loraclr/v1/merge``): `lib_loraclr.folder_merge.run_merge` with the LoRAs
found by name the WebUI's way (`lora_files.find_lora`: the built-in Lora's registry, then the folder)."""

from __future__ import annotations

from typing import Any

from lib_loraclr import folder_merge
from lib_loraclr.merge.request import MergeRequest, MergeRequestError, validate_request

from .lora_files import find_lora

__all__ = ["MergeRequestError", "run_merge", "validate_request"]


def run_merge(req: MergeRequest, **kwargs: Any) -> dict[str, Any]:
    """`lib_loraclr.folder_merge.run_merge` (same keyword arguments) with the WebUI's LoRA lookup."""
    return folder_merge.run_merge(req, find_lora=find_lora, **kwargs)
