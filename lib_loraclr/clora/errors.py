"""Typed errors of the CLoRA engine (messages meant for a WebUI user)."""

from __future__ import annotations

from ..errors import LoraclrError


class CloraError(LoraclrError, ValueError):
    """Base class of every CLoRA input error."""


class RoutingError(CloraError):
    """A LoRA cannot be routed onto the model (unknown module, unsupported key or shape)."""


class CaptureError(CloraError):
    """Attention maps cannot be captured (no cross-attention layer found, shapes disagree)."""


class ConceptNotFoundError(CloraError):
    """A concept's words or trigger words do not occur in the prompt."""


class ConditioningMismatchError(CloraError):
    """Branch conditionings cannot be batched together (different token lengths or batch sizes)."""
