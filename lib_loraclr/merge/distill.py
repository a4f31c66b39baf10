"""Output-level refinement of a merged ΔW: a short distillation of the single-LoRA teachers.

After the per-layer solve, the merged deltas (the STUDENT) are trained for a few optimizer steps so that the
whole model's noise prediction matches, on each concept's own prompts, the model with that concept's own
LoRA (TEACHER i), and on the neutral prompts the bare base model (teacher = base):

    L = mean_i  MSE(ε_s(x_t, t, c_i), ε_Ti(x_t, t, c_i))                       (concept i's prompts)
        + w_n · MSE(ε_s(x_t, t, c_neutral), ε_base(x_t, t, c_neutral))         (neutral prompts)
        + w_c · mean_i mean_{j≠i} relu(m · ‖ε_Ti − ε_Tj‖² − ‖ε_s − ε_Tj‖²)     (LoRACLR's push, at the output)

``x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε`` at uniform random timesteps; ``x0`` = random latents (``latents="random"``)
or the teacher's own seeded samples (``"teacher"``). The hinge (margin ``m`` relative to how far the two
teachers are apart on that input) is 0 while the student stays nearer its own teacher than the fraction m of
the teachers' gap, so it only acts when the student drifts toward another concept's output.

The student never writes into the model: forward hooks add ``x @ ΔWᵀ`` (``F.conv2d`` with the module's
stride/padding for convolutions) to the output of each merged module, and the model's parameters have
``requires_grad`` off for the duration (flags restored). Teachers run under ``apply.patched`` (restored
bit-for-bit). All teacher outputs are computed once before the steps. A step's batch runs in UNet calls of at
most ``chunk_pixels`` latent pixels, each back-propagated at once (the gradients accumulate in the student), so
the activations kept for the backward pass are one call's, whatever the number of concepts. Keys whose module
never runs as a module (fused OpenCLIP ``in_proj:q|k|v`` rows, ``nn.MultiheadAttention.out_proj``) keep the
solve's result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lib_loraclr.apply import patched, split_fused_key
from lib_loraclr.deltas import DeltaSet

Progress = Callable[[str, int, int], None]
Teacher = dict[str, torch.Tensor] | DeltaSet  # a teacher's ΔW: dense per key, or a LoRA (densified per call)


@dataclass
class DistillParams:
    """Options of the refinement (``MergeConfig.distill_steps`` and ``MergeConfig.distill_overrides``)."""

    steps: int = 0
    lr: float = 0.02  # Adam step relative to each tensor's initial RMS (scale-free across layers)
    batch: int = 4  # noised latents per prompt per step
    pool: int = 16  # noised latents per prompt, precomputed with every teacher's output
    latents: str = "random"  # "random" (x0 ~ N(0, I)) | "teacher" (x0 = teacher i's own seeded samples)
    neutral_weight: float = 1.0  # the neutral prompts weigh like one concept
    contrast_weight: float = 0.1
    margin: float = 0.5  # hinge margin, relative to ‖ε_Ti − ε_Tj‖²
    rank: int = 0  # 0: dense student ΔW; r > 0: low-rank factors up·down initialised by SVD at rank r
    # latent pixels per UNet call (items × H × W, at least one item): bounds the activations kept for the
    # backward pass; 2048 = 8 items on a 16×16 latent, 1 on SD1.5's 64×64
    chunk_pixels: int = 2048
    seed: int = 0

    def validate(self) -> None:
        from lib_loraclr.merge.pipeline import MergeInputError

        if self.steps < 0:
            raise MergeInputError("distill_steps must be >= 0")
        if self.latents not in ("random", "teacher"):
            raise MergeInputError(f"distill latents must be 'random' or 'teacher', not {self.latents!r}")
        if self.batch < 1 or self.pool < 1 or self.rank < 0 or self.lr <= 0 or self.chunk_pixels < 1:
            raise MergeInputError("distill batch, pool and chunk_pixels must be >= 1, rank >= 0, lr > 0")


# ------------------------------------------------------------------------------------ pure helpers
def lowrank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``delta [d_out, d_in]`` → ``up [d_out, r]`` (U·S), ``down [r, d_in]`` (Vᵀ),
    ``r = min(rank, d_out, d_in)``; ``up @ down`` is the best rank-r approximation."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous()


def noised_latents(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε`` for ``x0``, ``noise`` ``[B, C, H, W]`` and integer timesteps ``t [B]``."""
    a = alphas_cumprod.to(x0.device, torch.float32)[t.long()].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def per_item_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per item: ``[B, …]`` × ``[B, …]`` → ``[B]``."""
    return (a - b).pow(2).flatten(1).mean(1)


def contrast_hinge(
    student: torch.Tensor, own: torch.Tensor, others: torch.Tensor, margin: float
) -> torch.Tensor:
    """LoRACLR's push at the output, per item: ``mean_j relu(m·‖own − other_j‖² − ‖student − other_j‖²)``.

    ``student``, ``own``: ``[B, C, H, W]``; ``others``: ``[B, M, C, H, W]`` (the other teachers on the same
    inputs, M ≥ 1) → ``[B]``. Zero while the student is at least ``√m`` of the teachers' gap away from each
    other teacher (so it is zero at ``student == own`` for m ≤ 1)."""
    gap = (own.unsqueeze(1) - others).pow(2).flatten(2).mean(2)  # [B, M]
    dist = (student.unsqueeze(1) - others).pow(2).flatten(2).mean(2)
    return F.relu(margin * gap - dist).mean(1)


def distill_objective(
    eps_student: torch.Tensor,
    eps_target: torch.Tensor,
    item_weight: torch.Tensor,
    eps_others: torch.Tensor | None = None,
    contrast_weight: float = 0.0,
    margin: float = 0.5,
) -> torch.Tensor:
    """The scalar loss of one batch: ``Σ_b w_b·MSE_b`` (+ ``contrast_weight · Σ_b w_b·hinge_b`` where
    ``eps_others [B, M, C, H, W]`` is given; rows without other teachers are NaN-free zeros there).
    ``item_weight [B]`` already divides by the batch share of each item's group."""
    loss = (item_weight * per_item_mse(eps_student, eps_target)).sum()
    if eps_others is not None and contrast_weight > 0 and eps_others.shape[1] > 0:
        loss = (
            loss
            + contrast_weight
            * (item_weight * contrast_hinge(eps_student, eps_target, eps_others, margin)).sum()
        )
    return loss


# --------------------------------------------------------------------------------------- the student
class Student(nn.Module):
    """The merged ΔW as trainable tensors, one per distillable key: dense ``[d_out, d_in·k·k]`` or a
    low-rank pair (``rank`` > 0 and below both dimensions)."""

    def __init__(self, merged: dict[str, torch.Tensor], rank: int = 0, share: bool = False) -> None:
        """``share``: a dense ΔW (float32, contiguous) becomes the parameter itself (no copy: training then
        writes into ``merged``'s tensors); otherwise every tensor is copied."""
        super().__init__()
        self.keys = list(merged)
        self.dense = nn.ParameterDict()
        self.up = nn.ParameterDict()
        self.down = nn.ParameterDict()
        self.shapes = {k: tuple(d.shape) for k, d in merged.items()}
        self.names = {k: str(i) for i, k in enumerate(merged)}
        for i, d in enumerate(merged.values()):
            d2 = d.detach().float().reshape(d.shape[0], -1)
            name = str(i)
            if 0 < rank < min(d2.shape):
                u, v = lowrank_factors(d2, rank)
                self.up[name], self.down[name] = nn.Parameter(u), nn.Parameter(v)
            else:
                self.dense[name] = nn.Parameter(d2 if share else d2.clone())

    def delta(self, key: str) -> torch.Tensor:
        """ΔW of ``key`` as ``[d_out, d_in·k·k]``."""
        name = self.names[key]
        if name in self.dense:
            return self.dense[name]
        return self.up[name] @ self.down[name]

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """One Adam group per tensor, step = ``lr`` × the tensor's initial RMS (1e-8 floor)."""
        groups = []
        for p in self.parameters():
            rms = float(p.detach().pow(2).mean().sqrt())
            groups.append({"params": [p], "lr": lr * max(rms, 1e-8)})
        return groups

    def export(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """Detached ΔW per key, in the shapes the merge produced (``copy=False``: a dense key's tensor is
        the parameter's own storage, reshaped)."""
        out = {}
        with torch.no_grad():
            for k in self.keys:
                d = self.delta(k).detach()
                out[k] = (d.clone() if copy else d).reshape(self.shapes[k])
        return out


def distillable(model: nn.Module, key: str) -> bool:
    """Whether a hook on the key's module sees its whole effect (plain Linear / Conv2d, not fused rows,
    not ``nn.MultiheadAttention.out_proj``, which torch applies inside the fused kernel)."""
    path, part = split_fused_key(key)
    if part is not None:
        return False
    parent, _, leaf = path.rpartition(".")
    if leaf == "out_proj" and parent and isinstance(model.get_submodule(parent), nn.MultiheadAttention):
        return False
    return isinstance(model.get_submodule(path), nn.Linear | nn.Conv2d)


@contextmanager
def student_hooks(model: nn.Module, student: Student) -> Iterator[None]:
    """Forward hooks adding the student's ΔW to each module's output (differentiable); always removed."""
    handles = []

    def make(key: str, mod: nn.Module):
        if isinstance(mod, nn.Conv2d):

            def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
                w = student.delta(key).reshape(m.weight.shape).to(out.dtype)
                return out + F.conv2d(args[0], w, None, m.stride, m.padding, m.dilation, m.groups)

        else:

            def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
                return out + F.linear(args[0], student.delta(key).to(out.dtype))

        return hook

    try:
        for k in student.keys:
            mod = model.get_submodule(split_fused_key(k)[0])
            handles.append(mod.register_forward_hook(make(k, mod)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """``requires_grad`` off on every parameter of the model for the block (flags restored)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


# ------------------------------------------------------------------------------------------- the data
@dataclass
class _PromptData:
    """One prompt's pool: ``x [P, C, H, W]`` noised latents, ``t [P]``, ``target [P, C, H, W]`` (its own
    teacher's ε), ``others [P, M, C, H, W]`` (the other concept teachers' ε; M = 0 for neutral prompts)."""

    prompt: str
    group: int  # concept index; n = neutral
    x: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    others: torch.Tensor


def _shape(model: nn.Module, config: Any, prompt: str) -> tuple[int, int, int]:
    if config.shape_for is not None:
        return tuple(config.shape_for(prompt))
    return tuple(config.shape or model.latent_shape)  # type: ignore[attr-defined]


def _teacher_eps(
    model: nn.Module, delta: Teacher, prompt: str, x: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    with torch.no_grad(), patched(model, delta):
        cond = model.get_learned_conditioning([prompt])  # type: ignore[operator]
        return model.apply_model(x, t, cond.expand(x.shape[0], *cond.shape[1:])).float()  # type: ignore[operator]


def build_pool(
    model: nn.Module,
    own: Sequence[Teacher],
    prompts: Sequence[Sequence[str]],
    config: Any,
    params: DistillParams,
    tick: Callable[[str], None],
) -> list[_PromptData]:
    """Noised latents and teacher outputs for every prompt: ``prompts[i]`` / ``own[i]`` for concept i < n,
    the last entry of each = the neutral prompts with the base as teacher (``own[n] == {}``)."""
    from lib_loraclr.models.sampling import sample

    n = len(own) - 1
    gen = torch.Generator().manual_seed(params.seed)
    pool: list[_PromptData] = []
    dev = model.alphas_cumprod.device  # type: ignore[attr-defined]
    for i, ps in enumerate(prompts):
        for p in ps:
            tick(f"distill: teacher outputs, {'neutral' if i == n else f'concept {i + 1}/{n}'}: {p!r}")
            shape = _shape(model, config, p)
            if params.latents == "teacher":
                with patched(model, own[i]):
                    x0 = sample(
                        model,
                        [p] * params.pool,
                        negative="",
                        steps=config.sample_steps,
                        cfg_scale=1.0,
                        sampler=config.sampler,
                        seed=config.seed + 7919,
                        shape=shape,
                    ).float()
            else:
                x0 = torch.randn((params.pool, *shape), generator=gen)
            noise = torch.randn((params.pool, *shape), generator=gen)
            t = torch.randint(0, model.alphas_cumprod.numel(), (params.pool,), generator=gen)  # type: ignore[attr-defined]
            x0, noise, t = x0.to(dev), noise.to(dev), t.to(dev)
            x = noised_latents(x0, noise, t, model.alphas_cumprod)  # type: ignore[arg-type]
            target = _teacher_eps(model, own[i], p, x, t)
            others = [_teacher_eps(model, own[j], p, x, t) for j in range(n) if j != i and i < n]
            oth = torch.stack(others, 1) if others else target.new_zeros((params.pool, 0, *shape))
            pool.append(_PromptData(p, i, x, t, target, oth))
    return pool


# ------------------------------------------------------------------------------------------- training
Run = list[tuple[int, torch.Tensor]]  # one UNet call: (pool index, item indices into that prompt's pool)


def item_runs(pool: Sequence[_PromptData], picks: Sequence[torch.Tensor], chunk_pixels: int) -> Iterator[Run]:
    """The items ``picks[k]`` of ``pool[k]`` cut into UNet calls: one canvas per call, at most
    ``max(1, chunk_pixels // (H·W))`` items per call (a prompt's items may be split over two calls)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, d in enumerate(pool):
        if len(picks[k]):
            by_shape.setdefault(tuple(d.x.shape[1:]), []).append(k)
    for shape, ks in by_shape.items():
        size = max(1, chunk_pixels // (shape[-1] * shape[-2]))
        run: Run = []
        room = size
        for k in ks:
            idx = picks[k]
            while len(idx):
                take, idx = idx[:room], idx[room:]
                run.append((k, take))
                room -= len(take)
                if room == 0:
                    yield run
                    run, room = [], size
        if run:
            yield run


def _run_loss(
    model: nn.Module,
    pool: Sequence[_PromptData],
    run: Run,
    item_weight: dict[int, float],
    params: DistillParams,
) -> torch.Tensor:
    """The objective's share of one UNet call: ``Σ_b w_b·(MSE_b + contrast·hinge_b)`` over the run's items,
    ``w_b`` = ``item_weight[group of b]``."""
    cond = model.get_learned_conditioning([pool[k].prompt for k, _ in run])  # type: ignore[operator]
    cidx = torch.cat([torch.full((len(idx),), j) for j, (_, idx) in enumerate(run)])
    x = torch.cat([pool[k].x[idx] for k, idx in run])
    t = torch.cat([pool[k].t[idx] for k, idx in run])
    eps = model.apply_model(x, t, cond[cidx.to(cond.device)]).float()  # type: ignore[operator]
    target = torch.cat([pool[k].target[idx] for k, idx in run])
    w = torch.cat([torch.full((len(idx),), item_weight[pool[k].group]) for k, idx in run]).to(eps.device)
    loss = distill_objective(eps, target, w)
    m = max(pool[k].others.shape[1] for k, _ in run)
    if m > 0 and params.contrast_weight > 0:
        starts = list(accumulate((len(idx) for _, idx in run), initial=0))
        rows = [j for j, (k, _) in enumerate(run) if pool[k].others.shape[1] == m]
        sel = torch.cat([torch.arange(starts[j], starts[j + 1]) for j in rows]).to(eps.device)
        others = torch.cat([pool[run[j][0]].others[run[j][1]] for j in rows])
        hinge = contrast_hinge(eps[sel], target[sel], others, params.margin)
        loss = loss + params.contrast_weight * (w[sel] * hinge).sum()
    return loss


def _batch_loss(
    model: nn.Module,
    student: Student,
    pool: Sequence[_PromptData],
    picks: Sequence[torch.Tensor],
    weights: dict[int, float],
    params: DistillParams,
    backward: bool = False,
) -> float:
    """The objective on the items ``picks[k]`` (indices into ``pool[k]``), in UNet calls of at most
    ``params.chunk_pixels`` latent pixels; ``backward``: each call's share is back-propagated as soon as it is
    computed (the gradients accumulate in the student), so only one call's activations are kept at a time."""
    counts: dict[int, int] = {}
    for d, idx in zip(pool, picks):
        counts[d.group] = counts.get(d.group, 0) + len(idx)
    item_weight = {g: weights[g] / c for g, c in counts.items()}
    total = 0.0
    with student_hooks(model, student):
        for run in item_runs(pool, picks, params.chunk_pixels):
            loss = _run_loss(model, pool, run, item_weight, params) / len(weights)
            if backward:
                loss.backward()
            total += float(loss.detach())
    return total


def distill_merged(
    model: nn.Module,
    merged: dict[str, torch.Tensor],
    own: Sequence[Teacher],
    prompts: Sequence[Sequence[str]],
    config: Any,
    params: DistillParams,
    progress: Progress | None = None,
    in_place: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Refine ``merged`` (canonical key → ΔW as the solve produced it) for ``params.steps`` Adam steps.

    ``own[i]`` (i < n): concept i's own ΔW (a dense dict, or its `DeltaSet`: then only the teacher being
    evaluated is dense, while the pool is made); ``own[n] == {}`` (the base). ``in_place``: the dense float32
    tensors of ``merged`` are trained as they are (no copy of the merged ΔW; they hold the refined values
    afterwards, or partly trained ones after an interruption). ``prompts[i]``: the
    prompts of concept i; ``prompts[n]``: the neutral prompts (pass ``[]`` to leave the base out).
    ``config``: the `MergeConfig` (canvas: ``shape`` / ``shape_for``; sampler for ``latents="teacher"``).
    ``progress(stage, done, total)`` is called before every step (it may raise to interrupt; nothing of the
    model is changed then). Returns the refined deltas (same keys and shapes; keys that cannot be hooked
    unchanged) and a JSON-ready info dict (losses on the whole pool before / after, seconds)."""
    params.validate()
    t0 = time.perf_counter()

    def tick(stage: str, done: int = 0, total: int = 1) -> None:
        if progress is not None:
            progress(stage, done, total)

    keys = [k for k in merged if distillable(model, k)]
    n = len(own) - 1
    # the pool before the student: the teachers' dense ΔW and the student's tensors are never alive together
    pool = build_pool(model, own, prompts, config, params, tick)
    dev = model.alphas_cumprod.device  # type: ignore[attr-defined]
    # the student trains where the model runs; on another device than ``merged`` it is a copy there
    student = Student({k: merged[k] for k in keys}, params.rank, share=in_place).to(dev)
    weights = {i: 1.0 for i in range(n)}
    if any(d.group == n for d in pool):
        weights[n] = params.neutral_weight
    gen = torch.Generator().manual_seed(params.seed + 1)

    def full_loss() -> float:
        with torch.no_grad():
            return _batch_loss(model, student, pool, [torch.arange(len(d.t)) for d in pool], weights, params)

    opt = torch.optim.Adam(student.param_groups(params.lr))
    losses: list[float] = []
    with frozen(model):
        before = full_loss()
        for step in range(params.steps):
            tick(f"distill: step {step + 1}/{params.steps}", step, params.steps)
            picks = [torch.randperm(len(d.t), generator=gen)[: params.batch] for d in pool]
            opt.zero_grad(set_to_none=True)
            losses.append(_batch_loss(model, student, pool, picks, weights, params, backward=True))
            opt.step()
        after = full_loss()
    out = dict(merged)
    for k, d in student.export(copy=not in_place).items():
        if d.device != merged[k].device:  # trained on a GPU: back where the merge keeps its results
            d = merged[k].copy_(d) if in_place else d.to(merged[k].device)
        out[k] = d
    info = {
        "steps": params.steps,
        "keys": len(keys),
        "skipped_keys": sorted(k for k in merged if k not in keys),
        "loss_before": before,
        "loss_after": after,
        "loss_first_steps": _mean(losses[:5]),
        "loss_last_steps": _mean(losses[-5:]),
        "pool_items": sum(len(d.t) for d in pool),
        "params": {k: v for k, v in vars(params).items()},
        "seconds": time.perf_counter() - t0,
    }
    return out, info


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None
