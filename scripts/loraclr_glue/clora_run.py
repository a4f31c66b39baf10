"""One generation with CLoRA (`lib_loraclr.clora_job.CloraJob` with the WebUI's LoRA lookup) and the jobs
in progress.

Lifecycle (driven by ``scripts/loraclr_script.py`` through `script_logic`): ``process`` prepares the run
(`CloraJob.prepare`: syntax errors surface before any sampling); the ``clora`` extra network hands the tag
params per batch; ``process_before_every_sampling`` (A1111 ≥ 1.10, Forge) or the first ``on_cfg_denoiser``
call (A1111 1.8/1.9) installs a host adapter (`CloraJob.install`); ``postprocess``, errors and
``on_script_unloaded`` remove it. The hires-fix pass runs masks only; ADetailer's inner inpaint passes run
without CLoRA (a face crop has no concept layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib_loraclr import clora_job
from lib_loraclr.clora_job import CloraJob, JobRegistry

from .lora_files import find_lora


class CloraRun(CloraJob):
    """A `CloraJob` whose LoRAs are found the WebUI's way (the built-in Lora's registry, then the folder)."""

    def find_lora(self, name: str) -> Path:
        return find_lora(name, self.lora_folder)


def check_request(body: Mapping[str, Any], lora_folder: Path | None) -> tuple[str, str] | None:
    """`lib_loraclr.clora_job.check_request` with the WebUI's LoRA lookup (for `api_guard`)."""
    return clora_job.check_request(body, lora_folder, CloraRun)


_RUNS = JobRegistry()
register, get, finish, remove_all, active_count = (
    _RUNS.register,
    _RUNS.get,
    _RUNS.finish,
    _RUNS.remove_all,
    _RUNS.active_count,
)
