"""Where does cross-attention localise the concepts? A per-layer, per-step, per-branch diagnostic.

    python bench/clora_masks.py --n 2 --samples 32 --seed 5 --cfg 3 --out out/clora_masks

Runs CLoRA (masks only, so the maps are the model's own) on two-concept scenes of the measuring world
("a sks and a ohwx", every ordered pair of the first N concepts) and on compose scenes ("a sks and a 7"),
records the cross-attention maps of EVERY ``attn2`` layer at every step, separately for each branch
(branch 0 = the base prompt without LoRA, branch k = concept k's prompt with its LoRA), and prints:

- ``loc``: the share of (image, concept) pairs whose min–max-normalised token map puts more mass on the
  concept's own 8×8 slot than on the other slot (1.0 = always right, 0.5 = chance), per layer and step
  bucket, for the concept's tokens in the base branch (``base``) and in its own LoRA branch (``own``);
- ``iou``: mean IoU against the scene's slots of the layout that `lib_loraclr.clora.masks.layout_masks`
  (the new default rule: each latent pixel goes to the concept whose normalised map is highest) builds
  from that layer alone, in the own branches; and of the paper's rule (``α·max`` threshold on each own
  branch, α = 0.3) as ``iou_paper``.

Then the same numbers for the layer SETS the estimator may use (the default `localizing_layers`, the
old lowest-resolution default, all layers), with the maps aggregated over the first steps as the
estimator does. Numbers go to stdout and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib_loraclr.clora.attention import (
    AttentionCapture,
    cross_attention_layers,
    localizing_layers,
    lowest_resolution_layers,
    map_hw,
)
from lib_loraclr.clora.masks import layout_masks, slot_masks
from lib_loraclr.world import data as wdata


class LayerRecorder:
    """Wraps ``inner_model``: in every gradient-free call, records each layer's maps ``[R, N, T]``."""

    def __init__(self, inner, unet, layers):
        self.inner, self.layers = inner, list(layers)
        self.caps = {name: AttentionCapture(unet, [name]) for name in self.layers}
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, x, sigma, cond=None, **kw):
        if torch.is_grad_enabled():
            return self.inner(x, sigma, cond=cond, **kw)
        for c in self.caps.values():
            c.install()
            c.reset()
        try:
            out = self.inner(x, sigma, cond=cond, **kw)
            self.calls.append({n: c.maps().detach() for n, c in self.caps.items()})
        finally:
            for c in self.caps.values():
                c.remove()
        return out

    def get_scalings(self, sigma):
        return self.inner.get_scalings(sigma)


def record(world, method, requests, cfg: float, seed: int, layers):
    """Per step: {layer: maps [B, K, N, T]} (cond half) for one batch of same-pattern requests."""
    den = method.denoiser(world, requests)
    rec = LayerRecorder(den.inner_model, den.unet, layers)
    den.inner_model = rec
    width = len(requests[0])
    world.sample([wdata.canonical_prompt(r) for r in requests], width, cfg, seed, denoiser=den)
    b, k = len(requests), den.n_branches
    steps = []
    for call in rec.calls:  # one no-grad call per step: rows = (cond, k) blocks then (uncond, k)
        steps.append({n: m[: b * k].reshape(k, b, *m.shape[1:]).transpose(0, 1) for n, m in call.items()})
    return steps, den


def _norm(a: torch.Tensor) -> torch.Tensor:
    lo = a.amin(dim=-1, keepdim=True)
    hi = a.amax(dim=-1, keepdim=True)
    return (a - lo) / (hi - lo).clamp_min(1e-12)


def localisation(maps: torch.Tensor, groups, slots, n_slots, hw, branch_of_group) -> list[float]:
    """Per (image, group): 1.0 when the normalised token map has more mass on the group's own slot.

    ``maps`` ``[B, K, N, T]``; ``branch_of_group(g)`` = the branch whose maps are read."""
    h, w = hw
    res = []
    for g, toks_by_branch in enumerate(groups):
        k = branch_of_group(g)
        a = _norm(maps[:, k][:, :, toks_by_branch[k]].mean(-1))  # [B, N]
        a = a.reshape(-1, h, w)
        sw = w // n_slots
        mass = torch.stack([a[:, :, s * sw : (s + 1) * sw].sum((1, 2)) for s in range(n_slots)], 1)
        own = slots[g]
        other = torch.cat([mass[:, :own], mass[:, own + 1 :]], 1).amax(1)
        res.extend((mass[:, own] > other).float().tolist())
    return res


def iou(masks: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean IoU over images and concept columns 1…K of binary ``[B, K, h, w]`` masks."""
    inter = (masks[:, 1:] * truth[:, 1:]).sum((2, 3))
    union = ((masks[:, 1:] + truth[:, 1:]) > 0).float().sum((2, 3)).clamp_min(1)
    return float((inter / union).mean())


def paper_masks(maps, mask_tokens, hw, threshold=0.3):
    from lib_loraclr.clora.masks import concept_masks

    return concept_masks(maps, mask_tokens, hw, threshold)


def run(args) -> dict:
    from quality import CloraMethod, load_world

    torch.set_num_threads(args.threads)
    t0 = time.time()
    world = load_world(steps=args.steps)
    unet = world.model.model.diffusion_model
    layers = cross_attention_layers(unet)
    names = ["sks", "ohwx", "szn", "mth", "yte", "mib", "niu", "zas"][: args.n]
    method = CloraMethod("recommended", masks_only=True)
    method.setup(world, names)
    pairs = [(a, b) for a in names for b in names if a != b]
    per_pair = max(1, args.samples // len(pairs))
    scenes = {"multi": [[a, b] for a, b in pairs]}
    known = [d for d in wdata.KNOWN][: max(1, per_pair)]
    scenes["compose"] = [[c, str(known[i % len(known)])] for i, c in enumerate(names)] + [
        [str(known[i % len(known)]), c] for i, c in enumerate(names)
    ]
    stats: dict = {}
    agg_sets = {
        "localizing (default)": localizing_layers(unet),
        "lowest-resolution (old default)": lowest_resolution_layers(unet),
        "all layers": layers,
    }
    agg: dict = {}
    for kind, patterns in scenes.items():
        for pat in patterns:
            concept_slots = [j for j, w in enumerate(pat) if w in world.concepts]
            reqs = []
            for i in range(per_pair):
                reqs.append(
                    [
                        w if w in world.concepts else str(known[(i + j) % len(known)])
                        for j, w in enumerate(pat)
                    ]
                )
            steps, den = record(world, method, reqs, args.cfg, args.seed * 1000 + len(stats), layers)
            groups, mask_tokens = den.groups, den.mask_tokens
            for si, per_layer in enumerate(steps):
                for name, maps in per_layer.items():
                    hw = map_hw(maps.shape[2], 8, 8 * len(pat))
                    key = (kind, name, si)
                    st = stats.setdefault(
                        key, {"base": [], "own": [], "iou": [], "iou_own": [], "iou_paper": []}
                    )
                    st["base"] += localisation(maps, groups, concept_slots, len(pat), hw, lambda g: 0)
                    st["own"] += localisation(maps, groups, concept_slots, len(pat), hw, lambda g: g + 1)
                    truth = slot_masks(len(reqs), len(pat), concept_slots, hw)
                    st["iou"].append(iou(layout_masks(maps, groups, hw), truth))
                    st["iou_own"].append(iou(layout_masks(maps, groups, hw, source="own"), truth))
                    st["iou_paper"].append(iou(paper_masks(maps, mask_tokens, hw), truth))
            # aggregated sets: mean over the first `freeze` steps, at the finest resolution of the set
            for set_name, set_layers in agg_sets.items():
                for freeze in (1, 3, 5, args.steps):
                    acc = None
                    for per_layer in steps[:freeze]:
                        m = _combine([per_layer[n] for n in set_layers], 8, 8 * len(pat))
                        acc = m if acc is None else acc + m
                    hw = map_hw(acc.shape[2], 8, 8 * len(pat))
                    truth = slot_masks(len(reqs), len(pat), concept_slots, hw)
                    a = agg.setdefault(
                        (kind, set_name, freeze),
                        {"iou": [], "iou_own": [], "iou_both": [], "iou_paper": [], "own": []},
                    )
                    a["iou"].append(iou(layout_masks(acc, groups, hw), truth))
                    a["iou_own"].append(iou(layout_masks(acc, groups, hw, source="own"), truth))
                    a["iou_both"].append(iou(layout_masks(acc, groups, hw, source="both"), truth))
                    a["iou_paper"].append(iou(paper_masks(acc, mask_tokens, hw), truth))
                    a["own"] += localisation(acc, groups, concept_slots, len(pat), hw, lambda g: g + 1)
        print(f"[{time.time() - t0:5.0f}s] {kind} done", flush=True)
    buckets = [(0, 3), (3, 8), (8, args.steps)]
    lines = []
    for kind in scenes:
        lines.append(f"\n== {kind} scenes (N={args.n}, {per_pair} images per pattern, cfg {args.cfg}) ==")
        lines.append(f"{'layer':44s} " + " ".join(f"{f'steps {a}-{b - 1}':>30s}" for a, b in buckets))
        lines.append(f"{'':44s} " + " ".join(f"{'base  own   iou iou_o paper':>30s}" for _ in buckets))
        for name in layers:
            cols = []
            for a, b in buckets:
                vals = {k: [] for k in ("base", "own", "iou", "iou_own", "iou_paper")}
                for si in range(a, b):
                    st = stats.get((kind, name, si))
                    if st:
                        for k in vals:
                            vals[k] += st[k]
                cols.append(" ".join(f"{statistics.fmean(vals[k]):5.2f}" for k in vals))
            lines.append(f"{name[:44]:44s} " + " ".join(f"{c:>30s}" for c in cols))
        lines.append(
            f"\n{'layer set (maps summed over steps < freeze)':44s} freeze  own   iou iou_o iou_b paper"
        )
        for set_name in agg_sets:
            for freeze in (1, 3, 5, args.steps):
                a = agg[(kind, set_name, freeze)]
                lines.append(
                    f"{set_name:44s} {freeze:6d} "
                    + " ".join(
                        f"{statistics.fmean(a[k]):5.2f}"
                        for k in ("own", "iou", "iou_own", "iou_both", "iou_paper")
                    )
                )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {
        "args": vars(args),
        "table": table,
        "layers": {str(k): {kk: statistics.fmean(v) for kk, v in st.items()} for k, st in stats.items()},
        "sets": {str(k): {kk: statistics.fmean(v) for kk, v in a.items()} for k, a in agg.items()},
        "seconds": time.time() - t0,
    }
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out / "results.json")
    return res


def _combine(maps: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Mean of ``[B, K, N_l, T]`` maps of several layers at the finest resolution among them."""
    from lib_loraclr.clora.attention import resize_maps

    n = max(m.shape[2] for m in maps)
    hw = map_hw(n, height, width)
    return torch.stack([resize_maps(m, map_hw(m.shape[2], height, width), hw) for m in maps]).mean(0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32, help="images per two-concept pattern set")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="out/clora_masks")
    return ap.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
