"""How far the output-level refinement moves the per-layer merge, per layer group and block (world).

    python bench/refine_shift.py --concepts sks,ohwx,szn,mth --steps 100

Merges the concepts twice with ``bench/quality.py``'s merge config (recommended LoRACLR, same seed): without
and with ``--steps`` refinement steps, then prints per group (``te``, ``kv``, ``unet``) and per UNet block
‖refined − solved‖ / ‖solved‖ (Frobenius, summed over the group's layers) and ‖solved‖ / the mean ‖own ΔW‖ of
the concepts. Measured output: docs/DESIGN.md "Refinement by default on a GPU".
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # bench/quality.py

from lib_loraclr.merge.pipeline import layer_group
from lib_loraclr.world.assets import BASE_FILE, LORA_DIR


def block_of(key: str) -> str:
    """``input_blocks.4`` / ``middle`` / ``output_blocks.0`` of a UNet key, ``te`` for the text encoder."""
    if layer_group(key) == "te":
        return "te"
    parts = key.split(".")
    i = parts.index("diffusion_model") + 1
    return "middle" if parts[i] == "middle_block" else f"{parts[i]}.{parts[i + 1]}"


def shifts(
    solved: dict[str, torch.Tensor], refined: dict[str, torch.Tensor], own: Sequence[dict[str, torch.Tensor]]
) -> dict[tuple[str, str], tuple[float, float]]:
    """(group, block or "all") → (‖refined − solved‖ / ‖solved‖, ‖solved‖ / mean ‖own‖), squared norms summed
    over the cell's layers (inf where no concept has its own ΔW)."""
    acc: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for k, d0 in solved.items():
        g = layer_group(k)
        own_sq = sum(float(o[k].pow(2).sum()) for o in own if k in o) / max(1, len(own))
        for cell in {(g, "all"), (g, block_of(k))}:
            acc[cell][0] += float((refined[k] - d0).pow(2).sum())
            acc[cell][1] += float(d0.pow(2).sum())
            acc[cell][2] += own_sq
    return {
        c: ((a / b) ** 0.5 if b > 0 else 0.0, (b / o) ** 0.5 if o > 0 else float("inf"))
        for c, (a, b, o) in acc.items()
    }


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", default="sks,ohwx,szn,mth")
    ap.add_argument("--steps", type=int, default=100, help="refinement steps of the second merge")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.concepts.split(",") if n.strip()]
    world = quality.load_world(str(BASE_FILE), str(LORA_DIR), names, 20, "dpmpp_2m")
    merged = []
    for steps in (0, args.steps):
        m = quality.MergeMethod(
            "loraclr", "recommended", f"refine{steps}", overrides={"distill_steps": steps}
        )
        m.setup(world, names)
        merged.append({k: mm.delta().float() for k, mm in m.deltas.modules.items()})
        print(f"merged with {steps} refinement steps in {m.seconds:.0f} s", flush=True)
    own = [{k: mm.delta().float() for k, mm in world.loras[n].modules.items()} for n in names]
    out = shifts(merged[0], merged[1], own)
    for (g, b), (shift, size) in sorted(out.items()):
        print(f"{g:>4} {b:<16} refined−solved {shift:.3f}   solved/own {size:.3f}")
    return {f"{g}/{b}": v for (g, b), v in out.items()}


if __name__ == "__main__":
    main()
