"""LoRA metadata: trigger words, and the kohya / ModelSpec / loraclr fields our writers put in files.

All safetensors metadata values are strings; structured values (lists, dicts) are stored as JSON.
"""

from __future__ import annotations

import json
import os
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
        "modelspec.date": creation_date(),
    }


def creation_date() -> str:
    """UTC now as ``YYYY-MM-DDTHH:MM:SS``, or the time in ``SOURCE_DATE_EPOCH`` (seconds; the reproducible
    builds convention), so the same merge can give the same bytes."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch.isdigit() else datetime.now(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S")


def checkpoint_metadata(arch: str, *, title: str, v_parameterization: bool = False) -> dict[str, str]:
    """ModelSpec fields of a full checkpoint (architecture without ``/lora``) plus ``format: pt``."""
    spec_arch = "sd2-v" if (arch == "sd2" and v_parameterization) else arch
    meta = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": title,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
    }
    if spec_arch in MODELSPEC_ARCH:
        meta["modelspec.architecture"] = MODELSPEC_ARCH[spec_arch]
        meta["modelspec.resolution"] = MODELSPEC_RESOLUTION[spec_arch]
    return meta


#: at most this many of a source LoRA's own ``ss_tag_frequency`` tags are carried into a merged file
SOURCE_TAGS_PER_CONCEPT = 20
#: A1111 (``ui_edit_user_metadata.is_non_comma_tagset``) splits tags into words of ≥ 3 characters when
#: their average length is at least this
A1111_NON_COMMA_AVERAGE = 16
#: WebUI "sd version" values of the card editor, by our arch names
WEBUI_SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}


def trigger_tags(trigger: str) -> list[str]:
    """The tags of one concept's trigger words: split at commas (as kohya captions are), stripped."""
    return [t.strip() for t in str(trigger).split(",") if t.strip()]


def _non_comma(tags: Iterable[str]) -> bool:
    ts = list(tags)
    return bool(ts) and sum(len(t) for t in ts) / len(ts) >= A1111_NON_COMMA_AVERAGE


def merged_tag_frequency(
    triggers: Sequence[str],
    names: Sequence[str] = (),
    source_metadata: Sequence[Mapping[str, str] | None] = (),
) -> dict[str, dict[str, int]]:
    """kohya ``ss_tag_frequency`` (``{dataset_dir: {tag: count}}``) of a merge of concepts.

    One dataset dir per concept (``"1_NAME"``, kohya's ``repeats_name`` form) holding its trigger tags
    (:func:`trigger_tags`) and up to :data:`SOURCE_TAGS_PER_CONCEPT` of its source file's own tags. Every
    trigger tag gets a count above the summed count of any other tag, so readers that sort tags by summed
    frequency (A1111's card, Civitai-style taggers) list every concept's trigger first. Source tags are left
    out when they alone would make A1111 treat the set as sentences (average tag length ≥ 16, then split
    into words, dropping words under 3 characters).
    """
    names = list(names)
    srcs = list(source_metadata)
    per: list[tuple[str, list[str], dict[str, int]]] = []
    used: set[str] = set()
    for i, trig in enumerate(triggers):
        tags = trigger_tags(trig)
        if not tags:
            continue
        name = (names[i] if i < len(names) and names[i] else tags[0]).strip() or f"concept{i + 1}"
        key = f"1_{name}"
        j = 2
        while key in used:
            key, j = f"1_{name}_{j}", j + 1
        used.add(key)
        counts = tag_frequencies(srcs[i]) if i < len(srcs) and srcs[i] else {}
        own = sorted((t for t in counts if t not in tags and counts[t] > 0), key=lambda t: -counts[t])
        per.append((key, tags, {t: counts[t] for t in own[:SOURCE_TAGS_PER_CONCEPT]}))
    all_triggers = [t for _, tags, _ in per for t in tags]
    other_tags = [t for _, _, extra in per for t in extra]
    if _non_comma(all_triggers + other_tags) and not _non_comma(all_triggers):
        per = [(key, tags, {}) for key, tags, _ in per]
    totals: dict[str, int] = {}
    for _, _tags, extra in per:
        for t, n in extra.items():
            if t not in all_triggers:
                totals[t] = totals.get(t, 0) + n
    top = max(totals.values(), default=0) + 1
    return {key: {**dict.fromkeys(tags, top), **extra} for key, tags, extra in per}


def trigger_metadata(
    triggers: Sequence[str],
    names: Sequence[str] = (),
    source_metadata: Sequence[Mapping[str, str] | None] = (),
) -> dict[str, str]:
    """The fields WebUI and model-site tools read trigger words from, for a merge of concepts:
    ``ss_tag_frequency`` (:func:`merged_tag_frequency`, JSON; A1111's card tags and random prompt) and
    ModelSpec's ``modelspec.trigger_phrase`` (the triggers, comma-separated). Empty without triggers."""
    freq = merged_tag_frequency(triggers, names, source_metadata)
    if not freq:
        return {}
    phrase = ", ".join(t for trig in triggers for t in trigger_tags(trig))
    return {"ss_tag_frequency": json.dumps(freq, ensure_ascii=False), "modelspec.trigger_phrase": phrase}


def webui_user_metadata(triggers: Sequence[str], arch: str, description: str = "") -> dict[str, Any]:
    """The WebUI's extra-networks user metadata (the sidecar ``NAME.json`` its card editor writes) of a
    merged LoRA: ``activation text`` = every concept's trigger words (added to the prompt with the LoRA),
    ``sd version``, ``description``, and the editor's other fields at their defaults."""
    return {
        "description": description,
        "sd version": WEBUI_SD_VERSION.get(arch, "Unknown"),
        "activation text": ", ".join(t for trig in triggers for t in trigger_tags(trig)),
        "preferred weight": 0.0,
        "negative text": "",
        "notes": "",
    }


def recipe_metadata(
    *,
    sources: Sequence[Mapping[str, Any]] | Sequence[str] = (),
    method: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    trigger: Iterable[str] = (),
    tag_sources: Sequence[Mapping[str, str] | None] = (),
) -> dict[str, str]:
    """Our ``loraclr_*`` recipe fields, JSON-encoded: sources (names, hashes, weights…), the method,
    its parameters and the trigger words of the result. ``merged_from`` (ModelSpec) lists source names.
    With trigger words (one string per concept, in the order of ``sources``) also the fields other tools
    read them from (:func:`trigger_metadata`); ``tag_sources``: each concept's source file metadata, whose
    ``ss_tag_frequency`` tags are carried over."""
    from lib_loraclr import __version__

    meta: dict[str, str] = {LORACLR_VERSION: __version__}
    srcs = list(sources)
    names = [s if isinstance(s, str) else str(s.get("name", "")) for s in srcs]
    if srcs:
        meta[LORACLR_SOURCES] = json.dumps(srcs, ensure_ascii=False)
        meta["modelspec.merged_from"] = ", ".join(n for n in names if n)
    if method:
        meta[LORACLR_METHOD] = method
    if parameters:
        meta[LORACLR_PARAMETERS] = json.dumps(dict(parameters), ensure_ascii=False, default=str)
    triggers = [str(w) for w in trigger]
    words = [w for w in triggers if w]
    if words:
        meta[LORACLR_TRIGGER] = json.dumps(words, ensure_ascii=False)
        meta.update(trigger_metadata(triggers, names if len(names) == len(triggers) else (), tag_sources))
    return meta
