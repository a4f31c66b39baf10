"""What the latent update needs from a host's model to differentiate through it (plain torch).

- `freeze_parameters` / `unfreeze`: the update differentiates only with respect to the latent. A1111's
  weights keep ``requires_grad=True`` and its built-in Lora patches them in place lazily inside the first
  forward of each layer, which autograd refuses on a leaf that requires grad.
- `InferenceWeightClones`, `inference_mode_grad`: Forge loads (and LoRA-patches) its weights under
  ``torch.inference_mode`` and samples there; autograd cannot save inference tensors for backward, so the
  gradient pass leaves inference mode and runs on normal clones of those weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn


def freeze_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Set ``requires_grad=False`` on every parameter of ``module`` that had it; returns those (for `unfreeze`).

    The latent update differentiates only with respect to the latent. A1111's weights keep
    ``requires_grad=True``, and its built-in Lora patches them in place (``weight.copy_`` /
    ``weight +=``) lazily inside the first forward of each layer, which autograd refuses on a leaf that
    requires grad once the forward runs under ``enable_grad`` ("a leaf Variable that requires grad is
    being used in an in-place operation", seen in A1111 1.10.1). Frozen weights also spare autograd
    from tracking ~860 M parameters."""
    frozen = [q for q in module.parameters() if q.requires_grad]
    for q in frozen:
        q.requires_grad_(False)
    return frozen


def unfreeze(params: Sequence[nn.Parameter]) -> None:
    """Undo `freeze_parameters`."""
    for q in params:
        q.requires_grad_(True)


class InferenceWeightClones:
    """While active, every parameter of ``root`` that is an inference tensor (Forge loads and LoRA-patches
    its weights under ``torch.inference_mode``) is replaced, lazily on its module's first forward, by a
    normal clone, so that autograd can save it for backward; on exit the original ``Parameter`` objects
    are put back (never written: bit-for-bit the same). Only the modules the gradient pass runs are
    cloned (with `StopForward`: the down path up to the capture layers).

    Also gives every ``LayerNorm`` a cloned input: Forge's transformer block adds in place
    (``x += attn1(norm1(x))``) to the tensor its norm saved for backward, which autograd refuses."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._saved: list[tuple[nn.Module, str, Any]] = []
        self._handles: list[Any] = []
        self.n_cloned = 0

    def _swap(self, module: nn.Module, _inputs: Any) -> None:
        for name, prm in list(module._parameters.items()):
            if prm is not None and torch.is_inference(prm):
                module._parameters[name] = nn.Parameter(prm.detach().clone(), requires_grad=False)
                self._saved.append((module, name, prm))
                self.n_cloned += prm.numel()

    @staticmethod
    def _clone_inputs(_module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.clone() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in inputs)

    def __enter__(self) -> InferenceWeightClones:
        try:
            for m in self.root.modules():
                if isinstance(m, nn.LayerNorm):
                    self._handles.append(m.register_forward_pre_hook(self._clone_inputs))
                if any(p is not None and torch.is_inference(p) for p in m._parameters.values()):
                    self._handles.append(m.register_forward_pre_hook(self._swap))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, name, prm in reversed(self._saved):
            module._parameters[name] = prm
        self._saved.clear()


@contextlib.contextmanager
def inference_mode_grad(root: nn.Module) -> Iterator[None]:
    """Autograd for a gradient pass through ``root`` while the host samples under ``torch.inference_mode``:
    inference mode off, gradients on, `InferenceWeightClones` on ``root`` (a `CloraDenoiser` ``update_scope``;
    the denoiser clones its inputs inside it)."""
    with torch.inference_mode(False), torch.enable_grad(), InferenceWeightClones(root):
        yield


__all__ = ["InferenceWeightClones", "freeze_parameters", "inference_mode_grad", "unfreeze"]
