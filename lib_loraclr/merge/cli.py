"""``python -m lib_loraclr merge``: merge concept LoRAs headlessly and save a LoRA or a checkpoint.

    python -m lib_loraclr merge --base BASE.safetensors \\
        --concept cat.safetensors "sks" --weight 1.0 \\
        --concept dog.safetensors "ohwx" --te-weight 0.8 --unet-weight 1.0 \\
        --out merged.safetensors [--format lora|checkpoint] [--rank 32] \\
        [--method loraclr|lsq|linear|svd] [--preset recommended|official] [--steps 20] [--seed 0] \\
        [--report report.json] [--overwrite]

``--weight``, ``--te-weight``, ``--unet-weight`` and ``--prompt`` apply to the ``--concept`` before them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from lib_loraclr.base_model import load_base
from lib_loraclr.errors import LoraclrError
from lib_loraclr.merge.pipeline import Concept, MergeConfig, MergeResult, format_report, merge_loras
from lib_loraclr.merge.solvers import METHODS
from lib_loraclr.validate import (
    MAX_RANK,
    MAX_STEPS,
    check_concept_weight,
    check_merge_paths,
    check_trigger,
    int_in,
)

CONCEPT_OPTS = ("--weight", "--te-weight", "--unet-weight", "--prompt", "--name")


def _split_concepts(argv: list[str]) -> tuple[list[str], list[dict]]:
    """Pull ``--concept FILE TRIGGER`` groups (and the per-concept options after each) out of argv."""
    rest: list[str] = []
    concepts: list[dict] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--concept":
            if i + 2 >= len(argv):
                raise LoraclrError(
                    '--concept needs a LoRA file and its trigger words: --concept FILE "words"'
                )
            concepts.append({"file": argv[i + 1], "trigger": argv[i + 2], "prompts": []})
            i += 3
        elif a in CONCEPT_OPTS:
            if not concepts:
                raise LoraclrError(f"{a} must follow a --concept")
            if i + 1 >= len(argv):
                raise LoraclrError(f"{a} needs a value")
            key = a[2:].replace("-", "_")
            if key == "prompt":
                concepts[-1]["prompts"].append(argv[i + 1])
            elif key == "name":
                concepts[-1]["name"] = argv[i + 1]
            else:  # ValueRangeError / NonFiniteWeightsError for text, NaN, Inf, |w| > 10
                concepts[-1][key] = check_concept_weight(
                    argv[i + 1], f"{a} of --concept {concepts[-1]['file']}"
                )
            i += 2
        else:
            rest.append(a)
            i += 1
    return rest, concepts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lib_loraclr merge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", required=True, help="base checkpoint (.safetensors) the LoRAs were trained on")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--format", choices=("lora", "checkpoint"), default="lora")
    p.add_argument(
        "--rank",
        type=int_in(1, MAX_RANK),
        default=None,
        help="LoRA rank of the saved file (default: lossless)",
    )
    p.add_argument("--method", choices=METHODS, default="loraclr")
    p.add_argument("--preset", choices=("recommended", "official"), default="recommended")
    p.add_argument(
        "--steps", type=int_in(1, MAX_STEPS), default=20, help="sampling steps of the feature runs"
    )
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0)
    p.add_argument("--report", default=None, help="write the fidelity report as JSON here")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument(
        "--sidecar",
        action="store_true",
        help="also write NAME.json beside the LoRA (the WebUI card's activation text: the trigger words); "
        "an existing one is kept unless --overwrite",
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace, concept_specs: list[dict]) -> MergeResult:
    from lib_loraclr.keymap import loader_gaps
    from lib_loraclr.metadata import recipe_metadata
    from lib_loraclr.readers import read_lora
    from lib_loraclr.safeio import check_output_name
    from lib_loraclr.writers import svd_tolerance, write_checkpoint, write_kohya_lora, write_webui_sidecar

    if len(concept_specs) < 1:
        raise LoraclrError('nothing to merge: give at least one --concept FILE "trigger words"')
    out = Path(args.out)
    out = check_output_name(out.name, out.parent if str(out.parent) else Path("."))
    for spec in concept_specs:
        check_trigger(spec["trigger"], f"--concept {spec['file']}")
    # every path before any file is read (InputFileError, OutputExistsError, OutputNotWritableError, …)
    check_merge_paths(
        args.base, [s["file"] for s in concept_specs], out, overwrite=args.overwrite, report=args.report
    )
    concepts = []
    for spec in concept_specs:  # the LoRAs (small) before the base model (large)
        ds = read_lora(spec["file"])
        w = spec.get("weight", 1.0)
        concepts.append(
            Concept(
                ds,
                spec["trigger"],
                name=spec.get("name") or Path(spec["file"]).stem,
                te_weight=spec.get("te_weight", w),
                unet_weight=spec.get("unet_weight", w),
                prompts=spec["prompts"],
            )
        )
    model = load_base(args.base)
    config = MergeConfig(method=args.method, preset=args.preset, sample_steps=args.steps, seed=args.seed)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=1, unit="layer", desc="merge", file=sys.stderr)

    def progress(stage: str, done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(stage[:60])
            bar.refresh()

    res = merge_loras(model, concepts, config, progress=progress)
    if bar is not None:
        bar.close()
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    recipe = recipe_metadata(
        sources=[
            {
                "name": c.label,
                "file": Path(s["file"]).name,
                "trigger": c.trigger,
                "te_weight": c.te_weight,
                "unet_weight": c.unet_weight,
            }
            for s, c in zip(concept_specs, concepts)
        ],
        method=args.method,
        parameters={"preset": args.preset, "steps": args.steps, "seed": args.seed},
        trigger=[c.trigger for c in concepts],
        tag_sources=[c.deltas.metadata for c in concepts],
    )
    if args.format == "lora":
        errors = write_kohya_lora(
            res.deltas,
            out,
            arch=res.deltas.arch if res.deltas.arch != "unknown" else "sd1",
            rank=args.rank,
            metadata=recipe,
            overwrite=args.overwrite,
            dtype=dtype,
        )
        res.report["svd_error"] = float(sum(errors.values()) / max(len(errors), 1))
        res.report["svd_error_max"] = float(max(errors.values(), default=0.0))
        arch = res.deltas.arch if res.deltas.arch != "unknown" else "sd1"
        res.report["svd_tolerance"] = svd_tolerance(
            dtype
        )  # per module, below --rank's cap (writers.SVD_TOLERANCE)
        res.report["loader_gaps"] = loader_gaps(res.deltas.modules, arch)
        if args.sidecar:
            side = write_webui_sidecar(
                out,
                [c.trigger for c in concepts],
                arch,
                overwrite=args.overwrite,
                description=f"{args.method} merge of {', '.join(c.label for c in concepts)}",
            )
            res.report["sidecar"] = None if side is None else str(side)
    else:
        from lib_loraclr.safeio import read_safetensors_metadata

        base_meta = {
            k: v for k, v in read_safetensors_metadata(args.base).items() if not k.startswith("sshs_")
        }
        write_checkpoint(
            model.state_dict(),
            res.deltas,
            out,
            dtype=dtype,
            metadata={**base_meta, **recipe},
            overwrite=args.overwrite,
        )
    return res


def write_json(path: Path, obj: object) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1, default=float))
        os.replace(tmp, path)
    finally:  # an interrupt or a full disk leaves no temp file
        tmp.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    rest, specs = _split_concepts(argv)
    args = build_parser().parse_args(rest)
    if (
        args.sidecar
        and args.report
        and Path(args.report).resolve() == Path(args.out).with_suffix(".json").resolve()
    ):
        raise LoraclrError(
            f"--report {args.report} is the WebUI sidecar --sidecar writes; give the report another name"
        )
    res = run(args, specs)
    print(format_report(res.report))
    print(f"saved {args.out}")
    if args.report:
        write_json(Path(args.report), res.report)
    return 0
