"""Per-layer sufficient statistics of a layer's inputs, with memory bounded independently of row count.

A layer ``y = x Wᵀ`` (bias excluded) seen by concept i on rows ``X_i [n_i, d_in]`` is summarised by

- the Gram matrix ``G_i = X_iᵀ X_i`` (float64, ``[d_in, d_in]``): every squared output norm on the concept's
  own inputs is a trace formula, ``‖X_i Mᵀ‖² = ⟨M G_i, M⟩`` for any ``M [d_out, d_in]``;
- a bounded, seeded row *sketch* (bottom-k sample by a hash of the global row index) used only by terms
  that pair row r of concept i with row r of concept j (the official code's cross-concept distances).

Targets are never stored: ``Y_i = X_i (W0 + ΔW_i)ᵀ`` is analytic given ``G_i`` and ``ΔW_i``.

While few rows have been seen (``n <= max_raw_rows``, default ``2·d_in``, i.e. while the raw rows take no
more memory than the Gram) rows are kept raw — exact and cheap for cross-attention K/V (a handful of token
rows) and text-encoder layers. Past that they are folded into the Gram and the sketch, and memory stays
constant: at most ``8·d_in² + sketch_rows·(4·d_in + 16)`` bytes whatever the number of sampling steps or
the resolution.

Alignment contract: rows get global indices 0, 1, 2, … in the order they are added. Feed every concept's
rows for one layer in the same order (same seeds, steps, resolution, prompt template) so that index r
means the same step×position for every concept; then the sketches of all concepts keep the same indices.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lib_loraclr.errors import ShapeMismatchError

_MASK53 = (1 << 53) - 1


def row_priorities(start: int, count: int, seed: int) -> torch.Tensor:
    """Seeded pseudo-random priorities (int64 in ``[0, 2^53)``) of global row indices ``start … start+count-1``.

    splitmix64 of ``index + seed·φ``; the same (seed, index) always gives the same priority, so concepts
    fed aligned rows select the same rows.
    """
    with np.errstate(over="ignore"):
        idx = np.arange(start, start + count, dtype=np.uint64)
        z = idx + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.int64))


def rows_from_conv_input(x: torch.Tensor) -> torch.Tensor:
    """Rows ``[B·H·W, C]`` of a 1×1-conv input ``[B, C, H, W]`` (row order: batch, then H, then W)."""
    if x.dim() != 4:
        raise ShapeMismatchError(f"a conv input must be [B, C, H, W], got shape {tuple(x.shape)}")
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def as_2d_weight(w: torch.Tensor, what: str = "weight") -> torch.Tensor:
    """A linear ``[out, in]`` or 1×1 conv ``[out, in, 1, 1]`` weight as ``[out, in]`` (a view when possible)."""
    if w.dim() == 2:
        return w
    if w.dim() == 4 and w.shape[2] == 1 and w.shape[3] == 1:
        return w.reshape(w.shape[0], w.shape[1])
    raise ShapeMismatchError(
        f"{what} has shape {tuple(w.shape)}; only linear [out, in] and 1x1 conv [out, in, 1, 1] layers "
        "can be merged per layer"
    )


class FeatureStats:
    """Bounded-memory statistics of one layer's input rows for one concept.

    d_in: row width (the layer's ``in_features`` / conv ``in_channels``).
    sketch_rows: size of the aligned row sketch (rows kept for cross-concept terms).
    seed: hash seed of the sketch; use the same seed for every concept of a layer.
    max_raw_rows: keep raw rows up to this count (default ``2·d_in``; 0 = fold into the Gram at once).
    device: where the statistics live (default CPU).
    product_dtype: dtype of each batch's ``XᵀX`` before it is added to the float64 Gram (default float32, as
        the activations themselves; ``torch.float64`` for bit-exact sums of float32 rows, ~2x slower on CPU).
    """

    def __init__(
        self,
        d_in: int,
        sketch_rows: int = 512,
        seed: int = 0,
        max_raw_rows: int | None = None,
        device: torch.device | str = "cpu",
        product_dtype: torch.dtype = torch.float32,
    ) -> None:
        if d_in <= 0:
            raise ValueError(f"d_in must be positive, got {d_in}")
        if sketch_rows < 0:
            raise ValueError(f"sketch_rows must be >= 0, got {sketch_rows}")
        self.d_in = int(d_in)
        self.sketch_rows = int(sketch_rows)
        self.seed = int(seed)
        self.max_raw_rows = 2 * self.d_in if max_raw_rows is None else int(max_raw_rows)
        self.device = torch.device(device)
        self.product_dtype = product_dtype
        self.n = 0
        self._raw: list[torch.Tensor] | None = []  # float32 row blocks while in raw mode
        self._gram: torch.Tensor | None = None  # float64 [d_in, d_in] once folded
        self._sk_x = torch.zeros(0, self.d_in, dtype=torch.float32, device=self.device)
        self._sk_idx = torch.zeros(0, dtype=torch.int64)
        self._sk_pri = torch.zeros(0, dtype=torch.int64)

    # ------------------------------------------------------------------ accumulation
    def add(self, x: torch.Tensor) -> None:
        """Add rows ``x [..., d_in]`` (any float dtype, any device); they get the next global indices."""
        if x.shape[-1] != self.d_in:
            raise ShapeMismatchError(
                f"rows have width {x.shape[-1]}, this layer's input width is {self.d_in}"
            )
        x = x.detach().reshape(-1, self.d_in).to(device=self.device, dtype=torch.float32)
        b = x.shape[0]
        if b == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise ValueError("layer input rows contain NaN or Inf (the sampler diverged?)")
        start = self.n
        self.n += b
        if self._raw is not None:
            self._raw.append(x.clone())
            if self.n > self.max_raw_rows:
                self._fold()
            return
        assert self._gram is not None
        xp = x.to(self.product_dtype)
        self._gram += (xp.T @ xp).double()
        self._sketch_update(x, start)

    def _fold(self) -> None:
        """Switch from raw rows to Gram + sketch."""
        assert self._raw is not None
        rows = torch.cat(self._raw) if self._raw else self._sk_x[:0]
        self._raw = None
        rd = rows.double()
        self._gram = rd.T @ rd
        self._sketch_update(rows, 0)

    def _sketch_update(self, x: torch.Tensor, start: int) -> None:
        k = self.sketch_rows
        if k == 0:
            return
        pri = row_priorities(start, x.shape[0], self.seed)
        if self._sk_pri.numel() >= k:  # pre-filter: only rows beating the current k-th priority matter
            keep = pri < self._sk_pri.max()
            if not bool(keep.any()):
                return
            sel = keep.nonzero().squeeze(1)
            x, pri, idx = x[sel.to(x.device)], pri[sel], sel + start
        else:
            idx = torch.arange(start, start + x.shape[0], dtype=torch.int64)
        all_pri = torch.cat([self._sk_pri, pri])
        all_idx = torch.cat([self._sk_idx, idx])
        all_x = torch.cat([self._sk_x, x])
        if all_pri.numel() > k:
            top = torch.topk(all_pri, k, largest=False).indices
            all_pri, all_idx, all_x = all_pri[top], all_idx[top], all_x[top.to(all_x.device)]
        order = torch.argsort(all_idx)
        self._sk_pri, self._sk_idx, self._sk_x = all_pri[order], all_idx[order], all_x[order.to(all_x.device)]

    # ------------------------------------------------------------------ accessors
    @property
    def is_raw(self) -> bool:
        """True while every row is still held raw (exact cross-concept terms)."""
        return self._raw is not None

    def rows(self) -> torch.Tensor | None:
        """All rows ``[n, d_in]`` float32 while in raw mode, else None."""
        if self._raw is None:
            return None
        if len(self._raw) != 1:
            self._raw = [torch.cat(self._raw)] if self._raw else []
        return self._raw[0] if self._raw else torch.zeros(0, self.d_in, device=self.device)

    def gram(self) -> torch.Tensor:
        """``Σ xᵀx`` float64 ``[d_in, d_in]``."""
        if self._gram is not None:
            return self._gram
        r = self.rows()
        assert r is not None
        rd = r.double()
        return rd.T @ rd

    def sketch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(global row indices ascending int64 ``[k]``, rows float32 ``[k, d_in]``), ``k <= sketch_rows``.

        In raw mode with ``n <= sketch_rows`` this is every row (then cross-concept terms are exact).
        """
        if self._raw is None:
            return self._sk_idx, self._sk_x
        r = self.rows()
        assert r is not None
        if self.n <= self.sketch_rows:
            return torch.arange(self.n, dtype=torch.int64), r
        pri = row_priorities(0, self.n, self.seed)
        top = torch.sort(torch.topk(pri, self.sketch_rows, largest=False).indices).values
        return top, r[top.to(r.device)]

    def factor(
        self, max_rank: int | None = None, rel_tol: float = 1e-10, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """A matrix ``L [p, d_in]`` (``dtype``) with ``LᵀL ≈ G``: ``‖X Mᵀ‖² ≈ ‖L Mᵀ‖²`` for every M.

        Raw rows when that is smaller than ``d_in`` (exact); otherwise ``Λ^½ Qᵀ`` from the Gram's
        eigendecomposition (computed in ``dtype``), eigenvalues below ``rel_tol·λ_max`` dropped, at most
        ``max_rank`` rows kept (the largest: the best rank-``max_rank`` approximation of G). Not cached.
        """
        r = self.rows()
        if r is not None and r.shape[0] <= self.d_in and (max_rank is None or r.shape[0] <= max_rank):
            out = r.to(dtype)
        else:
            evals, evecs = torch.linalg.eigh(self.gram().to(dtype))
            lam_max = float(evals[-1]) if evals.numel() else 0.0
            keep = evals > rel_tol * max(lam_max, 1e-300)
            evals, evecs = evals[keep], evecs[:, keep]
            if max_rank is not None and evals.numel() > max_rank:
                evals, evecs = evals[-max_rank:], evecs[:, -max_rank:]
            out = (evecs * evals.sqrt()).T.contiguous()
        return out

    def memory_bytes(self) -> int:
        """Bytes held by the statistics (raw rows or Gram, plus the sketch); caches excluded."""
        total = 0
        if self._raw is not None:
            total += sum(t.numel() * t.element_size() for t in self._raw)
        if self._gram is not None:
            total += self._gram.numel() * self._gram.element_size()
        if self._raw is None:
            for t in (self._sk_x, self._sk_idx, self._sk_pri):
                total += t.numel() * t.element_size()
        return int(total)

    def __repr__(self) -> str:
        mode = "raw" if self.is_raw else "gram"
        return f"FeatureStats(d_in={self.d_in}, n={self.n}, mode={mode}, bytes={self.memory_bytes()})"


class ConceptStats:
    """One concept at one layer: its input statistics and its own LoRA delta.

    features: the concept's input statistics (may be shared by layers reading the same input, e.g. q/k/v).
    delta: the concept's own ΔW_i at this layer, multiplier and alpha/rank included: a dense ``[d_out, d_in]``
        (or 1×1 conv ``[out, in, 1, 1]``) tensor, or a low-rank pair ``(up [d_out, r], down [r, d_in])`` with
        ``ΔW_i = up @ down`` (conv factors ``[out, r, 1, 1]`` / ``[r, in, 1, 1]`` accepted; scale folded in by
        the caller) — the pair form makes the cross-concept terms cheaper. None when this concept's LoRA does
        not touch the layer (ΔW_i = 0: the merge should keep the base output on this concept's inputs).
    weight: importance of the concept in the lsq / loraclr objectives (default 1).
    """

    def __init__(
        self,
        features: FeatureStats,
        delta: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        weight: float = 1.0,
        name: str = "",
    ) -> None:
        self.features = features
        self.name = name
        self.up: torch.Tensor | None = None
        self.down: torch.Tensor | None = None
        self._dense: torch.Tensor | None = None
        who = f"delta of concept {name or '?'}"
        if isinstance(delta, (tuple, list)):
            if len(delta) != 2:
                raise ShapeMismatchError(f"{who}: a low-rank delta is a pair (up, down)")
            up = as_2d_weight(delta[0], f"{who} (up)").detach().to(torch.float32).cpu()
            down = as_2d_weight(delta[1], f"{who} (down)").detach().to(torch.float32).cpu()
            if up.shape[1] != down.shape[0]:
                raise ShapeMismatchError(
                    f"{who}: up has rank {up.shape[1]} but down has rank {down.shape[0]}"
                )
            if down.shape[1] != features.d_in:
                raise ShapeMismatchError(f"{who} has {down.shape[1]} inputs, features have {features.d_in}")
            if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
                raise ValueError(f"{who} contains NaN or Inf")
            self.up, self.down = up, down
        elif delta is not None:
            dense = as_2d_weight(delta, who).detach().to(torch.float32).cpu()
            if dense.shape[1] != features.d_in:
                raise ShapeMismatchError(f"{who} has {dense.shape[1]} inputs, features have {features.d_in}")
            if not bool(torch.isfinite(dense).all()):
                raise ValueError(f"{who} contains NaN or Inf")
            self._dense = dense
        if not (weight >= 0.0):
            raise ValueError(f"concept weight must be >= 0, got {weight}")
        self.weight = float(weight)

    @property
    def delta(self) -> torch.Tensor | None:
        """Dense ΔW_i float32 ``[d_out, d_in]`` (computed once from the factors), or None."""
        if self._dense is None and self.up is not None and self.down is not None:
            self._dense = self.up @ self.down
        return self._dense

    @property
    def has_delta(self) -> bool:
        """False when this concept's LoRA does not touch the layer (ΔW_i = 0)."""
        return self.up is not None or self._dense is not None

    @property
    def is_low_rank(self) -> bool:
        return self.up is not None

    @classmethod
    def from_rows(
        cls,
        x: torch.Tensor,
        delta: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
        weight: float = 1.0,
        name: str = "",
        **fs_kwargs,
    ) -> ConceptStats:
        """Build from one block of rows ``x [..., d_in]`` (tests, small layers)."""
        fs = FeatureStats(x.shape[-1], **fs_kwargs)
        fs.add(x)
        return cls(fs, delta, weight=weight, name=name)

    def add(self, x: torch.Tensor) -> None:
        """Add input rows ``x [..., d_in]`` to the features."""
        self.features.add(x)

    @property
    def n(self) -> int:
        return self.features.n

    def delta_or_zeros(self, d_out: int) -> torch.Tensor:
        """ΔW_i as float32 ``[d_out, d_in]`` (zeros when the concept does not touch the layer)."""
        d = self.delta
        if d is None:
            return torch.zeros(d_out, self.features.d_in)
        if d.shape[0] != d_out:
            raise ShapeMismatchError(
                f"delta of concept {self.name or '?'} has {d.shape[0]} outputs, the layer has {d_out}"
            )
        return d

    def apply_delta_t(self, m: torch.Tensor) -> torch.Tensor:
        """``M ΔW_iᵀ`` for ``M [k, d_in]`` (through the factors when low-rank); ΔW_i must not be None."""
        if self.up is not None and self.down is not None:
            return (m @ self.down.T) @ self.up.T
        d = self.delta
        assert d is not None
        return m @ d.T

    def memory_bytes(self) -> int:
        """Bytes of the features plus the delta (dense and/or factors)."""
        ts = [t for t in (self._dense, self.up, self.down) if t is not None]
        return self.features.memory_bytes() + sum(t.numel() * t.element_size() for t in ts)


class PairedStats:
    """Statistics of one layer's inputs in the MERGED model (student) paired with the teacher's inputs.

    Sequential merging (GPTQ / progressive RegMean style) fits each layer on inputs ``X̃ [n, d_in]`` recorded
    from the partially merged model, to reproduce the teacher's output ``X (W0 + ΔW_i)ᵀ`` on the teacher's own
    inputs ``X`` at the same positions (same tokens, same sampling step: the teacher's trajectory). Kept:

    - ``features``: a :class:`FeatureStats` of the student rows ``X̃`` (Gram ``G̃``, sketch);
    - ``cross``: ``C = X̃ᵀX`` float64 ``[d_in, d_in]``;
    - ``drift_sq`` / ``teacher_sq``: ``‖X̃ − X‖²_F`` and ``‖X‖²_F`` (how far the inputs drifted).

    Memory: at most ``8·d_in²`` bytes on top of the FeatureStats, independent of the number of rows. While
    fewer than ``d_in`` row pairs have been added (a full-size SDXL block on the merge's 8×8 latent sees a
    few dozen) the aligned batches are kept instead (``8·d_in`` bytes per pair) and ``cross`` is summed from
    them when first read, batch by batch in the order they came: the same float64 sums, bit for bit.
    """

    def __init__(self, d_in: int, sketch_rows: int = 512, seed: int = 0) -> None:
        self.features = FeatureStats(d_in, sketch_rows, seed)
        self._cross: torch.Tensor | None = None  # float64 [d_in, d_in] once folded
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (student, teacher) float32 batches
        self._pair_rows = 0
        self.drift_sq = 0.0
        self.teacher_sq = 0.0

    @property
    def cross(self) -> torch.Tensor:
        """``C = X̃ᵀX`` float64 ``[d_in, d_in]`` (from here on accumulated directly)."""
        if self._cross is None:
            self._cross = self._cross_now()
            self._pairs, self._pair_rows = [], 0
        return self._cross

    @property
    def d_in(self) -> int:
        return self.features.d_in

    @property
    def n(self) -> int:
        return self.features.n

    def _cross_now(self) -> torch.Tensor:
        """``cross``, without keeping it when it is still held as row pairs (a solve reads it once)."""
        if self._cross is not None:
            return self._cross
        c = torch.zeros(self.d_in, self.d_in, dtype=torch.float64)
        for xs, xt in self._pairs:
            c += (xs.T @ xt).double()
        return c

    def add(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """Add aligned rows: ``student [..., d_in]`` (merged model) and ``teacher [..., d_in]`` (same shape)."""
        if student.shape != teacher.shape:
            raise ShapeMismatchError(
                f"student rows {tuple(student.shape)} and teacher rows {tuple(teacher.shape)} are not aligned"
            )
        xs = student.detach().reshape(-1, self.d_in).float().cpu()
        xt = teacher.detach().reshape(-1, self.d_in).float().cpu()
        self.features.add(xs)
        if self._cross is None and self._pair_rows + xs.shape[0] <= self.d_in:
            self._pairs.append((xs.clone(), xt.clone()))
            self._pair_rows += xs.shape[0]
        else:
            self.cross.add_((xs.T @ xt).double())
        self.drift_sq += float((xs - xt).pow(2).sum(dtype=torch.float64))
        self.teacher_sq += float(xt.pow(2).sum(dtype=torch.float64))

    @property
    def drift(self) -> float:
        """Relative input drift ``‖X̃ − X‖ / ‖X‖`` (0 when the merged model sees the teacher's inputs)."""
        return math.sqrt(self.drift_sq / self.teacher_sq) if self.teacher_sq > 0 else 0.0

    def effective_delta(
        self, w0: torch.Tensor, delta: torch.Tensor | None, ridge: float = 1e-2
    ) -> torch.Tensor:
        """The ΔW whose output on the STUDENT inputs best matches the teacher's output on its own inputs.

        ``argmin_Δ ‖X̃(W0 + Δ)ᵀ − X(W0 + ΔW)ᵀ‖² = ΔW + (W0 + ΔW)(Cᵀ − G̃)(G̃ + λI)^-1`` (exact for λ = 0 and an
        invertible G̃; ``λ = ridge·tr(G̃)/d_in`` shrinks the correction along directions the student rarely
        sees). Then ``‖X̃(W0+Δ)ᵀ − X(W0+ΔW)ᵀ‖² = ‖X̃(Δ − Δ_eff)ᵀ‖² + const`` (λ = 0), so every solver can use
        ``(features, Δ_eff)`` as an ordinary concept. No drift (X̃ = X) gives ``Δ_eff = ΔW``.

        w0: base weight ``[d_out, d_in]``; delta: the teacher's ΔW ``[d_out, d_in]`` (None = 0, a base teacher).
        Returns float32 ``[d_out, d_in]``.
        """
        w0d = as_2d_weight(w0, "base weight").double()
        dd = None if delta is None else as_2d_weight(delta, "delta").double()
        wt = w0d if dd is None else w0d + dd
        g = self.features.gram()
        d = g.shape[0]
        tr = float(g.diagonal().sum())
        lam = ridge * tr / d if tr > 0 else 0.0
        # at most three d×d float64 matrices at a time (bigG's 5120-wide input: 210 MB each): Cᵀ − G̃ is used
        # for rhs and dropped; G̃ + λI gets λ on its diagonal in place (the same sums as adding λ·I)
        a = (self._cross_now().T - g) if self.features.n else torch.zeros_like(g)
        rhs = wt @ a  # [d_out, d_in]
        del a
        gl = g.clone()
        gl.diagonal().add_(lam)
        del g
        chol, info = torch.linalg.cholesky_ex(gl)
        if int(info) == 0:
            corr = torch.cholesky_solve(rhs.T, chol).T
        else:
            corr = rhs @ torch.linalg.pinv(gl, hermitian=True)
        out = corr if dd is None else dd + corr
        return out.float()

    def memory_bytes(self) -> int:
        held = [self._cross] if self._cross is not None else [t for pair in self._pairs for t in pair]
        return self.features.memory_bytes() + sum(t.numel() * t.element_size() for t in held)
