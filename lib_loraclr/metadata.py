"""LoRA metadata: trigger words, and the kohya / ModelSpec / loraclr fields our writers put in files.

All safetensors metadata values are strings; structured values (lists, dicts) are stored as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

#: our own recipe fields (all JSON strings except loraclr_version)
LORACLR_TRIGGER = "loraclr_trigger"
LORACLR_SOURCES = "loraclr_sources"
LORACLR_METHOD = "loraclr_method"
LORACLR_PARAMETERS = "loraclr_parameters"
LORACLR_VERSION = "loraclr_version"

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
MODELSPEC_RESOLUTION = {"sd1": "512x512", "sd2": "512x512", "sd2-v": "768x768", "sdxl": "1024x1024"}


def _as_list(value: str) -> list[str]:
    value = value.strip()
    if not value:
        return []
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    if isinstance(parsed, str):
        return [w.strip() for w in parsed.split(",") if w.strip()]
    if isinstance(parsed, list):
        return [str(w).strip() for w in parsed if str(w).strip()]
    return []


def tag_frequencies(metadata: Mapping[str, str]) -> dict[str, int]:
    """kohya ``ss_tag_frequency`` (``{dataset_dir: {tag: count}}`` as JSON) summed over dataset dirs."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return {}
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return {}
    counts: dict[str, int] = {}
    if not isinstance(data, dict):
        return {}
    for tags in data.values():
        if not isinstance(tags, dict):
            continue
        for tag, n in tags.items():
            t = str(tag).strip()
            if t:
                try:
                    counts[t] = counts.get(t, 0) + int(n)
                except (TypeError, ValueError):
                    continue
    return counts


def trigger_words(metadata: Mapping[str, str] | None, limit: int = 5) -> list[str]:
    """Trigger words of a LoRA.

    In order: our ``loraclr_trigger`` (JSON list or comma-separated), ModelSpec ``modelspec.trigger_phrase``,
    else the ``limit`` most frequent tags of kohya's ``ss_tag_frequency`` (ties keep file order).
    """
    if not metadata:
        return []
    for field in (LORACLR_TRIGGER, "modelspec.trigger_phrase"):
        if metadata.get(field):
            words = _as_list(str(metadata[field]))
            if words:
                return words
    counts = tag_frequencies(metadata)
    order = {t: i for i, t in enumerate(counts)}
    ranked = sorted(counts, key=lambda t: (-counts[t], order[t]))
    return ranked[:limit]


def kohya_metadata(
    arch: str,
    *,
    dim: int | str,
    alpha: float | str,
    output_name: str,
    title: str | None = None,
    v_parameterization: bool = False,
) -> dict[str, str]:
    """The kohya ``ss_*`` and ModelSpec 1.0.0 fields of a LoRA file (all strings).

    ``dim``/``alpha``: the network rank and alpha (``"Dynamic"`` when ranks differ per module, as kohya's
    resize script writes). ``arch``: sd1 | sd2 | sdxl.
    """
    if arch not in BASE_MODEL_VERSION:
        raise ValueError(f"arch must be sd1, sd2 or sdxl, got {arch!r}")
    spec_arch = "sd2-v" if (arch == "sd2" and v_parameterization) else arch
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": BASE_MODEL_VERSION[arch],
        "ss_v2": str(arch == "sd2"),
        "ss_output_name": output_name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCH[spec_arch] + "/lora",
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": title or output_name,
        "modelspec.resolution": MODELSPEC_RESOLUTION[spec_arch],
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }


def checkpoint_metadata(arch: str, *, title: str, v_parameterization: bool = False) -> dict[str, str]:
    """ModelSpec fields of a full checkpoint (architecture without ``/lora``) plus ``format: pt``."""
    spec_arch = "sd2-v" if (arch == "sd2" and v_parameterization) else arch
    meta = {"format": "pt", "modelspec.sai_model_spec": "1.0.0", "modelspec.title": title,
            "modelspec.implementation": MODELSPEC_IMPLEMENTATION}
    if spec_arch in MODELSPEC_ARCH:
        meta["modelspec.architecture"] = MODELSPEC_ARCH[spec_arch]
        meta["modelspec.resolution"] = MODELSPEC_RESOLUTION[spec_arch]
    return meta


def recipe_metadata(
    *,
    sources: Sequence[Mapping[str, Any]] | Sequence[str] = (),
    method: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    trigger: Iterable[str] = (),
) -> dict[str, str]:
    """Our ``loraclr_*`` recipe fields, JSON-encoded: sources (names, hashes, weights…), the method,
    its parameters and the trigger words of the result. ``merged_from`` (ModelSpec) lists source names."""
    from lib_loraclr import __version__

    meta: dict[str, str] = {LORACLR_VERSION: __version__}
    srcs = list(sources)
    if srcs:
        meta[LORACLR_SOURCES] = json.dumps(srcs, ensure_ascii=False)
        names = [s if isinstance(s, str) else str(s.get("name", "")) for s in srcs]
        meta["modelspec.merged_from"] = ", ".join(n for n in names if n)
    if method:
        meta[LORACLR_METHOD] = method
    if parameters:
        meta[LORACLR_PARAMETERS] = json.dumps(dict(parameters), ensure_ascii=False, default=str)
    words = [w for w in trigger if w]
    if words:
        meta[LORACLR_TRIGGER] = json.dumps(words, ensure_ascii=False)
    return meta
