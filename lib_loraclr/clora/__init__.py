"""CLoRA engine: compose several LoRAs at sampling time (Meral et al., ICCV 2025), as a pure library.

- `routing`    — `RoutedLoras`: per-branch LoRA forward hooks with per-row routing (one batched UNet call).
- `attention`  — `AttentionCapture`: cross-attention probabilities at the lowest-resolution layers only.
- `tokens`     — `Concept`, `branch_prompts`: branch prompts, token groups and mask tokens.
- `loss`       — `nt_xent`, `clora_loss`: NT-Xent (pytorch-metric-learning semantics) on min–max maps.
- `masks`      — `concept_masks`, `fusion_weights`, `fuse`.
- `options`    — `CloraOptions` (paper / recommended schedules).
- `denoiser`   — `CloraDenoiser`: the CLoRA step as a k-diffusion denoiser wrapper (``predict``: per CFG half).
- `step`       — `clora_call`: the CLoRA step inside a host's own batched model call (both WebUI adapters:
                 A1111's CFG rows `CfgStep`, Forge's chunks `chunk_roles`).
- `autograd`   — `freeze_parameters`, `InferenceWeightClones`, `inference_mode_grad`: the update's gradient
                 pass through a host's model (A1111's trainable weights, Forge's inference tensors).
- `builder`    — `build_clora_denoiser`: prompts + concepts + LoRAs → a ready `CloraDenoiser`.
- `host_calls` — `CfgModelCall` (A1111), `ForgeUnetCall` (Forge), `concept_denoiser`: the step in each
                 WebUI's own call protocol; the glue only installs them on the host's objects.
- `official`   — `OfficialCloraLoop`: faithful per-branch re-implementation of the official loop (benchmarks).
"""

from .attention import AttentionCapture, count_hooks, efficient_attention, lowest_resolution_layers
from .builder import build_clora_denoiser
from .denoiser import CloraDenoiser
from .errors import CaptureError, CloraError, ConceptNotFoundError, ConditioningMismatchError, RoutingError
from .loss import clora_loss, nt_xent
from .masks import concept_masks, fuse, fusion_weights
from .options import CloraOptions
from .routing import (
    UNET_PREFIX,
    CompositeRouter,
    RoutedLoras,
    has_te_parts,
    routable_te_key,
    te_branch_conds,
    te_key,
)
from .step import OTHER, CfgStep, chunk_roles, clora_call
from .tokens import BranchPrompts, Concept, branch_prompts

__all__ = [
    "OTHER",
    "UNET_PREFIX",
    "AttentionCapture",
    "BranchPrompts",
    "CaptureError",
    "CfgStep",
    "CloraDenoiser",
    "CloraError",
    "CloraOptions",
    "CompositeRouter",
    "Concept",
    "ConceptNotFoundError",
    "ConditioningMismatchError",
    "RoutedLoras",
    "RoutingError",
    "branch_prompts",
    "build_clora_denoiser",
    "chunk_roles",
    "clora_call",
    "clora_loss",
    "concept_masks",
    "count_hooks",
    "efficient_attention",
    "fuse",
    "fusion_weights",
    "has_te_parts",
    "lowest_resolution_layers",
    "nt_xent",
    "routable_te_key",
    "te_branch_conds",
    "te_key",
]
