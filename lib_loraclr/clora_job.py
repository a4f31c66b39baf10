"""One generation's CLoRA job before any model is touched: prompt bindings → LoRA files → engine-ready
concepts, the user-facing error texts, and the door check of an API request (the same checks).

The WebUI glue (`scripts/loraclr_glue/clora_run.py`) extends `CloraJob` with the host adapter's install and
removal; here nothing reads a host object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import clora_args as ca
from .errors import LoraclrError
from .lora_folder import LoraNotFoundError, find_lora, read_lora_cached
from .prompt_syntax import ParsedPrompt

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
class CloraJob:
    """The CLoRA part of one generation: the arguments, the parsed prompts, the bound LoRAs, the notices."""

    args: ca.CloraArgs
    lora_folder: Path | None = None
    notices: list[str] = field(default_factory=list)
    parsed: dict[str, ParsedPrompt] = field(default_factory=dict)
    network_params: list[Any] = field(default_factory=list)
    infotext: dict[str, Any] | None = None  # the generation's infotext dict, where notices go
    mask_images: list[Any] = field(default_factory=list)  # mask previews for the result gallery

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


__all__ = ["CloraJob", "CloraUserError", "ConceptSpec", "check_request", "is_user_error", "user_message"]
