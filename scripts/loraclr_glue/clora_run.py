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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_loraclr import clora_args as ca
from lib_loraclr.errors import LoraclrError
from lib_loraclr.prompt_syntax import RE_AND, ParsedPrompt

from . import engine
from .lora_files import LoraNotFoundError, find_lora

LOG_PREFIX = "[sd-webui-loraclr]"


class CloraUserError(LoraclrError, ValueError):
    """A problem the user can fix (bad syntax, unknown LoRA, missing trigger words); message only."""


def user_message(e: BaseException) -> str:
    """The text shown to the user for an error: the message (with caret lines), never a stack trace."""
    if is_user_error(e):
        return str(e)
    return (
        f"internal error {type(e).__name__}: {e} (a bug in sd-webui-loraclr; the traceback is in the console)"
    )


def is_user_error(e: BaseException) -> bool:
    """True for an error the user can fix (a `LoraclrError` or an unknown LoRA name); others are bugs."""
    return isinstance(e, LoraclrError)


def check_request(body: Mapping[str, Any], lora_folder: Path | None) -> tuple[str, str] | None:
    """The first user error in the CLoRA part of a txt2img / img2img API body, as ``(class name, message)``,
    or None: the checks `CloraScriptLogic.process` runs (arguments, prompt syntax, LoRA files, trigger words),
    before the request is queued (`api_guard`). A bug in a check is left to the script, which reports it."""
    scripts = body.get("alwayson_scripts") or {}
    entry = None
    if isinstance(scripts, Mapping):
        entry = next((v for k, v in scripts.items() if str(k).strip().lower() == "clora"), None)
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str) or (entry is None and "<clora:" not in prompt.lower()):
        return None
    args = entry.get("args", []) if isinstance(entry, Mapping) else []
    try:
        cargs = ca.from_script_args(args if isinstance(args, (list, tuple)) else [args])
        if ca.is_active(cargs, prompt):
            CloraRun(args=cargs, lora_folder=lora_folder).prepare([prompt])
    except Exception as e:
        return (type(e).__name__, str(e)) if is_user_error(e) else None
    return None


@dataclass
class ConceptSpec:
    """One bound LoRA of the current batch, ready for the engine."""

    name: str
    path: Path
    deltas: Any
    te_weight: float
    unet_weight: float
    words: str
    trigger: str


@dataclass
class CloraRun:
    """CLoRA state of one processing object ``p`` (see the module docstring)."""

    args: ca.CloraArgs
    lora_folder: Path | None = None
    notices: list[str] = field(default_factory=list)
    parsed: dict[str, ParsedPrompt] = field(default_factory=dict)
    network_params: list[Any] = field(default_factory=list)
    adapter: Any = None
    installed_on: Any = None
    denoiser: Any = None
    error: str | None = None
    infotext: dict[str, Any] | None = None  # p.extra_generation_params, where notices go
    mask_images: list[Any] = field(default_factory=list)  # mask previews for the result gallery

    # ------------------------------------------------------------------ preparation (no model access)
    def prepare(self, prompts: Sequence[str]) -> None:
        """Parse every distinct prompt; find, read and check the LoRAs. Raises PromptSyntaxError,
        CloraUserError, lib_loraclr errors (all with user-facing messages)."""
        for prompt in dict.fromkeys(prompts):
            parsed = ca.resolve(self.args, prompt)
            for b in parsed.bindings:
                if b.subprompt > 0:
                    raise CloraUserError(
                        f"CLoRA binds only in the first AND part of the prompt; {b.lora!r} is bound to "
                        f"{b.words!r} in part {b.subprompt + 1}"
                    )
            self.parsed[prompt] = parsed
        self._specs: dict[str, ConceptSpec] = {}
        for parsed in self.parsed.values():
            for b in parsed.bindings:
                if b.lora in self._specs:
                    continue
                try:
                    path = find_lora(b.lora, self.lora_folder)
                except LoraNotFoundError as e:
                    raise CloraUserError(str(e)) from None
                deltas = engine.read_lora(path)
                trigger = b.trigger
                if not trigger:
                    words = engine.trigger_words(path)
                    if not words:
                        raise CloraUserError(
                            f"LoRA {b.lora!r} has no trigger words in its metadata; give them in the tag "
                            f"(<clora:{b.lora}:trigger=WORDS>) or the table's trigger column"
                        )
                    trigger = words[0]
                self._specs[b.lora] = ConceptSpec(
                    b.lora, path, deltas, b.te_weight, b.unet_weight, b.words, trigger
                )

    def concepts_for(self, prompt: str) -> tuple[ParsedPrompt, list[ConceptSpec]]:
        """Bindings of one (original, tag-carrying) prompt as engine-ready specs, in binding order."""
        parsed = self.parsed.get(prompt)
        if parsed is None:
            parsed = ca.resolve(self.args, prompt)
        specs = []
        for b in parsed.bindings:
            s = self._specs[b.lora]
            specs.append(
                ConceptSpec(
                    s.name, s.path, s.deltas, b.te_weight, b.unet_weight, b.words, b.trigger or s.trigger
                )
            )
        return parsed, specs

    def notice(self, text: str) -> None:
        """A visible notice: console once, and the infotext key ``CLoRA notice``."""
        if text not in self.notices:
            self.notices.append(text)
            print(f"{LOG_PREFIX} {text}")
        if self.infotext is not None:
            self.infotext[ca.INFOTEXT_NOTICE_KEY] = "; ".join(self.notices)

    def on_network_params(self, params_list: Sequence[Any]) -> None:
        """The ``clora`` extra network's params for the current batch (tags of its first prompt)."""
        self.network_params = list(params_list)

    # ------------------------------------------------------------------ install / remove
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
