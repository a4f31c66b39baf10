"""``python -m lib_loraclr demo``: the main job on the bundled tiny world, end to end, in a few minutes.

1. loads the measuring world's base model (a tiny SD1-architecture model trained on real handwritten
   digits) and two bundled concept LoRAs (kohya files: ``sks`` = a digit the base never saw, ``ohwx`` =
   another);
2. merges them with LoRACLR (recommended preset), saves the merged LoRA as a kohya file and prints the
   fidelity report;
3. measures, with the world's judges (a digit classifier with a "not a digit" class), each concept alone,
   both concepts in one scene, and known digits, for: each single LoRA, the linear merge (sum), the
   LoRACLR merge, and CLoRA composing the two single LoRAs at sampling time; prints the table;
4. writes a PNG grid (rows: single LoRAs | linear | LoRACLR | CLoRA) and the numbers as JSON.

Outputs go to ``--out`` (default ``out/demo``); the demo replaces only the files it wrote there itself.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

DEMO_FILES = ("merged_loraclr.safetensors", "grid.png", "results.json", "merge_report.json")


def _sample(
    model: Any, prompts: list[str], width: int, cfg: float, seed: int, steps: int, denoiser: Any = None
) -> torch.Tensor:
    from lib_loraclr.models.sampling import sample

    kw = {"denoiser": denoiser} if denoiser is not None else {}
    return sample(
        model,
        prompts,
        cfg_scale=cfg,
        seed=seed,
        steps=steps,
        sampler="dpmpp_2m",
        shape=(1, 8, 8 * width),
        **kw,
    )


def clora_sampler(
    model: Any,
    loras: dict[str, Any],
    concept_digit: dict[str, int],
    names: list[str],
    steps: int,
    routed: bool = False,
    layout: str = "",
) -> Callable[[list[str], int, float, int], torch.Tensor]:
    """CLoRA on the world: base branch = the prompt with the concepts' digits ("a 2 and a 5"), branch k =
    concept k's trigger in place of its digit ("a sks and a 5") with LoRA k; one batched UNet call per step
    (``routed``: one UNet pass with each LoRA in its region; ``layout``: a ratio string such as "1,1")."""
    from lib_loraclr.clora import CloraOptions, Concept, build_clora_denoiser
    from lib_loraclr.clora.layout import box_masks, layout_weights, parse_ratio_layout
    from lib_loraclr.models.sampling import CFGDenoiser

    def run(words: list[str], n: int, cfg: float, seed: int) -> torch.Tensor:
        base = "a " + " and a ".join(str(concept_digit.get(w, w)) for w in words)
        concepts = [Concept(trigger=w, words=str(concept_digit[w])) for w in words if w in concept_digit]
        lay = None
        if layout:  # a concept alone gets the whole image as its region
            ratio = layout if len(words) > 1 else "1"
            lay = layout_weights(box_masks(parse_ratio_layout(ratio), (8, 8 * len(words))), len(concepts))
        den, _ = build_clora_denoiser(
            CFGDenoiser(model).inner_model,
            model.model.diffusion_model,
            model.get_learned_conditioning,
            model.prompt_encoder.token_positions,
            base,
            concepts,
            [[(loras[c.trigger], 1.0)] for c in concepts],
            options=CloraOptions.recommended(steps),
            te_model=model,
            batch_size=n,
            mode="replace",
            layout=lay,
            routed=routed,
        )
        return _sample(model, [base] * n, len(words), cfg, seed, steps, denoiser=den)

    return run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lib_loraclr.apply import patched
    from lib_loraclr.merge.cli import write_json
    from lib_loraclr.merge.pipeline import Concept, MergeConfig, merge_loras
    from lib_loraclr.merge.report import format_report
    from lib_loraclr.metadata import recipe_metadata
    from lib_loraclr.world.assets import load_base, load_lora
    from lib_loraclr.world.concepts import load_concepts
    from lib_loraclr.world.data import canvas_for
    from lib_loraclr.world.evaluate import SceneJudge, make_identity_judge
    from lib_loraclr.world.judges import load_judges
    from lib_loraclr.writers import write_kohya_lora

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = load_base()
    concepts = load_concepts()
    names = list(args.concepts)
    for n in names:
        if n not in concepts:
            raise SystemExit(f"unknown concept {n!r}; bundled: {', '.join(concepts)}")
    loras = {n: load_lora(n) for n in names}
    clf, mean, comps = load_judges()
    judge = SceneJudge(clf, make_identity_judge(mean, comps, concepts), concepts)
    digit = {n: concepts[n].digit for n in names}

    print(f"[1/4] merging {', '.join(names)} with LoRACLR (recommended preset)…", flush=True)
    cfg = MergeConfig(
        method="loraclr",
        preset="recommended",
        templates=("a {}", "{}", "a {} and a 3"),
        neutral_prompts=("a 0", "a 4 and a 7", "a 1, a 6 and a 9", ""),
        shape=(1, 8, 8),
        shape_for=canvas_for,
        seed=args.seed,
        ridge=args.ridge,
        loraclr_overrides={"iters": args.loraclr_iters, "ridge": args.ridge},
    )
    res = merge_loras(model, [Concept(loras[n], concepts[n].trigger, name=n) for n in names], cfg)
    merged_path = out / DEMO_FILES[0]
    errs = write_kohya_lora(
        res.deltas,
        merged_path,
        arch="sd1",
        rank=args.rank,
        overwrite=True,
        metadata=recipe_metadata(
            sources=list(names),
            method="loraclr",
            trigger=[concepts[n].trigger for n in names],
            tag_sources=[loras[n].metadata for n in names],
        ),
    )
    res.report["svd_error"] = sum(errs.values()) / len(errs)
    print(format_report(res.report))
    print(f"saved {merged_path} (rank {args.rank}, {len(errs)} modules)")
    write_json(out / DEMO_FILES[3], res.report)

    print("[2/4] sampling and judging…", flush=True)
    from lib_loraclr.readers import read_lora

    merged = read_lora(merged_path)  # what a user would load: the saved file
    methods: dict[str, Callable[[str], AbstractContextManager]] = {
        "single LoRA": lambda w: patched(model, loras[w]) if w in loras else nullcontext(),
        "linear merge": lambda w: patched(model, [(loras[n], 1.0) for n in names]),
        "LoRACLR merge": lambda w: patched(model, merged),
    }
    clora = clora_sampler(model, loras, digit, names, args.steps)
    n, steps, cfg_scale = args.samples, args.steps, args.cfg
    pair = names[:2]
    rows: dict[str, dict[str, float | None]] = {}
    grid_rows: dict[str, torch.Tensor] = {}

    def score(words: list[str], imgs: torch.Tensor) -> float:
        reads = judge.read(imgs)
        return sum(judge.success(words, r) for r in reads) / len(reads)

    for label, ctx in methods.items():
        r: dict[str, float | None] = {}
        singles = []
        for i, w in enumerate(names):
            with ctx(w), torch.no_grad():
                imgs = _sample(model, [f"a {w}"] * n, 1, cfg_scale, args.seed + 1000 * i, steps)
            r[f"alone: {w}"] = score([w], imgs)
            singles.append(imgs[:4])
        if label == "single LoRA":
            r["both in one image"] = None  # one LoRA cannot draw the other concept
            r["known digits"] = None
            grid_rows[label] = torch.cat([torch.cat(list(s), dim=-1) for s in singles], dim=-1)[None]
        else:
            with ctx(pair[0]), torch.no_grad():
                both = _sample(
                    model, [f"a {pair[0]} and a {pair[1]}"] * n, 2, cfg_scale, args.seed + 77, steps
                )
                known = _sample(model, ["a 3 and a 7"] * n, 2, cfg_scale, args.seed + 99, steps)
            r["both in one image"] = score(pair, both)
            r["known digits"] = score(["3", "7"], known)
            grid_rows[label] = torch.cat(list(both[:8]), dim=-1)[None]
        rows[label] = r
        print(f"  {label}: done", flush=True)
    variants = {
        "CLoRA (single LoRAs)": clora,
        "CLoRA routed": clora_sampler(model, loras, digit, names, args.steps, routed=True),
        "CLoRA routed + layout": clora_sampler(
            model, loras, digit, names, args.steps, routed=True, layout="1,1"
        ),
    }
    for label, sampler in variants.items():
        both = sampler(pair, n, cfg_scale, args.seed + 77)
        # alone (the single LoRA's seeds): the concept's region is the whole image; CFG guides from the base
        # model there, so these differ from the single LoRA's own images
        alone = {
            f"alone: {w}": score([w], sampler([w], n, cfg_scale, args.seed + 1000 * i))
            for i, w in enumerate(names)
        }
        rows[label] = {**alone, "both in one image": score(pair, both), "known digits": None}
        grid_rows[label] = torch.cat(list(both[:8]), dim=-1)[None]
        print(f"  {label}: done", flush=True)

    print(
        "[3/4] results (fraction of images the judge accepts; "
        f"{n} samples per cell, CFG {cfg_scale}, {steps} DPM++ 2M steps)"
    )
    print(format_table(rows))
    _save_grid(grid_rows, out / DEMO_FILES[1])
    results = {
        "concepts": names,
        "samples": n,
        "cfg": cfg_scale,
        "steps": steps,
        "seed": args.seed,
        "table": rows,
        "merge_seconds": res.report["seconds"],
        "total_seconds": time.time() - t0,
    }
    write_json(out / DEMO_FILES[2], results)
    print(f"[4/4] wrote {out / DEMO_FILES[1]} and {out / DEMO_FILES[2]} in {time.time() - t0:.0f} s")
    return results


def format_table(rows: dict[str, dict[str, float | None]]) -> str:
    cols = list(next(iter(rows.values())))
    head = f"{'method':<22}" + "".join(f"{c:>20}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(
            f"{name:<22}" + "".join(f"{'—' if r.get(c) is None else f'{r[c]:.0%}':>20}" for c in cols)
        )
    return "\n".join(lines)


def _save_grid(rows: dict[str, torch.Tensor], path: Path, scale: int = 6) -> None:
    """One row per method (images side by side), pixel values [-1, 1] → gray, nearest-upscaled."""
    from PIL import Image, ImageDraw

    label_w = 130
    imgs = {k: ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0, 0] for k, v in rows.items()}
    width = max(t.shape[1] for t in imgs.values()) * scale + label_w
    height = sum(t.shape[0] * scale + 6 for t in imgs.values())
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    y = 0
    for name, t in imgs.items():
        im = Image.fromarray(t.numpy(), mode="L").resize(
            (t.shape[1] * scale, t.shape[0] * scale), Image.NEAREST
        )
        canvas.paste(im, (label_w, y))
        draw.text((4, y + t.shape[0] * scale // 2 - 6), name, fill=0)
        y += t.shape[0] * scale + 6
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lib_loraclr demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="out/demo")
    p.add_argument("--concepts", nargs="+", default=["sks", "ohwx"], help="bundled concept names")
    p.add_argument("--samples", type=int, default=32, help="images per cell")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--rank", type=int, default=16, help="rank of the saved merged LoRA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loraclr-iters", type=int, default=20, help="L-BFGS iterations per layer (preset: 100)")
    p.add_argument("--ridge", type=float, default=1e-2, help="ridge, relative to the mean Gram eigenvalue")
    run(p.parse_args(argv))
    return 0
