"""The merge pipeline: concept LoRAs + a base model → one merged set of weight deltas and a report.

Stages (LoRACLR's official order, methods.md §1.4):
1. text-encoder layers: inputs hooked while encoding each concept's prompts with that concept's TE LoRA
   active (all positions up to the end token);
2. cross-attention ``attn2.to_k`` / ``attn2.to_v``: inputs = the MERGED text encoder's hidden states
   (encoded the way the WebUI encodes: chunks, clip skip) at the trigger tokens and the end token
   (official) or at every position of the concept prompt (recommended); targets analytic;
3. every other LoRA'd UNet layer: inputs hooked during a short seeded sampling run per concept
   ("photo of a {trigger}", no CFG), with the merged TE and K/V and concept i's other UNet LoRA active.
Each layer is solved independently from the base weight (``merge_layer``). With ``MergeConfig.sequential``
(the recommended default) the same stages run in depth order on inputs recorded from the partially merged
model, paired with the concept's own-LoRA inputs (``merge/sequential.py``, ``PairedStats``). Features are accumulated as
bounded-memory sufficient statistics (``FeatureStats``): memory does not grow with steps or resolution.
Spatial layers are grouped into passes under a memory budget; k×k convolutions (k > 1, LoCon) have no
row form and fall back to the linear merge (reported).

Memory (``docs/DESIGN.md`` "Merge base from an SDXL checkpoint"): the concepts' ΔW stay the LoRAs' low-rank
modules; every pass reaches the model through `lib_loraclr.apply.hooked` (a layer's ``W0 + ΔW`` exists only
while that layer runs; the base is never copied, a fp16 base stays fp16); a layer's dense ΔW is formed only
while it is solved. The solved ΔW is kept exact while later passes run through it, then (with
``MergeConfig.lowrank_output``) at the saved file's rank.

The model is duck-typed (a ``SD1Model``, or the WebUI's model with the same attributes): module paths
are the canonical keys; ``prompt_encoder`` (``lib_loraclr.text.PromptEncoder``) tokenises;
``get_learned_conditioning(prompts)``, ``apply_model``, ``alphas_cumprod`` drive sampling.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lib_loraclr.apply import hooked, split_fused_key, target_weight
from lib_loraclr.deltas import DeltaSet, LoraModule, is_unet_key
from lib_loraclr.errors import ArchitectureMismatchError, LoraclrError
from lib_loraclr.merge.solvers import METHODS, LoraclrParams, layer_fidelity, merge_layer
from lib_loraclr.merge.stats import ConceptStats, FeatureStats, PairedStats, rows_from_conv_input
from lib_loraclr.models.half import to_float32

Progress = Callable[[str, int, int], None]  # (stage description, done, total)


class MergeInputError(LoraclrError):
    """The merge request itself is wrong (nothing to merge, missing trigger, bad option…)."""


@dataclass
class Concept:
    """One concept LoRA to merge.

    prompts: extra prompts (each must contain the trigger words); the templates are always used.
    te_weight / unet_weight: multipliers applied to the LoRA's text-encoder / UNet deltas.
    """

    deltas: DeltaSet
    trigger: str
    name: str = ""
    te_weight: float = 1.0
    unet_weight: float = 1.0
    prompts: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name or self.trigger


@dataclass
class MergeConfig:
    """Options of one merge. ``preset`` applies to ``method="loraclr"`` and to the feature recipe."""

    method: str = "loraclr"
    preset: str = "recommended"  # recommended | official
    templates: tuple[str, ...] = ("photo of a {}", "{}")
    neutral_prompts: tuple[str, ...] = ("a photo", "a picture of something")
    sample_steps: int = 20
    sampler: str = "dpmpp_2m"
    seed: int = 0
    shape: tuple[int, int, int] | None = None  # latent [C, H, W]; None = model.latent_shape
    # feature runs of the other UNet layers: which of a concept's prompts are sampled ("first" = the official
    # run, "all" = every template and extra prompt), how many seeded images per prompt, and an optional
    # prompt → latent shape function (e.g. wider canvases for multi-subject prompts) overriding ``shape``
    sample_prompts: str | None = None  # None = by preset: official "first", recommended "all"
    # what the ridge and the neutral prompts pull ΔW toward: "zero" (the base), "mean" (the concepts' mean
    # ΔW), "mean-unet" ("mean" on UNet layers, "zero" on the text encoder); None = by preset: official
    # "zero", recommended "mean-unet" (why: docs/DESIGN.md "Merge recipe")
    prior: str | None = None
    sample_images: int = 1
    shape_for: Callable[[str], tuple[int, int, int]] | None = None
    ridge: float = 1e-2  # of lsq / recommended loraclr, relative to the mean Gram eigenvalue (DESIGN.md)
    svd_rank: int = 64  # for method="svd"
    sketch_rows: int = 512
    # K/V rows: "trigger" (official: trigger tokens + end token) | "prompt" (every position up to the end token)
    # | "all" (every position of the context, padding included: the UNet attends to all of them; the text encoder's
    # layers are then fitted on every position too); None = by preset
    kv_rows: str | None = None
    preserve_base: bool | None = None  # add neutral prompts as a zero-delta concept; None = by preset
    max_stats_bytes: int = 4 << 30  # budget of one sampling pass's statistics
    report_features: bool = False  # collect features for the report even for linear / svd
    # solve layers in depth order, each on inputs recorded from the partially merged model (lsq / loraclr);
    # None = by preset: official off, recommended on (docs/DESIGN.md "Sequential solving")
    sequential: bool | None = None
    sequential_ridge: float = 1e-2  # shrinkage of the drift correction (relative to the mean Gram eigenvalue)
    loraclr_overrides: dict[str, Any] = field(
        default_factory=dict
    )  # LoraclrParams fields, e.g. {"iters": 20}
    # optional output-level refinement after the solve (lsq / loraclr; ``merge/distill.py``): Adam steps
    # distilling the single-LoRA teachers' noise predictions into the merged ΔW. 0 = off; None = by preset and
    # device (`effective_distill_steps`): the recommended LoRACLR merge refines when its model runs on a GPU
    # (`GPU_REFINEMENT_STEPS`), not on the CPU, where each step's forward + backward of the whole model is
    # slow (docs/DESIGN.md "Merge recipe", "Refinement by default on a GPU")
    distill_steps: int | None = None
    distill_overrides: dict[str, Any] = field(default_factory=dict)  # DistillParams fields, e.g. {"lr": 0.01}
    # the result as the saved LoRA will hold it: ``(rank cap or None, max relative SVD error)`` per module
    # (`writers.to_low_rank`, the writer's own reduction, so the file's bytes are the same), each layer
    # reduced as soon as no later pass needs its exact ΔW; None = dense ΔW per layer (checkpoint output,
    # callers that use the exact merge). Set by `merge.job.run_job` for LoRA output; not in the report.
    lowrank_output: tuple[int | None, float] | None = None
    # where a merge job runs the model's forward passes and the refinement: "cpu", "cuda", "cuda:N" or "auto"
    # (the first CUDA GPU torch sees, else the CPU; with "auto" a GPU without room for the model gives the CPU);
    # statistics and per-layer solves stay on the CPU (`merge_device`; `merge.job.run_job` moves the model)
    device: str = "auto"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise MergeInputError(f"unknown merge method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.preset not in ("recommended", "official"):
            raise MergeInputError(f"unknown preset {self.preset!r}; choose 'recommended' or 'official'")
        if self.kv_rows not in (None, "trigger", "prompt", "all"):
            raise MergeInputError(f"kv_rows must be 'trigger', 'prompt' or 'all', not {self.kv_rows!r}")
        if self.sample_steps < 1:
            raise MergeInputError("sample_steps must be at least 1")
        if self.sample_prompts not in (None, "first", "all"):
            raise MergeInputError(f"sample_prompts must be 'first' or 'all', not {self.sample_prompts!r}")
        if self.prior not in (None, "zero", "mean", "mean-unet"):
            raise MergeInputError(f"prior must be 'zero', 'mean' or 'mean-unet', not {self.prior!r}")
        if self.sample_images < 1:
            raise MergeInputError("sample_images must be at least 1")
        if self.sequential_ridge < 0:
            raise MergeInputError("sequential_ridge must be >= 0")
        if self.distill_steps is not None and self.distill_steps < 0:
            raise MergeInputError("distill_steps must be >= 0")
        if self.distill_steps or self.distill_overrides:
            self.distill_params()  # unknown or bad refinement options fail before any work
        if not self.templates or any("{}" not in t for t in self.templates):
            raise MergeInputError("every prompt template needs a '{}' for the trigger words")
        merge_device(self.device)

    @property
    def official(self) -> bool:
        return self.preset == "official"

    def effective_kv_rows(self) -> str:
        return self.kv_rows or ("trigger" if self.official else "prompt")

    def effective_prior(self) -> str:
        return self.prior or ("zero" if self.official else "mean-unet")

    def prior_for(self, key: str) -> str:
        """``"zero"`` or ``"mean"`` for one canonical key (see ``prior``)."""
        p = self.effective_prior()
        if p == "mean-unet":
            return "mean" if layer_group(key) != "te" else "zero"
        return p

    def effective_sample_prompts(self) -> str:
        return self.sample_prompts or ("first" if self.official else "all")

    def effective_sequential(self) -> bool:
        """Whether lsq / loraclr solve layers sequentially (see ``sequential``)."""
        if self.sequential is not None:
            return bool(self.sequential)
        return not self.official

    def effective_distill_steps(self, device: torch.device | str) -> int:
        """Refinement steps of a merge whose model runs on ``device``: ``distill_steps`` when
        given; else `GPU_REFINEMENT_STEPS` for the recommended LoRACLR merge on a CUDA device, 0 otherwise."""
        if self.distill_steps is not None:
            return int(self.distill_steps)
        if self.method != "loraclr" or self.official or torch.device(device).type != "cuda":
            return 0
        return GPU_REFINEMENT_STEPS

    def distill_params(self) -> Any:
        """The `lib_loraclr.merge.distill.DistillParams` of this merge (``distill_steps`` + overrides)."""
        from dataclasses import replace

        from lib_loraclr.merge.distill import DistillParams

        try:
            p = replace(
                DistillParams(steps=self.distill_steps or 0, seed=self.seed), **self.distill_overrides
            )
        except TypeError as e:
            raise MergeInputError(
                f"unknown distill parameter in {sorted(self.distill_overrides)}: {e}"
            ) from None
        p.validate()
        return p

    def effective_preserve_base(self) -> bool:
        return (not self.official) if self.preserve_base is None else self.preserve_base

    def loraclr_params(self) -> LoraclrParams:
        from dataclasses import replace

        if self.official:
            base = LoraclrParams.official()
        else:
            base = replace(LoraclrParams.recommended(), ridge=self.ridge)
        try:
            return replace(base, **self.loraclr_overrides)
        except TypeError as e:
            raise MergeInputError(
                f"unknown LoRACLR parameter in {sorted(self.loraclr_overrides)}: {e}"
            ) from None


#: refinement steps of the recommended merge when its model runs on a GPU (``MergeConfig.distill_steps=None``).
#: Measured in the world (docs/DESIGN.md "Refinement by default on a GPU"): 100 steps keep 1.10–1.14 of the
#: single LoRAs' fidelity at N = 2…12 and 94 % two-concept success with a layout; 25 steps fall to 0.81 at
#: N = 12, and at N = 2 leave the merged LoRA drawing a broken "sks" in half of the layout scenes (51 %)
GPU_REFINEMENT_STEPS = 100


def merge_device(spec: str) -> torch.device:
    """The device a merge's forward passes run on: ``"cpu"``, ``"cuda"`` / ``"cuda:N"`` (refused with a clear
    message when torch sees no such GPU), or ``"auto"`` (``cuda`` when torch sees a GPU, else the CPU)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise MergeInputError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', not {spec!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise MergeInputError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', not {spec!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise MergeInputError(f"device {spec!r}: torch sees no CUDA GPU here; merge on 'cpu'")
    if dev.index is not None and dev.index >= count:
        raise MergeInputError(f"device {spec!r}: torch sees {count} CUDA GPU(s) (cuda:0 … cuda:{count - 1})")
    return dev


@dataclass
class MergeResult:
    """The merged ΔW per canonical key (``deltas.fmt == "merged"``) and the report (JSON-ready).

    Modules are dense (``kind="full"``), or, with ``MergeConfig.lowrank_output``, low-rank factors at the
    saved file's rank (``kind="lora"``, scale 1) whose relative SVD error per key is in ``svd_errors``.
    """

    deltas: DeltaSet
    report: dict[str, Any]
    svd_errors: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ layer naming
def layer_group(key: str) -> str:
    """Report group of a canonical key: ``te``, ``kv`` (attn2.to_k/to_v) or ``unet``."""
    if not is_unet_key(key):
        return "te"
    return "kv" if key.endswith(("attn2.to_k", "attn2.to_v")) else "unet"


def input_group(key: str) -> str:
    """Layers that read the same input tensor share one FeatureStats (q/k/v siblings, fused in_proj)."""
    path, part = split_fused_key(key)
    if part is not None:
        return path + ":in"
    parent, _, leaf = path.rpartition(".")
    if leaf in ("to_k", "to_v") and parent.endswith("attn2"):
        return parent + ":context"
    if leaf in ("to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj"):
        return parent + ":x"
    return path


def _hook_module(model: nn.Module, key: str) -> nn.Module:
    path, _part = split_fused_key(key)
    return model.get_submodule(path)


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Input rows ``[n, d_in]`` of a hooked module, or None where no row form exists (k×k conv)."""
    if isinstance(module, nn.Conv2d):
        if module.kernel_size != (1, 1) or module.stride != (1, 1) or module.groups != 1:
            return None
        return rows_from_conv_input(x)
    return x.reshape(-1, x.shape[-1])


def _d_in(model: nn.Module, key: str) -> int:
    w, _ = target_weight(model, key)
    return int(w.shape[1])


def _sequence_first(key: str) -> bool:
    """OpenCLIP text towers (``…transformer.resblocks.N…``) run sequence-first ``[L, B, D]``."""
    return ".resblocks." in key


def _w0(model: nn.Module, key: str) -> torch.Tensor:
    """The base weight of ``key`` as float32 ``[d_out, d_in·k·k]`` on the CPU, where the solvers run."""
    w, rows = target_weight(model, key)
    w = w.detach()
    return (w if rows is None else w[rows]).float().flatten(1).cpu()


def _trim_heap() -> None:
    """Give the allocator's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Per-layer tensors of up to 26 MB (SDXL) come and go between the long-lived merged layers; glibc serves
    them from its heap once its dynamic mmap threshold has risen, and freed holes there stay resident.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  # glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


class StopForward(Exception):
    """Raised by a ``_collect`` hook once every awaited module has seen its input: the rest of the forward
    pass is not needed (sequential solving runs passes that feed one stage only)."""


@contextmanager
def _collect(
    model: nn.Module,
    stats: dict[str, Any],
    hook_keys: dict[str, str],
    select: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop_after: dict[str, int] | None = None,
) -> Iterator[None]:
    """Forward pre-hooks feeding each input group's rows into ``stats[group]`` (anything with ``add(rows)``);
    always removed.

    ``hook_keys[group]`` is one canonical key of the group: its module's input is the group's input.
    ``select(x)`` may cut positions of a batch-first ``[B, L, D]`` input first (text encoder).
    ``stop_after[group]`` = how many times that module runs in the pass: once every listed group has run that
    often, the hook raises ``StopForward`` (the module itself then does not run).
    """
    handles = []
    pending = dict(stop_after) if stop_after else None

    def make(group: str):
        seq_first = _sequence_first(hook_keys[group])

        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if seq_first:
                x = x.transpose(0, 1)
            if select is not None:
                x = select(x)
            r = _rows(mod, x)
            if r is not None:
                stats[group].add(r)
            if pending is not None and group in pending:
                pending[group] -= 1
                if pending[group] <= 0:
                    del pending[group]
                if not pending:
                    raise StopForward

        return hook

    try:
        for group in stats:
            handles.append(_hook_module(model, hook_keys[group]).register_forward_pre_hook(make(group)))
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------- validation
def _validate(model: nn.Module, concepts: Sequence[Concept], config: MergeConfig) -> list[str]:
    """Check the request; return the sorted union of canonical keys to merge."""
    config.validate()
    if len(concepts) < 1:
        raise MergeInputError("nothing to merge: give at least one concept LoRA")
    archs = {c.deltas.arch for c in concepts if c.deltas.arch != "unknown"}
    if len(archs) > 1:
        detail = ", ".join(f"{c.label}: {c.deltas.arch}" for c in concepts)
        raise ArchitectureMismatchError(f"the LoRAs are for different base architectures ({detail})")
    model_arch = getattr(model, "arch", None)
    if model_arch and archs and model_arch not in archs:
        raise ArchitectureMismatchError(
            f"the base model is {model_arch} but the LoRAs are for {archs.pop()}; pick a matching base model"
        )
    keys: set[str] = set()
    enc = model.prompt_encoder  # type: ignore[attr-defined]
    for c in concepts:
        if not c.trigger.strip():
            raise MergeInputError(f"concept {c.label!r} has no trigger words")
        for p in _concept_prompts(c, config):
            enc.token_positions(p, c.trigger)  # raises TriggerNotFoundError with prompt and words
        scaled = c.deltas.scaled(c.te_weight, c.unet_weight)
        for k in scaled.modules:
            try:
                w, rows = target_weight(model, k)
            except (AttributeError, KeyError):
                raise ArchitectureMismatchError(
                    f"LoRA {c.label!r} targets {k!r}, which the base model does not have; "
                    "is it a LoRA for another base model?"
                ) from None
            want = tuple((w if rows is None else w[rows]).shape)
            got = scaled[k].shape
            if math.prod(want) != math.prod(got) or want[0] != got[0]:
                raise ArchitectureMismatchError(
                    f"LoRA {c.label!r} at {k}: delta shape {got} does not fit the base weight {want}"
                )
        keys |= set(scaled.modules)
    if not keys:
        raise MergeInputError("nothing to merge: the LoRAs have no modules (or every weight is 0)")
    return sorted(keys)


def _concept_prompts(c: Concept, config: MergeConfig) -> list[str]:
    return [t.format(c.trigger) for t in config.templates] + list(c.prompts)


# ------------------------------------------------------------------------------------------- the merge
class _Features:
    """Creates the FeatureStats of a set of input groups (one representative key per group)."""

    def __init__(self, model: nn.Module, keys: Sequence[str], config: MergeConfig) -> None:
        self.hook_keys: dict[str, str] = {}
        for k in keys:
            self.hook_keys.setdefault(input_group(k), k)
        self.dims = {g: _d_in(model, k) for g, k in self.hook_keys.items()}
        self.config = config

    def new(self, groups: Sequence[str] | None = None) -> dict[str, FeatureStats]:
        c = self.config
        return {g: FeatureStats(self.dims[g], c.sketch_rows, c.seed) for g in (groups or self.hook_keys)}


def merge_loras(
    model: nn.Module,
    concepts: Sequence[Concept],
    config: MergeConfig | None = None,
    progress: Progress | None = None,
) -> MergeResult:
    """Merge ``concepts`` on ``model`` with ``config.method``; the model's weights are left bit-identical.

    Features are collected for ``loraclr`` and ``lsq`` (and for the report of any method when
    ``config.report_features``); ``linear`` and ``svd`` alone need no forward pass.
    """
    config = config or MergeConfig()
    keys = _validate(model, concepts, config)
    # automatic refinement (``distill_steps=None``): where the model runs decides; a GPU without room for it
    # then keeps the per-layer merge (a note in the report) instead of failing the whole merge
    auto_refine = config.distill_steps is None
    device = next(model.parameters()).device
    config = replace(config, distill_steps=config.effective_distill_steps(device))
    if config.distill_steps > 0 and config.method in ("loraclr", "lsq"):
        # the refinement adds ΔW into these weights (`apply.patched`): a base stored in fp16/bf16
        # (`load_base`'s SDXL) gets float32 here. Feature passes need no such copy: `apply.hooked` patches
        # one float32 copy of a layer while it runs.
        to_float32(model, (split_fused_key(k)[0] for k in keys))
    t_start = time.perf_counter()
    scaled = [c.deltas.scaled(c.te_weight, c.unet_weight) for c in concepts]
    n = len(concepts)
    by_group = {g: [k for k in keys if layer_group(k) == g] for g in ("te", "kv", "unet")}
    features = config.method in ("loraclr", "lsq") or config.report_features
    seq = config.effective_sequential() and config.method in ("loraclr", "lsq")
    preserve = config.effective_preserve_base() and config.method in ("loraclr", "lsq")
    n_rows = n + (1 if preserve else 0)  # the last "concept" is the base on neutral prompts (ΔW = 0)
    enc = model.prompt_encoder  # type: ignore[attr-defined]
    prompts = [_concept_prompts(c, config) for c in concepts] + [list(config.neutral_prompts)]
    # per solved key (in solve order): its exact dense ΔW [d_out, d_in], or its low-rank form once reduced
    merged: dict[str, torch.Tensor | LoraModule] = {}
    svd_errors: dict[str, float] = {}

    def release(done_keys: Sequence[str]) -> None:
        """No later pass reads these keys' exact ΔW: keep them as the saved file will (``lowrank_output``)."""
        if config.lowrank_output is None:
            return
        from lib_loraclr.writers import to_low_rank

        rank, max_error = config.lowrank_output
        todo = [k for k in done_keys if isinstance(merged.get(k), torch.Tensor)]
        if todo:
            tick(f"output rank: reducing {len(todo)} layers")
        for k in todo:
            d = merged.get(k)
            if isinstance(d, torch.Tensor):
                up, down, err = to_low_rank(
                    d.reshape(_target_shape(model, k)).contiguous(), rank, None, max_error
                )
                merged[k] = LoraModule(key=k, down=down, up=up, kind="lora")
                svd_errors[k] = err
                del d

    layer_info: dict[str, dict[str, Any]] = {}
    done = 0

    def tick(stage: str) -> None:
        if progress is not None:
            progress(stage, done, len(keys))

    def solve(
        key: str,
        feats: Sequence[FeatureStats | None],
        neutral: FeatureStats | None,
        paired: Sequence[PairedStats] | None = None,
    ) -> None:
        nonlocal done
        w0 = _w0(model, key)
        if paired is not None and config.method in ("loraclr", "lsq"):
            solve_paired(key, w0, paired, neutral)
            done += 1
            _trim_heap()
            tick(f"solved {key}")
            return
        stats = [
            ConceptStats(
                f if f is not None else FeatureStats(w0.shape[1]),
                _concept_delta(scaled[i][key]) if i < n and key in scaled[i] else None,
                name=concepts[i].label if i < n else "base",
            )
            for i, f in enumerate(feats)
        ]
        method, note = config.method, ""
        if method in ("loraclr", "lsq") and any(f is None for f in feats):
            method, note = (
                "linear",
                "inputs not observable (k×k conv or fused attention out_proj): linear merge",
            )
        solve_stats = stats if method in ("loraclr", "lsq") else stats[:n]
        prior = None
        if method in ("loraclr", "lsq") and config.prior_for(key) == "mean":
            # solve for Δ − Δ̄ (Δ̄ = mean of the concepts' ΔW): the ridge and the neutral rows pull toward Δ̄
            dense = [scaled[i][key].delta_2d().float() if key in scaled[i] else None for i in range(n)]
            prior = sum(d for d in dense if d is not None) / n
            solve_stats = [
                ConceptStats(
                    cs.features,
                    None if i >= n else (-prior if dense[i] is None else dense[i] - prior),
                    name=cs.name,
                )
                for i, cs in enumerate(solve_stats)
            ]
        d, info = merge_layer(
            method, w0, solve_stats, params=config.loraclr_params(), ridge=config.ridge, rank=config.svd_rank
        )
        if prior is not None:
            d = d + prior.reshape(d.shape)
        merged[key] = d
        have = all(f is not None and f.n > 0 for f in feats[:n])
        fid = layer_fidelity(d, stats[:n], W0=w0, neutral=neutral) if have else {}
        layer_info[key] = {
            "group": layer_group(key),
            "method": method,
            "note": note,
            "solve": info,
            "fidelity": fid,
        }
        done += 1
        tick(f"solved {key}")

    def solve_paired(
        key: str, w0: torch.Tensor, paired: Sequence[PairedStats], neutral: FeatureStats | None
    ) -> None:
        """Solve one layer on student inputs with drift-corrected targets (``PairedStats.effective_delta``)."""
        dense = [scaled[i][key].delta_2d().float() if key in scaled[i] else None for i in range(n)]
        prior = sum(d for d in dense if d is not None) / n if config.prior_for(key) == "mean" else None
        teach = dense + [prior] * (
            len(paired) - n
        )  # base rows: the base (prior "mean": toward Δ̄, as unpaired)
        targets = [ps.effective_delta(w0, t, config.sequential_ridge) for ps, t in zip(paired, teach)]
        names = [c.label for c in concepts] + ["base"] * (len(paired) - n)
        stats = [ConceptStats(ps.features, t, name=nm) for ps, t, nm in zip(paired, targets, names)]
        solve_stats = stats
        if prior is not None:
            solve_stats = [
                ConceptStats(cs.features, t - prior, name=cs.name) for cs, t in zip(stats, targets)
            ]
        d, info = merge_layer(
            config.method,
            w0,
            solve_stats,
            params=config.loraclr_params(),
            ridge=config.ridge,
            rank=config.svd_rank,
        )
        if prior is not None:
            d = d + prior.reshape(d.shape)
        merged[key] = d
        have = all(ps.n > 0 for ps in paired[:n])
        fid = layer_fidelity(d, stats[:n], W0=w0, neutral=neutral) if have else {}
        layer_info[key] = {
            "group": layer_group(key),
            "method": config.method,
            "note": "",
            "solve": info,
            "fidelity": fid,
            "input_drift": [ps.drift for ps in paired],
        }

    # every concept's ΔW as its LoRA modules (low-rank; dense only inside a layer's forward or solve)
    own: list[dict[str, LoraModule]] = [dict(s.modules) for s in scaled] + [{}]  # + the base (no LoRA)
    if seq:
        from lib_loraclr.merge.sequential import merge_sequential

        merge_sequential(
            model,
            config,
            by_group,
            own,
            prompts,
            n,
            n_rows,
            concepts,
            merged,
            solve,
            tick,
            release if config.distill_steps == 0 else (lambda _keys: None),  # the refinement reads them dense
        )
    # ---- stage 1: text encoder
    te_all = by_group["te"] if not seq else []
    te_keys = [k for k in te_all if _rowable(model, k)]
    if te_keys:
        tick("text encoder: collecting features")
        fe = _Features(model, te_keys, config)
        per_concept = []
        for i in range(n_rows + 1):  # + neutral statistics for the report (base weights)
            fs = fe.new()
            with hooked(model, own[min(i, n)]), torch.no_grad():
                for p in prompts[min(i, n)] if features else []:
                    eot = enc.eot_position(p)
                    with _collect(model, fs, fe.hook_keys, select=_te_select(config, eot)):
                        model.get_learned_conditioning([p])  # type: ignore[operator]  # every text encoder
            per_concept.append(fs)
        for k in te_keys:
            g = input_group(k)
            solve(k, [fs[g] for fs in per_concept[:n_rows]], per_concept[-1][g] if features else None)
    for k in te_all:
        if k not in te_keys:
            solve(k, [None] * n, None)

    te_merged = {k: merged[k] for k in by_group["te"]}
    # ---- stage 2: cross-attention K/V from the merged text encoder
    kv_keys = by_group["kv"] if not seq else []
    if kv_keys:
        tick("cross-attention K/V: encoding prompts with the merged text encoder")
        dim = _d_in(model, kv_keys[0])
        per_concept = []
        with hooked(model, te_merged), torch.no_grad():
            for i in range(n_rows + 1):
                fs = FeatureStats(dim, config.sketch_rows, config.seed)
                for p in prompts[min(i, n)] if features else []:
                    ctx = _crossattn(model.get_learned_conditioning([p]))[0]  # type: ignore[operator]
                    eot = enc.eot_position(p)
                    pos = _kv_positions(
                        config, enc, p, concepts[i].trigger if i < n else None, eot, ctx.shape[0]
                    )
                    fs.add(ctx[pos].float())
                per_concept.append(fs)
        for k in kv_keys:
            solve(k, per_concept[:n_rows], per_concept[-1] if features else None)

    # ---- stage 3: the other UNet layers, from seeded sampling runs
    unet_keys = by_group["unet"] if not seq else []
    if unet_keys:
        kv_merged = {k: merged[k] for k in kv_keys}
        row_keys = [k for k in unet_keys if _rowable(model, k)]
        conv_keys = [k for k in unet_keys if k not in row_keys]
        per_concept_all: list[dict[str, FeatureStats]] = [{} for _ in range(n_rows + 1)]
        if row_keys and features:
            fe = _Features(model, row_keys, config)
            passes = _plan_passes(fe, n_rows + 1, config)
            for pi, groups in enumerate(passes):
                for i in range(n_rows + 1):
                    tick(f"UNet features: pass {pi + 1}/{len(passes)}, run {i + 1}/{n_rows + 1}")
                    fs = fe.new(groups)
                    mine = {k: own[i][k] for k in unet_keys if i < n and k in own[i]}
                    with hooked(model, {**te_merged, **kv_merged, **mine}), _collect(model, fs, fe.hook_keys):
                        ps = prompts[min(i, n)]
                        for p in ps if config.effective_sample_prompts() == "all" else ps[:1]:
                            _sample(model, p, config)
                    per_concept_all[i].update(fs)
        for k in row_keys:
            g = input_group(k)
            feats = [per_concept_all[i].get(g) for i in range(n_rows)]
            feats = [f if f is not None else FeatureStats(_d_in(model, k)) for f in feats]
            solve(k, feats, per_concept_all[-1].get(g))
        for k in conv_keys:
            solve(k, [None] * n, None)
    te_merged = kv_merged = {}  # no further pass reads them: `release` may free the dense ΔW

    distill_info = None
    if config.distill_steps > 0 and config.method in ("loraclr", "lsq"):
        from lib_loraclr.merge.distill import distill_merged

        try:
            refined, distill_info = distill_merged(
                model,
                merged,  # type: ignore[arg-type]  # all dense: nothing is released before this point
                [*scaled, {}],  # the teachers stay low-rank: one is dense at a time, while the pool is made
                prompts if preserve else [*prompts[:n], []],
                config,
                config.distill_params(),
                progress,
                in_place=True,  # no copy of the merged ΔW (an interrupted merge discards it)
            )
            merged.update(refined)
        except torch.cuda.OutOfMemoryError as e:
            if not auto_refine:  # steps the user asked for: the error says what to change
                raise
            # the device chose the refinement, and only a GPU does (there the student trains on a copy:
            # ``merged`` still holds the per-layer merge)
            torch.cuda.empty_cache()
            distill_info = {"steps": 0, "skipped": f"{device} ran out of memory for the refinement ({e})"}
    release(list(merged))
    out = DeltaSet(
        modules={
            k: d
            if isinstance(d, LoraModule)
            else LoraModule(key=k, dense=d.reshape(_target_shape(model, k)).contiguous(), kind="full")
            for k, d in merged.items()
        },
        arch=next((c.deltas.arch for c in concepts if c.deltas.arch != "unknown"), "unknown"),
        fmt="merged",
    )
    report = build_report(concepts, config, layer_info, time.perf_counter() - t_start)
    if distill_info is not None:
        report["distill"] = distill_info
    return MergeResult(deltas=out, report=report, svd_errors=svd_errors)


def _te_select(config: MergeConfig, eot: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Text-encoder rows of a batch-first ``[B, L, D]`` input: positions up to the end token, or every position
    (padding included) with ``kv_rows="all"``."""
    if config.effective_kv_rows() == "all":
        return None
    return lambda x: x[:, : eot + 1]


def _kv_positions(
    config: MergeConfig, enc: Any, prompt: str, trigger: str | None, eot: int, length: int
) -> list[int]:
    """Context positions whose K/V rows join the solve (``MergeConfig.kv_rows``); ``length`` = context length."""
    rows = config.effective_kv_rows()
    if rows == "trigger" and trigger is not None:
        return sorted(set(enc.token_positions(prompt, trigger)) | {eot})
    if rows == "all":
        return list(range(length))
    return list(range(eot + 1))


def _concept_delta(mod: LoraModule) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A concept's ΔW for the solvers: the low-rank pair ``(up·m·scale, down)`` flattened to 2-D when the
    module has factors (cheaper cross-concept terms), else the dense ``[d_out, d_in]`` delta."""
    if mod.dense is not None or mod.up is None or mod.down is None:
        return mod.delta_2d()
    return (mod.up.float().flatten(1) * (mod.multiplier * mod.scale), mod.down.float().flatten(1))


def _target_shape(model: nn.Module, key: str) -> tuple[int, ...]:
    w, rows = target_weight(model, key)
    return tuple((w if rows is None else w[rows]).shape)


def _rowable(model: nn.Module, key: str) -> bool:
    """Whether hooks can see the layer's input as rows: not k×k convs, and not the ``out_proj`` of an
    ``nn.MultiheadAttention`` (torch applies its weight inside the fused kernel, the module never runs)."""
    path, _ = split_fused_key(key)
    parent, _, leaf = path.rpartition(".")
    if leaf == "out_proj" and isinstance(model.get_submodule(parent), nn.MultiheadAttention):
        return False
    mod = _hook_module(model, key)
    if isinstance(mod, nn.Conv2d):
        return mod.kernel_size == (1, 1) and mod.stride == (1, 1) and mod.groups == 1
    return isinstance(mod, nn.Linear | nn.MultiheadAttention)


def _crossattn(cond: Any) -> torch.Tensor:
    return cond["crossattn"] if isinstance(cond, dict) else cond


def _plan_passes(fe: _Features, runs: int, config: MergeConfig) -> list[list[str]]:
    """Split input groups into sampling passes whose statistics fit ``config.max_stats_bytes``."""
    passes: list[list[str]] = [[]]
    used = 0
    for g, d in fe.dims.items():
        need = runs * (8 * d * d + config.sketch_rows * (4 * d + 16))
        if passes[-1] and used + need > config.max_stats_bytes:
            passes.append([])
            used = 0
        passes[-1].append(g)
        used += need
    return [p for p in passes if p]


def _sample(model: nn.Module, prompt: str, config: MergeConfig) -> None:
    """Seeded sampling runs without CFG (the official feature run; ``config.sample_images`` images, seeds
    ``seed …``); hooks collect the features."""
    shape = config.shape_for(prompt) if config.shape_for is not None else config.shape
    feature_run(model, [prompt] * config.sample_images, config, shape)


def feature_run(
    model: nn.Module,
    prompts: Sequence[str],
    config: MergeConfig,
    shape: tuple[int, int, int] | None,
    denoiser: Callable[..., torch.Tensor] | None = None,
) -> None:
    """One seeded feature run of ``prompts`` (one image each) on a ``shape`` latent, no CFG, with
    ``config``'s steps, sampler and seed; ``denoiser`` replaces the CFG denoiser (``models.sampling.sample``)."""
    from lib_loraclr.models.sampling import sample

    sample(
        model,
        list(prompts),
        negative="",
        steps=config.sample_steps,
        cfg_scale=1.0,
        sampler=config.sampler,
        seed=config.seed,
        shape=shape,
        denoiser=denoiser,
    )


# ---------------------------------------------------------------------------------------------- report
def _nanmean(xs: Sequence[float]) -> float | None:
    v = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(sum(v) / len(v)) if v else None


def build_report(
    concepts: Sequence[Concept], config: MergeConfig, layer_info: dict[str, dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """Per concept and layer group: fidelity (relative error on own inputs), interference (share of the
    other concepts' effects on its inputs), base preservation (relative change on neutral prompts)."""
    names = [c.label for c in concepts]
    groups: dict[str, dict[str, Any]] = {}
    for g in ("te", "kv", "unet"):
        infos = [v for v in layer_info.values() if v["group"] == g and v["fidelity"]]
        if not infos:
            continue
        per = {}
        for i, n in enumerate(names):
            per[n] = {
                "rel_err": _nanmean([v["fidelity"]["rel_err"][i] for v in infos]),
                "interference": _nanmean([v["fidelity"]["interference"][i] for v in infos]),
            }
        groups[g] = {
            "layers": len(infos),
            "concepts": per,
            "base_change_neutral": _nanmean([v["fidelity"].get("base_change_neutral") for v in infos]),
        }
    hinge = [
        v["solve"].get("hinge_ever_active") for v in layer_info.values() if "hinge_ever_active" in v["solve"]
    ]
    return {
        "method": config.method,
        "preset": config.preset if config.method == "loraclr" else None,
        "config": {
            **{
                k: (v if k != "shape_for" else (None if v is None else "custom"))
                for k, v in asdict(config).items()
                if k not in ("max_stats_bytes", "lowrank_output")
            },
            "kv_rows": config.effective_kv_rows(),
            "preserve_base": config.effective_preserve_base(),
            "prior": config.effective_prior(),
            "sample_prompts": config.effective_sample_prompts(),
            "sequential": config.effective_sequential() and config.method in ("loraclr", "lsq"),
        },
        "concepts": [
            {
                "name": c.label,
                "trigger": c.trigger,
                "te_weight": c.te_weight,
                "unet_weight": c.unet_weight,
                "modules": len(c.deltas),
            }
            for c in concepts
        ],
        "layers": len(layer_info),
        "fallbacks": sorted(k for k, v in layer_info.items() if v["note"]),
        "hinge_active_layers": sum(1 for h in hinge if h),
        "groups": groups,
        "per_layer": layer_info,
        "seconds": seconds,
    }
