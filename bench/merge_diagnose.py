"""Where does a merge lose fidelity? End-to-end fidelity in the measuring world with HYBRID weights.

    python bench/merge_diagnose.py --n 2 --method loraclr --samples 48 --seeds 0 --cfg 3 --threads 1
    python bench/merge_diagnose.py --n 2 --set sequential=block --ranks 8,16,32     # a variant, saved ranks

For every merged concept c, "a {trigger_c}" is sampled with weights that are the MERGED ΔW on one set of
layers and c's own LoRA everywhere else (the rest of the model exactly as with the single LoRA), and judged
as in ``bench/quality.py`` (fidelity = the image shows concept c). Rows:

- ``single``: own LoRA everywhere (the reference); ``merged``: the merged ΔW everywhere (= the merge);
- ``only <group>``: merged only on that group (``te`` text encoder, ``kv`` cross-attention K/V, ``unet``
  the other UNet layers), own LoRA elsewhere: fidelity lost by that group alone (``only kv`` feeds K/V that
  were fitted on the MERGED text encoder's output with the concept's own one: see ``only te+kv``);
- ``all but <group>``: merged everywhere except that group (own LoRA there): what fixing the group would win;
- ``only te.L<k>`` / ``only <block>``: per depth (one text-encoder layer; one UNet transformer block, its
  K/V and other layers together);
- ``rank <r>``: the merged ΔW re-ranked by truncated SVD to rank r per module (what a saved LoRA holds).

Columns: fidelity (mean over concepts) and its ratio to ``single``, per noise seed and mean ± half spread.
Prompts are ``bench/quality.py``'s fidelity cells (``--prompt-seed``), so numbers are comparable with it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality  # bench/quality.py: the world, its cells and judges

from lib_loraclr.merge.pipeline import layer_group


def depth_label(key: str) -> str:
    """Depth bucket of a canonical key: ``te.L<k>`` (text-encoder layer) or the UNet block path
    (``in1`` … ``mid`` … ``out5``)."""
    m = re.search(r"encoder\.layers\.(\d+)\.", key) or re.search(r"resblocks\.(\d+)\.", key)
    if layer_group(key) == "te":
        return f"te.L{m.group(1)}" if m else "te"
    m = re.search(r"(input_blocks|output_blocks)\.(\d+)\.", key)
    if m:
        return ("in" if m.group(1) == "input_blocks" else "out") + m.group(2)
    return "mid" if "middle_block" in key else "unet?"


class HybridMethod(quality.Method):
    """Per requested concept c: ``weights[c]`` (canonical key → dense ΔW) patched into the model."""

    multi_concept = False

    def __init__(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        self.weights = weights

    def context(self, world, concepts_in_request):
        from lib_loraclr.apply import patched

        if not concepts_in_request:
            return nullcontext()
        return patched(world.model, self.weights[concepts_in_request[0]])


def fidelity(
    world: quality.World, method: quality.Method, names: Sequence[str], requests, cfg: float, seed: int
) -> dict[str, float]:
    """Fraction of "a {trigger}" images that show their concept, per concept (``quality.evaluate``'s cell)."""
    _, reads, reqs = quality._run_cell(world, method, requests, cfg, seed)
    per: dict[str, list[bool]] = {n: [] for n in names}
    for r, rd in zip(reqs, reads):
        per[r[0]].append(world.judge.success(r, rd))
    return {n: sum(v) / len(v) for n, v in per.items() if v}


def hybrid_rows(
    names: Sequence[str],
    own: dict[str, dict[str, torch.Tensor]],
    merged: dict[str, torch.Tensor],
    ranks: Sequence[int],
) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Row label → concept → weights (dense ΔW per key) for every diagnostic row."""
    keys = sorted(merged)
    groups = {g: {k for k in keys if layer_group(k) == g} for g in ("te", "kv", "unet")}
    depths: dict[str, set[str]] = {}
    for k in keys:
        depths.setdefault(depth_label(k), set()).add(k)

    def mix(c: str, use_merged: set[str]) -> dict[str, torch.Tensor]:
        out = {k: merged[k] for k in use_merged}
        out.update({k: d for k, d in own[c].items() if k not in use_merged})
        return out

    rows: dict[str, dict[str, dict[str, torch.Tensor]]] = {
        "single": {c: own[c] for c in names},
        "merged": {c: merged for c in names},
    }
    for g, ks in groups.items():
        if ks:
            rows[f"only {g}"] = {c: mix(c, ks) for c in names}
    if groups["te"] and groups["kv"]:  # K/V were fitted on the merged text encoder's output: the pair
        rows["only te+kv"] = {c: mix(c, groups["te"] | groups["kv"]) for c in names}
    for g, ks in groups.items():
        if ks:
            rows[f"all but {g}"] = {c: mix(c, set(keys) - ks) for c in names}
    for lab, ks in sorted(depths.items(), key=lambda kv: _depth_order(kv[0])):
        rows[f"only {lab}"] = {c: mix(c, ks) for c in names}
    if ranks:
        from lib_loraclr.writers import to_low_rank

        for r in ranks:
            lr = {}
            for k, d in merged.items():
                up, down, _ = to_low_rank(d, rank=r)
                lr[k] = (up.flatten(1) @ down.flatten(1)).reshape(d.shape)
            rows[f"rank {r}"] = {c: lr for c in names}
    return rows


def _depth_order(label: str) -> tuple[int, int]:
    if label.startswith("te.L"):
        return (0, int(label[4:]))
    if label.startswith("in"):
        return (1, int(label[2:]))
    if label == "mid":
        return (2, 0)
    if label.startswith("out"):
        return (3, int(label[3:]))
    return (4, 0)


def merge_config_overrides(items: Sequence[str]) -> dict:
    """``key=value`` pairs (values parsed as JSON when they parse, else strings) → MergeConfig overrides."""
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.time()
    all_names = list(quality.load_concepts())
    names = (args.concepts.split(",") if args.concepts else all_names)[: args.n]
    world = quality.load_world(names=names)
    overrides = merge_config_overrides(args.set)
    mm = quality.MergeMethod(args.method, args.preset, overrides=overrides)
    mm.setup(world, names)
    merged = {m.key: m.delta(torch.float32) for m in mm.deltas}
    own = {c: {m.key: m.delta(torch.float32) for m in world.loras[c]} for c in names}
    print(
        f"[{time.time() - t0:5.0f}s] merged {names} with {args.method} ({args.preset}) {overrides} "
        f"in {mm.seconds:.1f} s",
        flush=True,
    )
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else []
    rows = hybrid_rows(names, own, merged, ranks)
    if args.rows:
        want = set(args.rows.split(","))
        rows = {k: v for k, v in rows.items() if k in want or k in ("single", "merged")}
    requests = quality.make_cells(names, args.samples, args.prompt_seed).fidelity
    seeds = [int(s) for s in args.seeds.split(",")]
    res: dict[str, dict[int, dict[str, float]]] = {}
    for label, weights in rows.items():
        res[label] = {}
        for s in seeds:
            res[label][s] = fidelity(world, HybridMethod(weights), names, requests, args.cfg, s * 1_000_003)
        print(
            f"[{time.time() - t0:5.0f}s] {label}: "
            + ", ".join(f"{statistics.fmean(res[label][s].values()):.3f}" for s in seeds),
            flush=True,
        )
    table = format_table(res, names, seeds)
    print(table)
    out = {
        "args": vars(args),
        "overrides": overrides,
        "concepts": names,
        "fidelity": res,
        "table": table,
        "merge_seconds": mm.seconds,
        "seconds": time.time() - t0,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return out


def format_table(
    res: dict[str, dict[int, dict[str, float]]], names: Sequence[str], seeds: Sequence[int]
) -> str:
    """Rows: fidelity (mean over concepts) and ratio to ``single`` (mean of per-concept ratios), ± half the
    spread over seeds; one column per concept (mean over seeds)."""
    head = f"{'weights':<16} {'fidelity':>14} {'ratio':>14} " + " ".join(f"{n:>6}" for n in names)
    lines = [head, "-" * len(head)]

    def pm(vals: list[float]) -> str:
        m = statistics.fmean(vals)
        return (
            f"{100 * m:5.1f}±{100 * (max(vals) - min(vals)) / 2:4.1f}%"
            if len(vals) > 1
            else f"{100 * m:5.1f}%"
        )

    for label, by_seed in res.items():
        fid = [statistics.fmean(by_seed[s].values()) for s in seeds]
        ratio = []
        for s in seeds:
            ref = res["single"][s]
            rs = [by_seed[s][n] / ref[n] for n in names if ref.get(n)]
            ratio.append(statistics.fmean(rs) if rs else float("nan"))
        per = " ".join(f"{100 * statistics.fmean(by_seed[s][n] for s in seeds):5.0f}%" for n in names)
        lines.append(f"{label:<16} {pm(fid):>14} {pm(ratio):>14} {per}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2, help="merge the first N concepts")
    ap.add_argument(
        "--concepts", default="", help="comma-separated concept names (default: the world's order)"
    )
    ap.add_argument("--method", default="loraclr", help="lsq | loraclr | linear | svd")
    ap.add_argument("--preset", default="recommended")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='MergeConfig override (JSON value), repeatable, e.g. sequential="block"',
    )
    ap.add_argument("--samples", type=int, default=48, help="images per row (spread over the concepts)")
    ap.add_argument("--seeds", default="0", help="noise seeds")
    ap.add_argument("--prompt-seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--ranks", default="", help="also rows of the merged ΔW re-ranked to these SVD ranks")
    ap.add_argument(
        "--rows", default="", help="only these rows (comma-separated labels; single, merged kept)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="write the numbers as JSON here")
    return ap.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
