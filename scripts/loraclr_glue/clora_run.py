"""One generation with CLoRA: prompt bindings → LoRA files → branches → a host adapter; hook bookkeeping.

Lifecycle (driven by ``scripts/loraclr_script.py``):

- ``process``: `CloraRun.prepare` parses every distinct prompt of the job (syntax errors surface here,
  before any sampling), finds and reads the LoRA files, resolves trigger words;
- the ``clora`` extra network hands the tag params per batch (`CloraRun.on_network_params`);
- ``process_before_every_sampling`` (A1111 ≥ 1.10, Forge) or the first ``on_cfg_denoiser`` call
  (A1111 1.8/1.9): `CloraRun.install` builds the branches for the current batch and installs the
  host adapter (a wrapper on the per-run sampler object: nothing global);
- ``postprocess`` / errors / ``on_script_unloaded``: `CloraRun.remove`, `remove_all`.

Pass behaviour (documented choice): the first pass runs full CLoRA; the hires-fix pass runs masks only
(no latent update: the layout is fixed by then, the masks keep each LoRA in its region); ADetailer's
inner inpaint passes (``p._ad_inner``) run without CLoRA, since a face crop has no concept layout.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_loraclr import clora_job
from lib_loraclr.clora_job import LOG_PREFIX, CloraJob
from lib_loraclr.prompt_syntax import RE_AND

from .lora_files import find_lora


@dataclass
class CloraRun(CloraJob):
    """CLoRA state of one processing object ``p`` (see the module docstring): a `CloraJob` whose LoRAs are
    found the WebUI's way, installed on the host through an adapter."""

    adapter: Any = None
    installed_on: Any = None
    denoiser: Any = None
    error: str | None = None

    def find_lora(self, name: str) -> Path:
        return find_lora(name, self.lora_folder)

    def install(self, adapter: Any, p: Any, prompt: str, *, masks_only: bool = False) -> None:
        """Build this batch's branches and install ``adapter`` on ``p`` (removes a previous install)."""
        self.remove()
        parsed, specs = self.concepts_for(prompt)
        if not specs:
            return
        base = RE_AND.split(parsed.prompt)[0].strip() if RE_AND.search(parsed.prompt) else parsed.prompt
        if base != parsed.prompt:
            self.notice("CLoRA uses the first AND part of the prompt for its branches")
        self.adapter = adapter
        self.installed_on = p
        try:
            self.denoiser = adapter.install(p, self, base, specs, masks_only=masks_only)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        adapter, p = self.adapter, self.installed_on
        self.adapter = self.installed_on = None
        if adapter is not None:
            adapter.remove(p)

    @property
    def installed(self) -> bool:
        return self.adapter is not None


def check_request(body: Mapping[str, Any], lora_folder: Path | None) -> tuple[str, str] | None:
    """`lib_loraclr.clora_job.check_request` with the WebUI's LoRA lookup (for `api_guard`)."""
    return clora_job.check_request(body, lora_folder, CloraRun)


# ------------------------------------------------------------------------------------------ registry

_lock = threading.Lock()
_active: dict[int, tuple[weakref.ReferenceType[Any] | None, CloraRun]] = {}


def register(p: Any, run: CloraRun) -> None:
    try:
        ref: weakref.ReferenceType[Any] | None = weakref.ref(p)
    except TypeError:
        ref = None
    with _lock:
        _active[id(p)] = (ref, run)


def get(p: Any) -> CloraRun | None:
    with _lock:
        entry = _active.get(id(p))
    if entry is None:
        return None
    ref, run = entry
    if ref is not None and ref() is not p:
        return None
    return run


def finish(p: Any) -> CloraRun | None:
    """Remove the run of ``p`` (hooks included) and forget it."""
    with _lock:
        entry = _active.pop(id(p), None)
    if entry is None:
        return None
    entry[1].remove()
    return entry[1]


def remove_all() -> int:
    """Remove every run's hooks (errors, script unload, a new job). Returns how many runs there were."""
    with _lock:
        entries = list(_active.values())
        _active.clear()
    for _ref, run in entries:
        try:
            run.remove()
        except Exception as e:  # keep removing the others
            print(f"{LOG_PREFIX} could not remove CLoRA hooks: {e}")
    return len(entries)


def active_count() -> int:
    with _lock:
        return len(_active)
