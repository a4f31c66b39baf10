"""``python -m lib_loraclr inspect FILE…``: what a LoRA file holds.

Architecture, format, rank(s), alpha(s), module counts per part (TE / UNet), unmapped keys, metadata
and trigger words, as a readable table or ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from lib_loraclr.errors import LoraclrError
from lib_loraclr.keymap import canonical_part, format_loader_gaps, loader_gaps
from lib_loraclr.metadata import tag_frequencies, trigger_words
from lib_loraclr.readers import read_lora

_LONG_METADATA = (
    "ss_tag_frequency",
    "ss_dataset_dirs",
    "ss_datasets",
    "ss_bucket_info",
    "modelspec.thumbnail",
)


def _counter_str(c: Counter[Any] | dict[str, int]) -> str:
    """``{"4": 10, "8": 2}`` → ``"4 (10 modules), 8 (2 modules)"``."""
    return ", ".join(f"{k} ({n} module{'s' if n != 1 else ''})" for k, n in c.items())


def inspect_file(path: str | os.PathLike[str], arch: str | None = None) -> dict[str, Any]:
    """Summary of one LoRA file as plain data (JSON-serialisable).

    Keys: file, arch, format, modules, parts ({te, te1, te2, unet: count}), kinds, ranks ({rank: count},
    "dense" for materialised LyCORIS), alphas ({alpha: count}, None = no alpha), unmapped (raw keys),
    embeddings ({name: shape}), trigger_words, metadata (long fields shortened), tag_count, loader_gaps
    ({loader: [canonical keys it ignores]}, :func:`~lib_loraclr.keymap.loader_gaps`).

    Raises:
        LoraclrError subclasses for unreadable files.
    """
    ds = read_lora(path, arch=arch)
    parts: Counter[str] = Counter(canonical_part(k) for k in ds.modules)
    ranks: Counter[str] = Counter(str(m.rank) if m.rank is not None else "dense" for m in ds)
    alphas: Counter[str] = Counter(
        ("none" if m.alpha is None else f"{m.alpha:g}") for m in ds if m.dense is None
    )
    kinds: Counter[str] = Counter(m.kind for m in ds)
    meta = {}
    for k, v in sorted(ds.metadata.items()):
        meta[k] = v if (k not in _LONG_METADATA and len(v) <= 200) else f"<{len(v)} characters>"
    return {
        "file": str(path),
        "arch": ds.arch,
        "format": ds.fmt,
        "modules": len(ds),
        "parts": dict(sorted(parts.items())),
        "kinds": dict(sorted(kinds.items())),
        "ranks": dict(
            sorted(ranks.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0))
        ),
        "alphas": dict(sorted(alphas.items())),
        "unmapped": list(ds.unmapped),
        "embeddings": {k: list(v.shape) for k, v in ds.embeddings.items()},
        "trigger_words": trigger_words(ds.metadata),
        "tag_count": len(tag_frequencies(ds.metadata)),
        "loader_gaps": loader_gaps(ds.modules, ds.arch) if ds.arch in ("sd1", "sd2", "sdxl") else {},
        "metadata": meta,
    }


def format_summary(s: dict[str, Any], max_unmapped: int = 10, show_metadata: bool = True) -> str:
    """A readable two-column table of :func:`inspect_file`'s summary."""
    part_names = {"te": "TE", "te1": "TE1 (CLIP-L)", "te2": "TE2 (OpenCLIP-G)", "unet": "UNet"}
    rows: list[tuple[str, str]] = [
        ("file", Path(s["file"]).name),
        ("architecture", {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}.get(s["arch"], s["arch"])),
        ("format", s["format"] + (f" ({', '.join(s['kinds'])})" if s["kinds"] else "")),
        (
            "modules",
            f"{s['modules']}  " + ", ".join(f"{part_names.get(p, p)}: {n}" for p, n in s["parts"].items()),
        ),
        ("rank(s)", _counter_str(s["ranks"])),
        ("alpha(s)", _counter_str(s["alphas"]) or "-"),
        ("trigger words", ", ".join(s["trigger_words"]) or "-"),
    ]
    for line in format_loader_gaps(s.get("loader_gaps") or {}):
        rows.append(("loader gaps", line))
    if s["embeddings"]:
        rows.append(("embeddings", ", ".join(f"{k} {tuple(v)}" for k, v in s["embeddings"].items())))
    un = s["unmapped"]
    rows.append(("unmapped keys", str(len(un)) if un else "none"))
    for k in un[:max_unmapped]:
        rows.append(("", k))
    if len(un) > max_unmapped:
        rows.append(("", f"… and {len(un) - max_unmapped} more"))
    if show_metadata and s["metadata"]:
        rows.append(("metadata", f"{len(s['metadata'])} fields"))
        rows.extend((f"  {k}", v) for k, v in s["metadata"].items())
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``inspect FILE… [--json] [--arch sd1|sd2|sdxl] [--no-metadata]``; exit 1 if any file failed."""
    ap = argparse.ArgumentParser(prog="python -m lib_loraclr inspect", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="LoRA files (.safetensors, .pt, .pth, .bin)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per file, in a list")
    ap.add_argument("--arch", choices=("sd1", "sd2", "sdxl"), default=None, help="force the architecture")
    ap.add_argument("--no-metadata", action="store_true", help="leave metadata out of the table")
    args = ap.parse_args(argv)
    results: list[dict[str, Any]] = []
    failed = 0
    for f in args.files:
        try:
            results.append(inspect_file(f, arch=args.arch))
        except LoraclrError as e:
            failed += 1
            results.append({"file": f, "error": str(e), "error_type": type(e).__name__})
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        blocks = []
        for r in results:
            if "error" in r:
                blocks.append(f"{Path(r['file']).name}: ERROR ({r['error_type']}): {r['error']}")
            else:
                blocks.append(format_summary(r, show_metadata=not args.no_metadata))
        print("\n\n".join(blocks))
    if failed:
        print(f"{failed} of {len(args.files)} file(s) could not be read.", file=sys.stderr)
    return 1 if failed else 0
