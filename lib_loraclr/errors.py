"""Typed errors of lib_loraclr, with messages a WebUI user can act on.

Every error names the file (and, where it applies, the tensor key) and says what to do. The WebUI
glue catches :class:`LoraclrError` and shows ``str(error)`` to the user.
"""

from __future__ import annotations

from collections.abc import Sequence


class LoraclrError(Exception):
    """Base class of every error this library raises on purpose."""


class LoraFormatError(LoraclrError):
    """The file is not a LoRA we can read (empty, truncated, corrupt, unsupported type, no known keys)."""


class UnsafeFileError(LoraclrError):
    """The file would need pickle code execution to load (a pickle renamed to .safetensors, a .pt with code)."""


class ArchitectureMismatchError(LoraclrError):
    """A LoRA made for one base model family (SD1 / SD2 / SDXL) used with another."""


class UnmappedKeysError(LoraclrError):
    """Some LoRA keys have no module in the target model (strict mode)."""

    def __init__(self, message: str, keys: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.keys = list(keys)


class OutputExistsError(LoraclrError):
    """The output file exists and overwriting was not asked for."""


class BadOutputNameError(LoraclrError):
    """The output name is empty, has path separators, ``..``, reserved characters, or leaves the folder."""


class NonFiniteWeightsError(LoraclrError):
    """A tensor holds NaN or Inf values."""


class ShapeMismatchError(LoraclrError):
    """Tensor shapes disagree: lora_up vs lora_down rank, or a delta vs the model's weight."""


class InputFileError(LoraclrError):
    """An input path cannot be used: missing, a folder, not a regular file, or not readable."""


class OutputNotWritableError(LoraclrError):
    """The output folder cannot be written (no permission, read-only, not a folder)."""


class ValueRangeError(LoraclrError, ValueError):
    """A number is outside its sane range: a LoRA's rank, alpha or weights, a merge or CLoRA weight, an option."""


class ServiceError(Exception):
    """An HTTP error of a WebUI route: ``status``, the user-facing ``message`` and the error class name
    ``kind`` (not a `LoraclrError`: it is the answer to a request, made from one)."""

    def __init__(self, status: int, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def short_list(items: Sequence[str], limit: int = 8) -> str:
    """``"a, b, c (and 12 more)"`` for error messages."""
    items = list(items)
    head = ", ".join(items[:limit])
    return head if len(items) <= limit else f"{head} (and {len(items) - limit} more)"
