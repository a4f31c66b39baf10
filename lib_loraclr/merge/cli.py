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

from lib_loraclr.errors import LoraclrError
from lib_loraclr.merge.job import DEFAULT_RANK, JobConcept, JobResult, MergeJob, run_job
from lib_loraclr.merge.report import format_report
from lib_loraclr.merge.solvers import METHODS
from lib_loraclr.safeio import check_output_name
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
        default=DEFAULT_RANK,
        help=f"rank cap of the saved LoRA (default {DEFAULT_RANK}; each module gets the smallest rank within "
        "the SVD tolerance up to it)",
    )
    p.add_argument("--method", choices=METHODS, default="loraclr")
    p.add_argument("--preset", choices=("recommended", "official"), default="recommended")
    p.add_argument(
        "--steps", type=int_in(1, MAX_STEPS), default=20, help="sampling steps of the feature runs"
    )
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0)
    p.add_argument(
        "--distill-steps",
        type=int_in(0, 10_000),
        default=None,
        help="output-level refinement steps after the per-layer solve (lsq, loraclr; 0 = off; default: the "
        "recommended LoRACLR merge refines with 100 steps on a GPU, and not on the CPU, where it costs "
        "many minutes per merge)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="where the forward passes and the refinement run: auto (default: a CUDA GPU when torch sees one "
        "and the model fits, else the CPU), cpu, cuda or cuda:N; statistics and solves stay on the CPU",
    )
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


def job_from_args(args: argparse.Namespace, concept_specs: list[dict]) -> MergeJob:
    """The command line → a `MergeJob`, every path and trigger checked with the flag that names it."""
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
    concepts = tuple(
        JobConcept(
            Path(s["file"]),
            s["trigger"],
            name=s.get("name") or "",
            te_weight=s.get("te_weight", s.get("weight", 1.0)),
            unet_weight=s.get("unet_weight", s.get("weight", 1.0)),
            prompts=tuple(s["prompts"]),
        )
        for s in concept_specs
    )
    return MergeJob(
        base=Path(args.base),
        concepts=concepts,
        out=out,
        kind=args.format,
        method=args.method,
        preset=args.preset,
        rank=args.rank,
        dtype=args.dtype,
        overwrite=args.overwrite,
        sidecar=args.sidecar,
        options={"sample_steps": args.steps, "seed": args.seed}
        | ({"distill_steps": args.distill_steps} if args.distill_steps is not None else {})
        | ({"device": args.device} if args.device != "auto" else {}),
    )


def run(args: argparse.Namespace, concept_specs: list[dict]) -> JobResult:
    """Run the merge the command line asks for (`lib_loraclr.merge.job.run_job`), with a progress bar."""
    job = job_from_args(args, concept_specs)
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

    try:
        return run_job(job, progress=progress)
    finally:
        if bar is not None:
            bar.close()


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
    for note in res.report.get("notes", []):
        print(f"note: {note}")
    if res.report.get("device", "cpu") != "cpu":
        peak = res.report.get("gpu_peak_gib")
        print(
            f"device: {res.report['device']}"
            + (f", GPU memory peak {peak:.2f} GiB" if peak is not None else "")
        )
    print(f"saved {args.out}")
    if args.report:
        write_json(Path(args.report), res.report)
    return 0
