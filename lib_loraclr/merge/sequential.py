"""Sequential solving (``MergeConfig.sequential``): layers fitted in depth order on the partially merged model.

Text-encoder input groups go in call order, then the cross-attention K/V, then the UNet block by block
(`unet_stage`). Every stage records PAIRED statistics (``PairedStats``): the partially merged STUDENT's
inputs and the concept's own-LoRA TEACHER's inputs at the same tokens / sampling steps, and solves its layers
on drift-corrected targets (``docs/DESIGN.md`` "Sequential solving").

Cost control (results identical to running every pass in full):
- the teacher never changes during a merge, so its text-encoder rows are recorded once per prompt for
  every group (``_TeacherRows``) and its sampling trajectory once per concept (``_Trajectory``); each UNet
  stage replays the recorded ``(x, σ)`` calls instead of sampling again;
- a pass that only has to feed one stage stops as soon as the stage's modules have seen their inputs
  (``_collect(stop_after=…)`` raises ``StopForward``), so the layers after it are never run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lib_loraclr.apply import DeltaHooks, DeltaLike, hooked
from lib_loraclr.merge.pipeline import (
    Concept,
    MergeConfig,
    StopForward,
    _collect,
    _crossattn,
    _d_in,
    _Features,
    _hook_module,
    _kv_positions,
    _rowable,
    _te_select,
    feature_run,
    input_group,
)
from lib_loraclr.merge.stats import PairedStats

_BLOCK = re.compile(r"\.(input_blocks|output_blocks)\.(\d+)\.|\.(middle_block)\.")


def unet_stage(key: str) -> tuple[int, int]:
    """Depth stage of a UNet key for sequential solving: ``(0, i)`` input block i, ``(1, 0)`` the middle
    block, ``(2, i)`` output block i, ``(3, 0)`` anything else (ldm / sgm module paths)."""
    m = _BLOCK.search(key)
    if m is None:
        return (3, 0)
    if m.group(3):
        return (1, 0)
    return (0 if m.group(1) == "input_blocks" else 2, int(m.group(2)))


class _RowBuffer:
    """Rows of one forward pass (transient: one prompt or one sampling step), for paired statistics."""

    def __init__(self) -> None:
        self.blocks: list[torch.Tensor] = []

    def add(self, rows: torch.Tensor) -> None:
        self.blocks.append(rows.float())

    def rows(self) -> torch.Tensor:
        return torch.cat(self.blocks) if len(self.blocks) != 1 else self.blocks[0]

    @property
    def n_rows(self) -> int:
        return sum(b.shape[0] for b in self.blocks)


def _until_recorded(run: Callable[[], Any]) -> Any:
    """``run()``, or None when a hook stopped it early (everything needed was recorded)."""
    try:
        return run()
    except StopForward:
        return None


def _fires(bufs: dict[str, _RowBuffer]) -> dict[str, int]:
    """How many times each group's module ran in a full pass (where a truncated pass may stop)."""
    return {g: len(b.blocks) for g, b in bufs.items()}


@contextmanager
def _count_runs(model: nn.Module, hook_keys: dict[str, str]) -> Iterator[dict[str, int]]:
    """Counts, per group, how many times its module runs inside the block; hooks always removed."""
    runs = dict.fromkeys(hook_keys, 0)
    handles = []

    def make(group: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            runs[group] += 1

        return hook

    try:
        for g, k in hook_keys.items():
            handles.append(_hook_module(model, k).register_forward_pre_hook(make(g)))
        yield runs
    finally:
        for h in handles:
            h.remove()


def _call_order(model: nn.Module, hook_keys: dict[str, str], run: Callable[[], Any]) -> list[str]:
    """Input groups in the order their modules first run during ``run()`` (groups never run go last)."""
    order: list[str] = []
    handles = []

    def make(group: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            if group not in order:
                order.append(group)

        return hook

    try:
        for g, k in hook_keys.items():
            handles.append(_hook_module(model, k).register_forward_pre_hook(make(g)))
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return order + [g for g in hook_keys if g not in order]


class _TeacherRows:
    """The teacher's text-encoder input rows of every group, per (row i, prompt): one full encode each.

    Kept only when they fit ``budget`` bytes; otherwise ``get`` encodes again, stopping at the group.
    """

    def __init__(
        self,
        model: nn.Module,
        hook_keys: dict[str, str],
        dims: dict[str, int],
        prompts: Sequence[Sequence[str]],
        teacher: Callable[[int], dict[str, DeltaLike]],
        select: Callable[[str], Callable[[torch.Tensor], torch.Tensor] | None],
        length: int,
        budget: int,
    ) -> None:
        self.model, self.hook_keys, self.teacher, self.select = model, hook_keys, teacher, select
        self.prompts = prompts
        n_prompts = sum(len(ps) for ps in prompts)
        self.cache: dict[tuple[int, int], dict[str, torch.Tensor]] | None = (
            {} if n_prompts * length * sum(dims.values()) * 4 <= budget else None
        )
        self.fires: dict[tuple[int, int], dict[str, int]] = {}

    def _encode(
        self, i: int, j: int, groups: dict[str, str], stop: dict[str, int] | None
    ) -> dict[str, _RowBuffer]:
        p = self.prompts[i][j]
        bufs = {g: _RowBuffer() for g in groups}
        hooks = _collect(self.model, bufs, groups, select=self.select(p), stop_after=stop)  # type: ignore[arg-type]
        with torch.no_grad(), hooked(self.model, self.teacher(i)), hooks:
            _until_recorded(lambda: self.model.get_learned_conditioning([p]))  # type: ignore[operator]
        return bufs

    def get(self, i: int, j: int, g: str) -> tuple[torch.Tensor, int]:
        """Rows of group ``g`` for prompt ``j`` of row ``i``, and how many times its module ran."""
        if (i, j) not in self.fires:
            bufs = self._encode(i, j, self.hook_keys, None)
            self.fires[i, j] = _fires(bufs)
            if self.cache is not None:
                self.cache[i, j] = {h: b.rows() for h, b in bufs.items() if b.blocks}
            return bufs[g].rows(), self.fires[i, j][g]
        if self.cache is not None:
            return self.cache[i, j][g], self.fires[i, j][g]
        bufs = self._encode(i, j, {g: self.hook_keys[g]}, {g: self.fires[i, j][g]})
        return bufs[g].rows(), self.fires[i, j][g]


class _Trajectory:
    """One concept's teacher-drawn sampling run, recorded: per canvas batch, its prompts, the teacher's and
    the student's conditioning, and every denoiser call's ``(x, σ)`` with how many times each hooked
    group's module ran in it. Replaying the calls gives each stage the same inputs as sampling again."""

    def __init__(self) -> None:
        self.batches: list[tuple[Any, Any, list[tuple[torch.Tensor, torch.Tensor, dict[str, int]]]]] = []


def _record_trajectory(
    model: nn.Module,
    prompts: Sequence[str],
    config: MergeConfig,
    teacher: dict[str, DeltaLike],
    teacher_te: dict[str, DeltaLike],
    student_te: dict[str, DeltaLike],
    hook_keys: dict[str, str],
) -> _Trajectory:
    """Sample ``prompts`` with the teacher (no CFG, ``config.sample_images`` seeded images per prompt,
    batched by canvas) and record every call (``_Trajectory``)."""
    from lib_loraclr.models.sampling import wrap_model

    by_shape: dict[Any, list[str]] = {}
    for p in prompts:
        shape = config.shape_for(p) if config.shape_for is not None else config.shape
        by_shape.setdefault(None if shape is None else tuple(shape), []).extend([p] * config.sample_images)
    inner = wrap_model(model)
    traj = _Trajectory()
    with hooked(model, teacher):
        for shape, ps in by_shape.items():
            with torch.no_grad():
                with hooked(model, teacher_te):
                    t_cond = model.get_learned_conditioning(ps)  # type: ignore[operator]
                with hooked(model, student_te):
                    s_cond = model.get_learned_conditioning(ps)  # type: ignore[operator]
            calls: list[tuple[torch.Tensor, torch.Tensor, dict[str, int]]] = []

            def den(
                x: torch.Tensor, sigma: torch.Tensor, t_cond: Any = t_cond, calls=calls, **_: Any
            ) -> torch.Tensor:
                with _count_runs(model, hook_keys) as runs:
                    out = inner(x, sigma, cond=t_cond)
                calls.append((x.clone(), sigma.clone(), runs))
                return out

            feature_run(model, ps, config, shape, denoiser=den)
            traj.batches.append((t_cond, s_cond, calls))
    return traj


def _replay(
    model: nn.Module,
    traj: _Trajectory,
    teacher: dict[str, DeltaLike],
    student: dict[str, DeltaLike],
    hook_keys: dict[str, str],
    sinks: dict[str, PairedStats],
) -> None:
    """Every recorded call once with the teacher's and once with the student's weights and conditioning,
    each pass stopped once ``hook_keys``' modules have run; rows go to ``sinks[group]`` aligned."""
    from lib_loraclr.models.sampling import wrap_model

    inner = wrap_model(model)
    swap = DeltaHooks(model)
    try:
        with torch.no_grad():
            for t_cond, s_cond, calls in traj.batches:
                for x, sigma, fires in calls:
                    stop = {g: fires[g] for g in hook_keys if fires.get(g)}
                    bt = {g: _RowBuffer() for g in sinks}
                    bs = {g: _RowBuffer() for g in sinks}
                    swap.use(teacher)
                    with _collect(model, bt, hook_keys, stop_after=stop):  # type: ignore[arg-type]
                        _until_recorded(lambda x=x, sigma=sigma, c=t_cond: inner(x, sigma, cond=c))
                    swap.use(student)
                    with _collect(model, bs, hook_keys, stop_after=stop):  # type: ignore[arg-type]
                        _until_recorded(lambda x=x, sigma=sigma, c=s_cond: inner(x, sigma, cond=c))
                    for g, sink in sinks.items():
                        if bs[g].blocks:
                            sink.add(bs[g].rows(), bt[g].rows())
    finally:
        swap.remove()


def merge_sequential(
    model: nn.Module,
    config: MergeConfig,
    by_group: dict[str, list[str]],
    own: list[dict[str, DeltaLike]],
    prompts: list[list[str]],
    n: int,
    n_rows: int,
    concepts: Sequence[Concept],
    merged: dict[str, DeltaLike],
    solve: Callable[..., None],
    tick: Callable[[str], None],
    release: Callable[[Sequence[str]], None] = lambda _keys: None,
) -> None:
    """Solve every layer in depth order (module docstring). ``own[i]``: concept i's ΔW per key (LoRA
    modules or dense; ``own[n]`` = {}: the base, for the neutral prompts); rows ``0 … n_rows-1`` join the
    solve, row ``n`` is the neutral one; ``solve(key, feats, neutral, paired=…)`` fits one layer into
    ``merged`` (its exact dense ΔW); ``release(keys)``: no later pass reads those keys' ΔW (the text encoder's,
    once every teacher run is recorded)."""
    enc = model.prompt_encoder  # type: ignore[attr-defined]
    rows = range(n + 1)

    def student(i: int, part: Sequence[str]) -> dict[str, DeltaLike]:
        return {k: merged[k] if k in merged else own[i][k] for k in part if k in merged or k in own[i]}

    def only(i: int, part: Sequence[str]) -> dict[str, DeltaLike]:
        return {k: own[i][k] for k in part if k in own[i]}

    # ---- text encoder: one input group at a time, in call order
    te_all = by_group["te"]
    te_keys = [k for k in te_all if _rowable(model, k)]
    if te_keys:
        fe = _Features(model, te_keys, config)
        order = _call_order(model, fe.hook_keys, lambda: model.get_learned_conditioning([prompts[0][0]]))  # type: ignore[operator]

        def select(p: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
            return _te_select(config, enc.eot_position(p))

        row_prompts = [prompts[min(i, n)] for i in rows]
        teacher_rows = _TeacherRows(
            model,
            fe.hook_keys,
            fe.dims,
            row_prompts,
            lambda i: only(i, te_all),
            select,
            getattr(enc, "max_length", 77),
            config.max_stats_bytes,
        )
        for g in order:
            tick(f"text encoder (sequential): {g}")
            paired = [PairedStats(fe.dims[g], config.sketch_rows, config.seed) for _ in rows]
            one = {g: fe.hook_keys[g]}
            for i in rows:
                for j, p in enumerate(row_prompts[i]):
                    xt, fires = teacher_rows.get(i, j, g)
                    bs = {g: _RowBuffer()}
                    stop = {g: fires} if fires else None
                    hooks = _collect(model, bs, one, select=select(p), stop_after=stop)  # type: ignore[arg-type]
                    with torch.no_grad(), hooked(model, student(i, te_all)), hooks:
                        _until_recorded(lambda p=p: model.get_learned_conditioning([p]))  # type: ignore[operator]
                    paired[i].add(bs[g].rows(), xt)
            for k in te_keys:
                if input_group(k) == g:
                    solve(k, [], paired[n].features, paired=paired[:n_rows])
        del teacher_rows, paired  # the teacher's recorded rows (SDXL: ~0.6 GB)
    for k in te_all:
        if k not in te_keys:
            solve(k, [None] * n, None)
    te_merged = {k: merged[k] for k in te_all}

    # ---- cross-attention K/V: student = the merged text encoder, teacher = the concept's own
    kv_keys = by_group["kv"]
    if kv_keys:
        tick("cross-attention K/V (sequential): encoding prompts")
        dim = _d_in(model, kv_keys[0])
        paired = [PairedStats(dim, config.sketch_rows, config.seed) for _ in rows]
        with torch.no_grad():
            for i in rows:
                for p in prompts[min(i, n)]:
                    with hooked(model, only(i, te_all)):
                        ct = _crossattn(model.get_learned_conditioning([p]))[0]  # type: ignore[operator]
                    with hooked(model, te_merged):
                        cs = _crossattn(model.get_learned_conditioning([p]))[0]  # type: ignore[operator]
                    eot = enc.eot_position(p)
                    pos = _kv_positions(
                        config, enc, p, concepts[i].trigger if i < n else None, eot, cs.shape[0]
                    )
                    paired[i].add(cs[pos].float(), ct[pos].float())
        for k in kv_keys:
            solve(k, [], paired[n].features, paired=paired[:n_rows])

    # ---- the other UNet layers: block by block in depth order, on each concept's recorded teacher run
    unet_all = by_group["unet"] + kv_keys
    row_keys = [k for k in by_group["unet"] if _rowable(model, k)]
    stages: dict[tuple[int, int], list[str]] = {}
    for k in row_keys:
        stages.setdefault(unet_stage(k), []).append(k)
    if stages:
        all_hooks = _Features(model, row_keys, config).hook_keys
        trajectories = []
        for i in rows:
            tick(f"UNet (sequential): teacher run {i + 1}/{n + 1}")
            ps = prompts[min(i, n)]
            ps = ps if config.effective_sample_prompts() == "all" else ps[:1]
            trajectories.append(
                _record_trajectory(
                    model, ps, config, only(i, unet_all), only(i, te_all), te_merged, all_hooks
                )
            )
    # the text encoder's merged ΔW has done its work (the K/V rows and every student conditioning are
    # recorded): from here it is kept at the saved file's rank
    te_merged = {}
    release(te_all)
    for si, (_stage, skeys) in enumerate(sorted(stages.items())):
        fe = _Features(model, skeys, config)
        sinks_all = [
            {g: PairedStats(d, config.sketch_rows, config.seed) for g, d in fe.dims.items()} for _ in rows
        ]
        for i in rows:
            tick(f"UNet (sequential): stage {si + 1}/{len(stages)}, run {i + 1}/{n + 1}")
            _replay(
                model, trajectories[i], only(i, unet_all), student(i, unet_all), fe.hook_keys, sinks_all[i]
            )
        for k in skeys:
            g = input_group(k)
            solve(k, [], sinks_all[n][g].features, paired=[sinks_all[i][g] for i in range(n_rows)])
    for k in by_group["unet"]:
        if k not in row_keys:
            solve(k, [None] * n, None)
