"""``bench/quality.py`` with extra merge variants (MergeConfig overrides) registered as methods.

    python bench/merge_variants.py --variant 'loraclr_seq=loraclr:sequential=true' \\
        --n 2 --methods single,lsq,loraclr,loraclr_seq --samples 48 --seeds 0 --cfg 3 --threads 1

``--variant NAME=METHOD[@PRESET]:KEY=VALUE[,KEY=VALUE…]`` (repeatable; values are JSON when they parse, else
strings; ``loraclr_overrides.iters=20`` sets one LoRACLR parameter) registers ``NAME`` as
``quality.MergeMethod(METHOD, PRESET, overrides={KEY: VALUE…})``; every other argument goes to
``bench/quality.py`` unchanged.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality  # bench/quality.py


def parse_variant(spec: str) -> tuple[str, str, str, dict]:
    """``NAME=METHOD[@PRESET]:K=V,…`` → (name, method, preset, MergeConfig overrides)."""
    name, _, rest = spec.partition("=")
    head, _, body = rest.partition(":")
    method, _, preset = head.partition("@")
    overrides: dict = {}
    for item in filter(None, body.split(",")):
        k, _, v = item.partition("=")
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        if k.startswith("loraclr_overrides."):
            overrides.setdefault("loraclr_overrides", {})[k.split(".", 1)[1]] = val
        else:
            overrides[k] = val
    if not name or not method:
        raise SystemExit(f"bad --variant {spec!r}: want NAME=METHOD[@PRESET]:KEY=VALUE,…")
    return name, method, preset or "recommended", overrides


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--variant":
            name, method, preset, ov = parse_variant(argv[i + 1])
            quality.register_method(
                name, lambda m=method, p=preset, nm=name, o=ov: quality.MergeMethod(m, p, nm, overrides=o)
            )
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return quality.main(rest)


if __name__ == "__main__":
    main()
