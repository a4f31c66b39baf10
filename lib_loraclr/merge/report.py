"""The merge report for people and for JSON: `format_report` (a printed table), `report_rows` (the same
table as rows for the WebUI), `json_safe` (a copy strict JSON can encode)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def format_report(report: dict[str, Any]) -> str:
    """The report as a printed table (one row per concept × layer group)."""
    lines = [
        f"method {report['method']}"
        + (f" ({report['preset']})" if report.get("preset") else "")
        + f", {report['layers']} layers, {report['seconds']:.1f} s"
    ]
    head = f"{'concept':<16} {'group':<5} {'fidelity err':>12} {'interference':>12} {'base change':>11}"
    lines += [head, "-" * len(head)]

    def fmt(x: float | None) -> str:
        return "—" if x is None else f"{x:.4f}"

    for g, info in report["groups"].items():
        for name, v in info["concepts"].items():
            lines.append(
                f"{name[:16]:<16} {g:<5} {fmt(v['rel_err']):>12} {fmt(v['interference']):>12} "
                f"{fmt(info['base_change_neutral']):>11}"
            )
    if report.get("svd_error") is not None:
        lines.append(
            f"LoRA save: SVD truncation error (relative, mean over modules) {report['svd_error']:.4f}"
        )
    if report.get("svd_error_max") is not None:
        tol = report.get("svd_tolerance")
        lines.append(
            f"LoRA save: SVD truncation error max {report['svd_error_max']:.2e}"
            + (f" (tolerance {tol:.0e} per module, ranks as low as it allows)" if tol is not None else "")
        )
    if report["fallbacks"]:
        lines.append(f"linear merge (inputs not observable) for {len(report['fallbacks'])} layers")
    if report.get("loader_gaps"):
        from lib_loraclr.keymap import format_loader_gaps

        lines += [f"note: {line}" for line in format_loader_gaps(report["loader_gaps"])]
    return "\n".join(lines)


def report_rows(report: Mapping[str, Any]) -> list[list[Any]]:
    """The fidelity report as table rows ``[concept, group, fidelity error, interference, base change]``."""
    rows: list[list[Any]] = []
    for group, info in (report.get("groups") or {}).items():
        for name, v in (info.get("concepts") or {}).items():
            rows.append(
                [
                    name,
                    group,
                    _r(v.get("rel_err")),
                    _r(v.get("interference")),
                    _r(info.get("base_change_neutral")),
                ]
            )
    return rows


def _r(x: Any) -> Any:
    return None if x is None else round(float(x), 4)


def json_safe(obj: Any, path: str = "", replaced: list[str] | None = None) -> Any:
    """A copy of ``obj`` that strict JSON can encode: non-finite floats (the report's per-layer ratios can be
    inf/nan, e.g. a LoRA with no effect on a layer) become None, their paths appended to ``replaced``;
    numpy/torch scalars and arrays become numbers and lists; anything else its ``str``."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if replaced is not None:
            replaced.append(path)
        return None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v, f"{path}.{k}" if path else str(k), replaced) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, f"{path}[{i}]", replaced) for i, v in enumerate(obj)]
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(obj, "ndim", 1) == 0:
        return json_safe(item(), path, replaced)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return json_safe(tolist(), path, replaced)
    return str(obj)
