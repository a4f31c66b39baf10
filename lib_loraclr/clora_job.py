"""One generation's CLoRA job: prompt bindings → LoRA files → engine-ready concepts → a host adapter,
the user-facing error texts, the door check of an API request (the same checks), and the registry of the
jobs in progress (one per processing object).

Nothing here imports the host: the processing object ``p`` is read and written by attribute only (prompts,
infotext, conditioning caches); an `Adapter` (``scripts/loraclr_glue/adapters.py``) installs the engine on the
host and removes it; the WebUI glue (``clora_run.py``) adds the WebUI's LoRA lookup.
"""

from __future__ import annotations

import threading
import traceback
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import clora_args as ca
from .errors import LoraclrError
from .lora_folder import LoraNotFoundError, find_lora, read_lora_cached
from .prompt_syntax import RE_AND, ParsedPrompt

LOG_PREFIX = "[sd-webui-loraclr]"


class CloraUserError(LoraclrError, ValueError):
    """A problem the user can fix (bad syntax, unknown LoRA, missing trigger words); message only."""


def is_user_error(e: BaseException) -> bool:
    """True for an error the user can fix (a `LoraclrError`, an unknown LoRA name included); others are bugs."""
    return isinstance(e, LoraclrError)


def user_message(e: BaseException) -> str:
    """The text shown to the user for an error: the message (with caret lines), never a stack trace."""
    if is_user_error(e):
        return str(e)
    return (
        f"internal error {type(e).__name__}: {e} (a bug in sd-webui-loraclr; the traceback is in the console)"
    )


INFOTEXT_ERROR_KEY = "CLoRA error"


def fail(p: Any, e: BaseException, what: str = "CLoRA is off for this image") -> str:
    """Report an error of a CLoRA hook without stopping the generation: ``[sd-webui-loraclr] …`` with the
    user message in the console (and the traceback for a bug), ``CLoRA error`` in ``p``'s infotext."""
    msg = user_message(e)
    print(f"{LOG_PREFIX} {what}:\n{msg}")
    if not is_user_error(e):  # a bug: the stack goes to the console for the report
        traceback.print_exception(type(e), e, e.__traceback__)
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        params[INFOTEXT_ERROR_KEY] = msg.splitlines()[0] if msg else type(e).__name__
    return msg


def batch_prompt(p: Any) -> str:
    """The original (tag-carrying) first prompt of a processing object's current batch."""
    prompts = list(getattr(p, "all_prompts", None) or [getattr(p, "prompt", "")])
    i = int(getattr(p, "iteration", 0) or 0) * int(getattr(p, "batch_size", 1) or 1)
    return prompts[min(i, len(prompts) - 1)] if prompts else ""


def invalidate_cond_cache(p: Any) -> None:
    """Give ``p`` fresh conditioning caches (A1111 shares them class-wide between runs), so nothing a
    CLoRA run encodes can be served to, or from, another run. Each keeps the host's length: A1111's
    ``[params, conds]``, Forge Neo's ``[params, conds, extra infotext params]``."""
    for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
        if hasattr(p, name):
            old = getattr(p, name)
            setattr(p, name, [None] * max(2, len(old) if isinstance(old, list) else 0))


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


class Adapter(Protocol):
    """Where a host runs the CLoRA engine: ``install`` builds it on the processing object ``p`` for the
    batch's base prompt and bound concepts and returns it; ``remove`` undoes everything ``install`` did."""

    def install(
        self, p: Any, run: Any, base: str, specs: Sequence[ConceptSpec], *, masks_only: bool
    ) -> Any: ...

    def remove(self, p: Any) -> None: ...


@dataclass
class CloraJob:
    """The CLoRA part of one generation: the arguments, the parsed prompts, the bound LoRAs, the notices."""

    args: ca.CloraArgs
    lora_folder: Path | None = None
    notices: list[str] = field(default_factory=list)
    parsed: dict[str, ParsedPrompt] = field(default_factory=dict)
    network_params: list[Any] = field(default_factory=list)
    infotext: dict[str, Any] | None = None  # the generation's infotext dict, where notices go
    mask_images: list[Any] = field(default_factory=list)  # mask previews for the result gallery
    adapter: Adapter | None = None  # installed on ``installed_on`` (a processing object)
    installed_on: Any = None
    denoiser: Any = None  # what the adapter installed (a `CloraDenoiser` or `RegionalDenoiser`)

    def find_lora(self, name: str) -> Path:
        """The file of the LoRA called ``name`` (a host adds its own registry)."""
        return find_lora(name, self.lora_folder)

    def prepare(self, prompts: Sequence[str]) -> None:
        """Parse every distinct prompt; find, read and check the LoRAs. Raises PromptSyntaxError,
        CloraUserError, lib_loraclr errors (all with user-facing messages)."""
        from .merge.job import file_trigger_words

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
                    path = self.find_lora(b.lora)
                except LoraNotFoundError as e:
                    raise CloraUserError(str(e)) from None
                deltas = read_lora_cached(path)
                trigger = b.trigger
                if not trigger:
                    words = file_trigger_words(path)
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

    def add_mask_previews(self, images: Any, infotexts: Any) -> int:
        """Append the kept mask previews to a result's ``images`` (gallery and API), each with the first
        image's infotext; returns how many (none unless both are lists)."""
        previews, self.mask_images = self.mask_images, []
        if not previews or not isinstance(images, list):
            return 0
        images.extend(previews)
        if isinstance(infotexts, list) and infotexts:
            infotexts.extend([infotexts[0]] * len(previews))
        return len(previews)

    # ------------------------------------------------------------------ the host adapter
    def install(self, adapter: Adapter, p: Any, prompt: str, *, masks_only: bool = False) -> None:
        """Build this batch's branches for ``prompt`` (original, tag-carrying) and install ``adapter`` on ``p``
        (a previous install is removed first); nothing is installed for a prompt without bound concepts."""
        self.remove()
        parsed, specs = self.concepts_for(prompt)
        if not specs:
            return
        base = RE_AND.split(parsed.prompt)[0].strip() if RE_AND.search(parsed.prompt) else parsed.prompt
        if base != parsed.prompt:
            self.notice("CLoRA uses the first AND part of the prompt for its branches")
        self.adapter, self.installed_on = adapter, p
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


class JobRegistry:
    """The CLoRA jobs in progress, one per processing object (held weakly where it can be), thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[int, tuple[weakref.ReferenceType[Any] | None, CloraJob]] = {}

    def register(self, p: Any, job: CloraJob) -> None:
        try:
            ref: weakref.ReferenceType[Any] | None = weakref.ref(p)
        except TypeError:
            ref = None
        with self._lock:
            self._active[id(p)] = (ref, job)

    def get(self, p: Any) -> Any:
        with self._lock:
            entry = self._active.get(id(p))
        if entry is None or (entry[0] is not None and entry[0]() is not p):
            return None
        return entry[1]

    def finish(self, p: Any) -> Any:
        """Remove the job of ``p`` (its adapter included) and forget it; returns it (None if none)."""
        with self._lock:
            entry = self._active.pop(id(p), None)
        if entry is None:
            return None
        entry[1].remove()
        return entry[1]

    def remove_all(self) -> int:
        """Remove every job's adapter (errors, script unload). Returns how many jobs there were."""
        with self._lock:
            entries = list(self._active.values())
            self._active.clear()
        for _ref, job in entries:
            try:
                job.remove()
            except Exception as e:  # keep removing the others
                print(f"{LOG_PREFIX} could not remove CLoRA hooks: {e}")
        return len(entries)

    def active_count(self) -> int:
        with self._lock:
            return len(self._active)


def check_request(
    body: Mapping[str, Any], lora_folder: Path | None, job: type[CloraJob] = CloraJob
) -> tuple[str, str] | None:
    """The first user error in the CLoRA part of a txt2img / img2img API body, as ``(class name, message)``,
    or None: the checks a generation runs before sampling (arguments, prompt syntax, LoRA files, trigger
    words), made before the request is queued. A bug in a check is left to the generation, which reports it."""
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
            job(args=cargs, lora_folder=lora_folder).prepare([prompt])
    except Exception as e:
        return (type(e).__name__, str(e)) if is_user_error(e) else None
    return None


__all__ = [
    "Adapter",
    "CloraJob",
    "CloraUserError",
    "ConceptSpec",
    "JobRegistry",
    "check_request",
    "is_user_error",
    "user_message",
]
