"""Per-branch LoRA application by forward hooks, with per-sample (per batch row) routing.

A *branch* is a list of ``(lora, weight)`` pairs; ``lora`` is a `DeltaSet`, a mapping of canonical keys
to `LoraModule`, or an iterable of `LoraModule`. `RoutedLoras` installs one forward hook on every targeted
``nn.Linear`` / ``nn.Conv2d`` and adds, for every batch row ``r`` that belongs to branch ``b``::

    out[r] += Σ_{(lora, w) in branch b}  w · m · scale · up(down(x[r]))        (low rank)
    out[r] += Σ                          w · m · (x[r] · ΔWᵀ)                   (dense deltas)

(conv: a conv with the ``down`` kernel, the module's stride/padding/dilation, then a 1×1 ``up`` conv).
Weights are never written. The row → branch assignment is set per UNet call with `RoutedLoras.set_rows`
(a ``[R]`` integer tensor), so all branches × CFG halves run in ONE batched call; `RoutedLoras.select`
routes every row to one branch (e.g. while encoding that branch's prompt with its text-encoder LoRA).
LoRAs that every branch holds with the same weight (a style LoRA) are applied once to all rows.

Regions (per-region routing in one pass): `RoutedLoras.set_regions` gives every batch row a layout
``[R, K, H, W]`` (latent resolution, 0/1 or soft weights summing to 1); then a spatial module adds branch
k's LoRA only at the positions of region k (``out[r, p] += Σ_k w[r, k, p] · lora_k(x[r, p])``, the layout
resized to the module's resolution), and a context module (``attn2.to_k`` / ``attn2.to_v``, whose input is
the text) adds to each context token the LoRA of the region that token belongs to
(`RoutedLoras.context_tokens`: the regional cross-attention concatenates the regions' texts).

Use as a context manager: every hook is removed on exit, also on exceptions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..deltas import UNET_PREFIX as UNET_PREFIX  # re-exported by lib_loraclr.clora
from ..deltas import DeltaSet, LoraModule, is_unet_key
from ..keymap import fused_rows, split_fused
from .errors import RoutingError

LoraLike = DeltaSet | Mapping[str, LoraModule] | Iterable[LoraModule]
Branch = Sequence[tuple[LoraLike, float]]


def _modules_of(lora: LoraLike) -> list[LoraModule]:
    if isinstance(lora, DeltaSet):
        return list(lora.modules.values())
    if isinstance(lora, Mapping):
        return list(lora.values())
    mods = list(lora)
    for m in mods:
        if not isinstance(m, LoraModule):
            raise RoutingError(f"expected LoraModule entries, got {type(m).__name__}")
    return mods


@dataclass
class _Term:
    """One LoRA term on one module, factors pre-multiplied by weight · multiplier · scale (float32)."""

    down: torch.Tensor | None  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor | None  # [out, r] or [out, r, 1, 1]
    dense: torch.Tensor | None  # ΔW shaped like the weight (already scaled)


def _is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a host's linear layer that does not subclass it (Forge's
    ``ForgeOperations.Linear`` is a plain ``nn.Module`` with a 2-D ``weight`` and an ``F.linear`` forward)."""
    w = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) or (
        isinstance(w, torch.Tensor)
        and w.dim() == 2
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    )


def _make_term(module: nn.Module, lm: LoraModule, weight: float) -> _Term:
    factor = float(weight) * lm.multiplier * lm.scale
    w = module.weight
    is_conv = isinstance(module, nn.Conv2d)
    if lm.dense is not None:
        dense = lm.dense.detach().to(torch.float32) * factor
        if is_conv and dense.dim() == 2:
            dense = dense.reshape(*dense.shape, 1, 1)
        if not is_conv and dense.dim() == 4:
            dense = dense.flatten(1)
        if tuple(dense.shape) != tuple(w.shape):
            raise RoutingError(
                f"{lm.key}: delta shape {tuple(dense.shape)} does not match the weight {tuple(w.shape)}"
            )
        return _Term(None, None, dense)
    assert lm.down is not None and lm.up is not None
    down = lm.down.detach().to(torch.float32)
    up = lm.up.detach().to(torch.float32).flatten(1) * factor  # [out, r]
    if is_conv:
        if module.groups != 1:
            raise RoutingError(f"{lm.key}: low-rank LoRAs on grouped convolutions are not supported")
        if down.dim() == 2:
            down = down.reshape(*down.shape, 1, 1)
        up = up.reshape(*up.shape, 1, 1)
        expect = (up.shape[0], down.shape[1], down.shape[2], down.shape[3])
        if expect != tuple(w.shape):
            raise RoutingError(
                f"{lm.key}: LoRA shape {expect} does not match the conv weight {tuple(w.shape)}"
            )
    else:
        if down.dim() == 4:
            if down.shape[2:] != (1, 1):
                raise RoutingError(
                    f"{lm.key}: a {tuple(down.shape[2:])} conv LoRA cannot apply to a Linear layer"
                )
            down = down.flatten(1)
        if (up.shape[0], down.shape[1]) != tuple(w.shape):
            raise RoutingError(
                f"{lm.key}: LoRA shape {(up.shape[0], down.shape[1])} does not match the weight {tuple(w.shape)}"
            )
    return _Term(down, up, None)


class _LowRank:
    """Several low-rank terms concatenated along the rank: ``up_all(mask ⊙ down_all(x))``.

    ``col_branch[j]`` = the branch owning rank column j (-1: every row); the per-row column mask makes
    each row see only its branch's columns, so all branches cost two matmuls per module."""

    def __init__(self, terms: list[tuple[int, _Term]]) -> None:
        self.down = torch.cat([t.down for _, t in terms], dim=0)  # type: ignore[misc]
        self.up = torch.cat([t.up for _, t in terms], dim=1)  # type: ignore[misc]
        self.col_branch = torch.cat(
            [torch.full((t.down.shape[0],), b, dtype=torch.long) for b, t in terms]  # type: ignore[union-attr]
        )
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def factors(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        got = self._cast.get((dtype, device))
        if got is None:
            got = (self.down.to(device=device, dtype=dtype), self.up.to(device=device, dtype=dtype))
            self._cast[(dtype, device)] = got
        return got

    def row_mask(
        self, version: int, rows: torch.Tensor, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """``[R, Σr]`` 0/1: row r uses column j iff col_branch[j] is r's branch (or -1)."""
        key = (version, dtype, device)
        m = self._masks.get(key)
        if m is None:
            cb = self.col_branch
            m = ((rows[:, None] == cb[None, :]) | (cb[None, :] < 0)).to(device=device, dtype=dtype)
            self._masks = {key: m}
        return m

    def apply(self, module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        down, up = self.factors(x.dtype, x.device)
        if isinstance(module, nn.Conv2d):
            h = F.conv2d(x, down, stride=module.stride, padding=module.padding, dilation=module.dilation)
            if mask is not None:
                h = h * mask.reshape(*mask.shape, 1, 1)
            return F.conv2d(h, up)
        h = F.linear(x, down)
        if mask is not None:
            h = h * mask.reshape(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1])
        return F.linear(h, up)


def _apply_dense(module: nn.Module, x: torch.Tensor, dense: list[torch.Tensor]) -> torch.Tensor:
    total = sum(dense[1:], dense[0]).to(device=x.device, dtype=x.dtype)
    if isinstance(module, nn.Conv2d):
        return F.conv2d(
            x,
            total,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
        )
    return F.linear(x, total)


class _Plan:
    """Everything one hooked module adds: shared terms (all rows) and per-branch terms."""

    def __init__(self, module: nn.Module, shared: list[_Term], per_branch: dict[int, list[_Term]]) -> None:
        self.module = module
        self.is_context = False  # attn2.to_k / to_v: the input is the text, not image positions
        low = [(-1, t) for t in shared if t.dense is None]
        self.shared_dense = [t.dense for t in shared if t.dense is not None]
        branch_low = [(b, t) for b, ts in sorted(per_branch.items()) for t in ts if t.dense is None]
        self.shared_low = _LowRank(low) if low else None
        self.branch_low = _LowRank(branch_low) if branch_low else None
        self.single_low = {
            b: _LowRank([(b, t) for t in ts if t.dense is None])
            for b, ts in per_branch.items()
            if any(t.dense is None for t in ts)
        }
        self.branch_dense = {
            b: [t.dense for t in ts if t.dense is not None]
            for b, ts in per_branch.items()
            if any(t.dense is not None for t in ts)
        }


_MHA_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)
_MHA_DEFAULTS = {
    "key_padding_mask": None,
    "need_weights": True,
    "attn_mask": None,
    "average_attn_weights": True,
    "is_causal": False,
}


class _MhaPlan:
    """LoRA terms on one ``nn.MultiheadAttention`` (OpenCLIP's fused ``in_proj`` rows ``q``/``k``/``v`` and its
    ``out_proj``, which the module uses as weights, never calling ``out_proj``): ``(part, term)`` pairs with
    part in ``q``/``k``/``v``/``o``, shared by all rows or per branch."""

    def __init__(
        self,
        module: nn.MultiheadAttention,
        shared: list[tuple[str, _Term]],
        per_branch: dict[int, list[tuple[str, _Term]]],
    ) -> None:
        self.module = module
        self.shared = shared
        self.per_branch = per_branch


def _term_delta(t: _Term) -> torch.Tensor:
    """ΔW ``[out, in]`` of a linear term (float32, weight · multiplier · scale included)."""
    if t.dense is not None:
        return t.dense
    assert t.up is not None and t.down is not None
    return t.up @ t.down


def _mha_with_deltas(
    mha: nn.MultiheadAttention, terms: list[tuple[str, _Term]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The MultiheadAttention's output for the call ``(args, kwargs)`` with ``in_proj_weight`` and
    ``out_proj.weight`` plus the terms' ΔW (weights are not written): ``(attn_output, attn_weights)``."""
    call = dict(_MHA_DEFAULTS)
    call.update(zip(_MHA_ARGS, args))
    call.update(kwargs)
    w_in, w_out = mha.in_proj_weight, mha.out_proj.weight
    d_in = torch.zeros(w_in.shape, dtype=torch.float32, device=w_in.device)
    d_out = torch.zeros(w_out.shape, dtype=torch.float32, device=w_out.device)
    for part, t in terms:
        delta = _term_delta(t).to(w_in.device)
        if part == "o":
            d_out += delta
        else:
            d_in[fused_rows(part, w_in.shape[0])] += delta
    q, k, v = call["query"], call["key"], call["value"]
    if mha.batch_first:
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    out, weights = F.multi_head_attention_forward(
        q,
        k,
        v,
        mha.embed_dim,
        mha.num_heads,
        w_in + d_in.to(w_in.dtype),
        mha.in_proj_bias,
        mha.bias_k,
        mha.bias_v,
        mha.add_zero_attn,
        mha.dropout,
        w_out + d_out.to(w_out.dtype),
        mha.out_proj.bias,
        training=mha.training,
        key_padding_mask=call["key_padding_mask"],
        need_weights=call["need_weights"],
        attn_mask=call["attn_mask"],
        average_attn_weights=call["average_attn_weights"],
        is_causal=call["is_causal"],
    )
    return (out.transpose(0, 1) if mha.batch_first else out), weights


def _split_shared(
    items: Sequence[tuple[int, Any, Any]], n_branches: int, make: Callable[[Any], Any]
) -> tuple[list[Any], dict[int, list[Any]]]:
    """Terms of one module: ``items`` = ``(branch, identity, payload)``; a term whose identity (LoRA module,
    weight …) is in every branch is made once (``make(payload)``) and applied to all rows (``shared``), the
    others per branch. Returns ``(shared, per_branch)`` in the order of ``items``."""
    ids = [{ident for b, ident, _ in items if b == k} for k in range(n_branches)]
    common = set.intersection(*ids) if n_branches > 0 else set()
    shared: list[Any] = []
    per_branch: dict[int, list[Any]] = {}
    done: set[Any] = set()
    for b, ident, payload in items:
        if ident in common:
            if ident not in done:
                shared.append(make(payload))
                done.add(ident)
            continue
        per_branch.setdefault(b, []).append(make(payload))
    return shared, per_branch


class RoutedLoras:
    """Forward hooks that apply each branch's LoRAs to the batch rows of that branch.

    Args:
        model: the module the keys resolve in: the WebUI/Tiny model object (canonical keys) or a bare
            sub-model, with ``prefix`` stripped from the keys (e.g. the ldm UNet alone:
            ``prefix="model.diffusion_model."``). Keys that do not start with ``prefix`` are skipped
            (listed in `skipped`), e.g. text-encoder keys when ``model`` is the UNet.
        branches: ``branches[b]`` = list of ``(lora, weight)`` of branch ``b`` (may be empty: no LoRA).
        key_filter: optional predicate on canonical keys (e.g. `is_unet_key`) to restrict the hooks.
        path_of: optional map from a canonical key below ``prefix`` to its module path in ``model`` (None:
            skipped), for a model whose names differ from the canonical ones, e.g. Forge's transformers-named
            OpenCLIP bigG (`lib_loraclr.keymap.te_hf_module_path`: ``…attn.in_proj:q`` → the separate
            ``…self_attn.q_proj``). Without it the path is the key with ``prefix`` stripped.

    OpenCLIP attention (an ``nn.MultiheadAttention``: A1111's SDXL bigG, SD2 ViT-H) uses its fused
    ``in_proj_weight`` and ``out_proj.weight`` inside one functional call, so hooks on Linears cannot reach
    it: the keys ``…attn.in_proj:q/k/v`` and ``…attn.out_proj`` of such a module are applied by a forward
    hook on the MultiheadAttention that recomputes its output with ``W + ΔW`` (weights not written) for
    the selected branch. Those routes follow `select` and shared terms only (text encoders), not
    `set_rows` / `set_regions`.

    Raises `RoutingError` for keys whose module does not exist, fused keys on a module that is not a
    MultiheadAttention, and shape mismatches — before installing any hook.
    """

    def __init__(
        self,
        model: nn.Module,
        branches: Sequence[Branch],
        prefix: str = "",
        key_filter: Callable[[str], bool] | None = None,
        path_of: Callable[[str], str | None] | None = None,
    ) -> None:
        self.model = model
        self.n_branches = len(branches)
        self.skipped: list[str] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._rows: torch.Tensor | None = None
        self._row_index: dict[int, torch.Tensor] = {}
        self._all_rows_branch: int | None = None
        self._regions: torch.Tensor | None = None
        self._cached_regions: torch.Tensor | None = None  # the layout `_region_cache` was made for
        self._region_cache: dict[tuple[object, ...], torch.Tensor] = {}
        self._context_tokens: torch.Tensor | None = None
        self._version = 0
        self._routes: dict[str, _Plan] = {}
        entries: dict[str, list[tuple[int, LoraModule, float]]] = {}  # module path → terms
        names: dict[str, str] = {}  # module path → the (first) canonical key routed there
        # MultiheadAttention path → (branch, LoRA module, weight, part q/k/v/o)
        mha_entries: dict[str, list[tuple[int, LoraModule, float, str]]] = {}
        self._mha_routes: dict[str, _MhaPlan] = {}
        for b, branch in enumerate(branches):
            for lora, weight in branch:
                for lm in _modules_of(lora):
                    key = lm.key
                    if key_filter is not None and not key_filter(key):
                        continue
                    if prefix and not key.startswith(prefix):
                        self.skipped.append(key)
                        continue
                    if path_of is not None:
                        path = path_of(key)
                        if path is None:
                            self.skipped.append(key)
                            continue
                    else:
                        path = key[len(prefix) :]
                    mha_part = self._mha_part(model, path, key)
                    if mha_part is not None:
                        mha_entries.setdefault(mha_part[0], []).append((b, lm, float(weight), mha_part[1]))
                        continue
                    entries.setdefault(path, []).append((b, lm, float(weight)))
                    names.setdefault(path, key)
        for path, items in entries.items():
            try:
                module = model.get_submodule(path)
            except AttributeError as e:
                raise RoutingError(
                    f"LoRA key {names[path]!r} names no module of this model ({path!r})"
                ) from e
            if not (isinstance(module, nn.Conv2d) or _is_linear(module)):
                raise RoutingError(
                    f"LoRA key {names[path]!r} targets a {type(module).__name__}; only Linear and Conv2d are supported"
                )
            shared, per_branch = _split_shared(
                [(b, (id(lm), w), (lm, w)) for b, lm, w in items],
                self.n_branches,
                lambda t, module=module: _make_term(module, *t),
            )
            self._routes[path] = _Plan(module, shared, per_branch)
            self._routes[path].is_context = path.endswith(("attn2.to_k", "attn2.to_v"))
        for path, mitems in mha_entries.items():
            mha = model.get_submodule(path)

            def term(t: tuple[LoraModule, float, str], mha: nn.MultiheadAttention = mha) -> tuple[str, _Term]:
                lm, w, part = t
                if part == "o":
                    return part, _make_term(mha.out_proj, lm, w)
                rows = fused_rows(part, mha.in_proj_weight.shape[0])
                return part, _make_term(SimpleNamespace(weight=mha.in_proj_weight[rows]), lm, w)

            mshared, mper = _split_shared(
                [(b, (id(lm), w, part), (lm, w, part)) for b, lm, w, part in mitems], self.n_branches, term
            )
            self._mha_routes[path] = _MhaPlan(mha, mshared, mper)

    @staticmethod
    def _mha_part(model: nn.Module, path: str, key: str) -> tuple[str, str] | None:
        """``(MultiheadAttention path, part)`` for a fused ``…in_proj:q/k/v`` path (part ``q``/``k``/``v``) or
        the ``…out_proj`` of a MultiheadAttention (part ``o``); None for any other module path."""
        if ":" in path:
            try:
                mpath, part = split_fused(path)
            except KeyError as e:
                raise RoutingError(f"LoRA key {key!r}: {e.args[0]}") from e
        elif path.endswith(".out_proj") or path == "out_proj":
            mpath, part = path[: -len(".out_proj")] if "." in path else "", "o"
        else:
            return None
        try:
            module = model.get_submodule(mpath)
        except AttributeError as e:
            if part == "o":
                return None  # reported with the other keys that name no module
            raise RoutingError(f"LoRA key {key!r} names no module of this model ({mpath!r})") from e
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            return mpath, str(part)
        if part == "o":
            return None  # a plain out_proj Linear (transformers / Forge names)
        raise RoutingError(f"LoRA key {key!r}: {mpath!r} is a {type(module).__name__}, not a fused attention")

    # ------------------------------------------------------------------ hooks
    @property
    def n_modules(self) -> int:
        """Number of hooked modules (Linear / Conv2d, and MultiheadAttention for OpenCLIP keys)."""
        return len(self._routes) + len(self._mha_routes)

    def install(self) -> RoutedLoras:
        if self._handles:
            return self
        try:
            for plan in self._routes.values():
                self._handles.append(plan.module.register_forward_hook(self._make_hook(plan)))
            for mplan in self._mha_routes.values():
                self._handles.append(
                    mplan.module.register_forward_hook(self._make_mha_hook(mplan), with_kwargs=True)
                )
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> RoutedLoras:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ routing state
    def set_rows(self, branch_of_row: torch.Tensor | Sequence[int]) -> None:
        """Route batch row ``r`` of the next calls to branch ``branch_of_row[r]`` (``[R]`` integers)."""
        rows = torch.as_tensor(branch_of_row, dtype=torch.long).flatten().cpu()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.n_branches):
            raise RoutingError(f"branch index out of range 0..{self.n_branches - 1}: {rows.tolist()}")
        if self._rows is not None and torch.equal(rows, self._rows):
            return  # same layout as the last call (select() clears _rows): cached row masks stay valid
        self._rows = rows
        self._version += 1
        self._all_rows_branch = None
        self._row_index = {int(b): torch.nonzero(rows == b).flatten() for b in rows.unique().tolist()}
        if len(self._row_index) == 1:
            self._all_rows_branch = int(rows[0])

    def select(self, branch: int) -> None:
        """Route every row of the next calls to ``branch`` (whatever the batch size)."""
        if not 0 <= branch < self.n_branches:
            raise RoutingError(f"branch {branch} out of range 0..{self.n_branches - 1}")
        self._rows = None
        self._row_index = {}
        self._regions = None
        self._all_rows_branch = int(branch)

    def set_regions(self, weights: torch.Tensor | None) -> None:
        """Per-region routing for the next calls: ``weights`` ``[R, K, H, W]`` (K = branches, H × W the
        latent), or None to leave region mode."""
        if weights is not None and (weights.dim() != 4 or weights.shape[1] != self.n_branches):
            raise RoutingError(
                f"region weights must be [R, {self.n_branches}, H, W], got {tuple(weights.shape)}"
            )
        self._regions = weights
        self._context_tokens = None
        if weights is not None:
            last = self._cached_regions
            if last is None or last.shape != weights.shape or not torch.equal(last, weights):
                # a new layout; the same one as before (every step of a frozen layout) keeps the resized weights
                self._region_cache = {}
                self._cached_regions = weights
            self._rows = None
            self._row_index = {}
            self._all_rows_branch = None

    def context_tokens(self, branch_of_token: torch.Tensor | None) -> None:
        """In region mode: ``[T]`` the branch of every context token (the concatenated region texts) whose
        LoRA the context modules (attn2 K/V) add to that token; None = no LoRA on the context."""
        self._context_tokens = None if branch_of_token is None else branch_of_token.long().cpu()

    def _region_weights(
        self, spatial: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """``[R, K, h, w]`` region weights at a module's resolution (nearest; cached per call layout)."""
        from .attention import map_hw

        assert self._regions is not None
        key = (spatial, dtype, device)
        got = self._region_cache.get(key)
        if got is None:
            H, W = self._regions.shape[-2:]
            hw = tuple(spatial) if len(spatial) == 2 else map_hw(spatial[0], H, W)
            got = (
                F.interpolate(self._regions.float(), size=hw, mode="nearest")
                if hw != (H, W)
                else self._regions
            )
            got = got.to(device=device, dtype=dtype)
            self._region_cache[key] = got
        return got

    def _apply_regions(
        self, plan: _Plan, module: nn.Module, x: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """Region mode: add each branch's terms where its region is (spatial modules) or the context
        branch's terms everywhere (context modules)."""
        if plan.is_context:
            tok = self._context_tokens
            if tok is None:
                return out
            if tok.numel() != x.shape[1]:
                raise RoutingError(
                    f"RoutedLoras: {x.shape[1]} context tokens, the regions name {tok.numel()}"
                )
            tok = tok.to(x.device)
            if plan.branch_low is not None:
                low = plan.branch_low
                down, up = low.factors(x.dtype, x.device)
                cols = low.col_branch.to(x.device)
                h = F.linear(x, down) * (tok[:, None] == cols[None, :]).to(x.dtype)  # [R, T, Σr]
                out = out + F.linear(h, up).to(out.dtype)
            for b, dense in plan.branch_dense.items():
                sel = (tok == b).to(x.dtype)[None, :, None]
                out = out + (_apply_dense(module, x, dense) * sel).to(out.dtype)
            return out
        conv = x.dim() == 4
        spatial = tuple(out.shape[-2:]) if conv else (x.shape[1],)
        w = self._region_weights(spatial, x.dtype, x.device)  # [R, K, h, w]
        if w.shape[0] != x.shape[0]:
            raise RoutingError(
                f"RoutedLoras: the batch has {x.shape[0]} rows but the regions cover {w.shape[0]}"
            )
        if plan.branch_low is not None:
            low = plan.branch_low
            down, up = low.factors(x.dtype, x.device)
            key = (spatial, id(low), conv, x.dtype, x.device)
            cw = self._region_cache.get(key)  # the weights expanded to the rank columns
            if cw is None:
                cols = low.col_branch.to(x.device)  # [Σr]
                cw = w[:, cols] if conv else w.flatten(2).transpose(1, 2)[:, :, cols].contiguous()
                self._region_cache[key] = cw
            if conv:
                h = F.conv2d(x, down, stride=module.stride, padding=module.padding, dilation=module.dilation)
                out = out + F.conv2d(h * cw, up).to(out.dtype)  # cw: [R, Σr, h, w]
            else:
                out = out + F.linear(F.linear(x, down) * cw, up).to(out.dtype)  # cw: [R, N, Σr]
        for b, dense in plan.branch_dense.items():
            d = _apply_dense(module, x, dense)
            wb = w[:, b : b + 1] if conv else w[:, b].flatten(1)[:, :, None]
            out = out + (d * wb).to(out.dtype)
        return out

    def _make_mha_hook(self, plan: _MhaPlan) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            terms = list(plan.shared)
            if plan.per_branch:
                if self._regions is not None or self._all_rows_branch is None:
                    raise RoutingError(
                        "RoutedLoras: LoRAs on a fused OpenCLIP attention are routed per branch only with "
                        "select() (one branch for all rows, as when encoding a prompt)"
                    )
                terms += plan.per_branch.get(self._all_rows_branch, [])
            if not terms:
                return output
            return _mha_with_deltas(plan.module, terms, args, kwargs)  # type: ignore[arg-type]

        return hook

    def _make_hook(self, plan: _Plan) -> Callable[..., Any]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            out = output
            if plan.shared_low is not None:
                out = out + plan.shared_low.apply(module, x, None).to(out.dtype)
            if plan.shared_dense:
                out = out + _apply_dense(module, x, plan.shared_dense).to(out.dtype)
            if plan.branch_low is None and not plan.branch_dense:
                return out
            if self._regions is not None:
                return self._apply_regions(plan, module, x, out)
            if self._all_rows_branch is not None:
                k = self._all_rows_branch
                if k in plan.single_low:
                    out = out + plan.single_low[k].apply(module, x, None).to(out.dtype)
                if k in plan.branch_dense:
                    out = out + _apply_dense(module, x, plan.branch_dense[k]).to(out.dtype)
                return out
            if self._rows is None:
                raise RoutingError(
                    "RoutedLoras: no rows set; call set_rows() or select() before the model call"
                )
            if self._rows.numel() != x.shape[0]:
                raise RoutingError(
                    f"RoutedLoras: the batch has {x.shape[0]} rows but the routing covers {self._rows.numel()}"
                )
            if plan.branch_low is not None:
                mask = plan.branch_low.row_mask(self._version, self._rows, x.dtype, x.device)
                out = out + plan.branch_low.apply(module, x, mask).to(out.dtype)
            for b, dense in plan.branch_dense.items():
                idx = self._row_index.get(b)
                if idx is None:
                    continue
                idx = idx.to(x.device)
                out = out.index_add(0, idx, _apply_dense(module, x.index_select(0, idx), dense).to(out.dtype))
            return out

        return hook


def te_branch_conds(
    encode: Callable[[list[str]], Any],
    prompts: Sequence[Sequence[str]],
    router: RoutedLoras | None = None,
) -> list[Any]:
    """Encode each branch's prompts with that branch's text-encoder LoRAs active.

    ``prompts[b]`` = the prompts (one per image, or cond + uncond) of branch ``b``; ``encode`` is the
    model's prompt encoder (e.g. ``SD1Model.get_learned_conditioning``); ``router`` holds hooks on the text
    encoder (a `RoutedLoras` built with ``key_filter=lambda k: not is_unet_key(k)``), or None.
    Returns ``[encode(prompts[b]) for b]``. Hooks are installed only for the duration of the call.
    """
    out = []
    if router is None:
        return [encode(list(p)) for p in prompts]
    with router:
        for b, p in enumerate(prompts):
            router.select(b)
            out.append(encode(list(p)))
    return out


def te_key(key: str) -> bool:
    """Key filter: text-encoder keys."""
    return not is_unet_key(key)


def routable_te_key(key: str) -> bool:
    """Key filter: text-encoder keys other than the fused OpenCLIP ``in_proj`` slices ``…:q`` / ``…:k`` /
    ``…:v`` (`te_router` routes those too, through the MultiheadAttention)."""
    return te_key(key) and ":" not in key


def has_te_parts(loras: Iterable[DeltaSet]) -> bool:
    """Whether any of ``loras`` has a text-encoder module."""
    return any(any(te_key(k) for k in getattr(d, "modules", {})) for d in loras)


def concept_branches(specs: Sequence[Any], weight: str) -> list[list[tuple[Any, float]]]:
    """Branch LoRA lists of bound concepts: branch 0 without LoRA, branch k = concept k's LoRA at its
    ``weight`` attribute (``specs[k-1].deltas``, ``.unet_weight`` / ``.te_weight``)."""
    return [[]] + [[(s.deltas, float(getattr(s, weight)))] for s in specs]


def unet_router(unet: nn.Module, specs: Sequence[Any]) -> RoutedLoras:
    """Per-branch UNet LoRA hooks of bound concepts (`concept_branches`), keys below `UNET_PREFIX`."""
    return RoutedLoras(
        unet, concept_branches(specs, "unet_weight"), prefix=UNET_PREFIX, key_filter=is_unet_key
    )


def te_router(
    roots: Sequence[tuple[nn.Module, str] | tuple[nn.Module, str, Callable[[str], str | None]]],
    specs: Sequence[Any],
) -> CompositeRouter | None:
    """Per-branch text-encoder LoRA hooks of bound concepts on each text encoder of ``roots``:
    ``(module, canonical prefix)`` (module paths = keys without the prefix; OpenCLIP's fused attention
    through its MultiheadAttention) or ``(module, canonical prefix, path_of)`` (`RoutedLoras`'s ``path_of``,
    e.g. Forge's transformers-named encoders). None when no LoRA has a text-encoder module there."""
    branches = concept_branches(specs, "te_weight")
    routers = [
        RoutedLoras(m, branches, prefix=prefix, key_filter=te_key, path_of=rest[0] if rest else None)
        for m, prefix, *rest in roots
    ]
    routers = [r for r in routers if r.n_modules]
    return CompositeRouter(routers) if routers else None


class CompositeRouter:
    """Several `RoutedLoras` (e.g. SDXL's two text encoders) driven as one (``select``, install / remove)."""

    def __init__(self, routers: Sequence[RoutedLoras]) -> None:
        self.routers = list(routers)

    def select(self, branch: int) -> None:
        for r in self.routers:
            r.select(branch)

    def install(self) -> CompositeRouter:
        for r in self.routers:
            r.install()
        return self

    def remove(self) -> None:
        for r in self.routers:
            r.remove()

    def __enter__(self) -> CompositeRouter:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()
