"""A merge request as JSON (the WebUI tab and ``POST /loraclr/v1/merge``), validated at the door.

Request (keys in any order, defaults when omitted, unknown keys refused)::

    {
      "loras": [{"name": "mycat", "trigger": "sks cat", "te_weight": 1.0, "unet_weight": 1.0}, …],  # 2…N
      "method": "loraclr" | "lsq" | "linear" | "svd",          default "loraclr"
      "preset": "recommended" | "official",                    default "recommended"
      "output": {"kind": "lora" | "checkpoint", "name": "…", "rank": 32, "overwrite": false},
      "advanced": {"sample_steps": 20, "seed": 0, "device": "cuda", …}   `MergeConfig` fields, checked here
    }

``advanced.device`` defaults to ``"auto"`` (a CUDA GPU when torch sees one with room, else the CPU) and
``advanced.distill_steps`` to the device's choice (100 refinement steps for the recommended LoRACLR merge on
a GPU, none on the CPU; 0 turns it off): `MergeConfig.effective_distill_steps`.

`validate_request` → `MergeRequest` (LoRAs by name: the WebUI resolves them in its LoRA folder and runs the
job, `lib_loraclr.merge.job`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lib_loraclr import validate
from lib_loraclr.errors import LoraclrError
from lib_loraclr.merge.job import DEFAULT_RANK, KINDS
from lib_loraclr.merge.solvers import METHODS

PRESETS = ("recommended", "official")
REQUEST_KEYS = ("loras", "method", "preset", "output", "advanced")
LORA_KEYS = ("name", "trigger", "te_weight", "unet_weight", "prompts")
OUTPUT_KEYS = ("kind", "name", "rank", "overwrite")


class MergeRequestError(LoraclrError, ValueError):
    """The request is wrong; the message says what to change (HTTP 400)."""


@dataclass(frozen=True)
class LoraSpec:
    name: str
    trigger: str = ""
    te_weight: float = 1.0
    unet_weight: float = 1.0
    prompts: tuple[str, ...] = ()


@dataclass(frozen=True)
class MergeRequest:
    loras: tuple[LoraSpec, ...]
    method: str = "loraclr"
    preset: str = "recommended"
    kind: str = "lora"
    name: str = ""
    rank: int = DEFAULT_RANK
    overwrite: bool = False
    advanced: dict[str, Any] = field(default_factory=dict)


def _check_keys(d: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for k in d:
        if k not in known:
            raise MergeRequestError(f"unknown key {k!r} in {where}; known: {', '.join(known)}")


def _num(v: Any, what: str) -> float:
    if isinstance(v, bool):
        raise MergeRequestError(f"{what} must be a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise MergeRequestError(f"{what} must be a number, got {v!r}") from None
    if not math.isfinite(x):
        raise MergeRequestError(f"{what} must be finite, got {v!r}")
    return x


def _weight(v: Any, what: str) -> float:
    """A concept weight: a finite number with ``|w|`` ≤ `validate.MAX_CONCEPT_WEIGHT`."""
    x = _num(v, what)
    try:
        return validate.check_concept_weight(x, what)
    except LoraclrError as e:
        raise MergeRequestError(str(e)) from None


#: ``advanced`` options: MergeConfig fields a JSON request may set, with their checks
_ADV_INT = {
    "sample_steps": (1, validate.MAX_STEPS),
    "seed": (0, 2**63 - 1),
    "sample_images": (1, 64),
    "svd_rank": (1, validate.MAX_RANK),
    "sketch_rows": (1, 100_000),
    "max_stats_bytes": (1, 1 << 40),
    "distill_steps": (0, 10_000),
}
_ADV_FLOAT = {"ridge": (0.0, 1e6)}
_ADV_TEXT = ("sampler", "sample_prompts", "prior", "kv_rows", "device")
_ADV_BOOL = ("preserve_base", "report_features")
_ADV_PROMPTS = ("templates", "neutral_prompts")
ADVANCED_KEYS = (*_ADV_INT, *_ADV_FLOAT, *_ADV_TEXT, *_ADV_BOOL, *_ADV_PROMPTS, "shape", "loraclr_overrides")


def validate_advanced(advanced: Mapping[str, Any]) -> dict[str, Any]:
    """Check the ``advanced`` options at the door (names, types, ranges) → MergeConfig keyword arguments.

    Enumerated texts (sampler, prior, …) are checked by name here or by ``MergeConfig.validate``."""
    _check_keys(advanced, ADVANCED_KEYS, "advanced")
    out: dict[str, Any] = {}
    for k, v in advanced.items():
        what = f"advanced.{k}"
        if k in _ADV_INT:
            lo, hi = _ADV_INT[k]
            x = _num(v, what)
            if x != int(x) or not lo <= x <= hi:
                raise MergeRequestError(f"{what} must be a whole number from {lo} to {hi}, got {v!r}")
            out[k] = int(x)
        elif k in _ADV_FLOAT:
            lo, hi = _ADV_FLOAT[k]
            x = _num(v, what)
            if not lo <= x <= hi:
                raise MergeRequestError(f"{what} must be between {lo:g} and {hi:g}, got {v!r}")
            out[k] = x
        elif k in _ADV_TEXT:
            if v is not None and not isinstance(v, str):
                raise MergeRequestError(f"{what} must be text, got {v!r}")
            if k == "sampler" and v is not None:
                from lib_loraclr.models.sampling import SAMPLERS

                if v not in SAMPLERS:
                    raise MergeRequestError(
                        f"{what}: unknown sampler {v!r}; choose one of {', '.join(SAMPLERS)}"
                    )
            if k == "device":
                if v is None:
                    continue  # the default, "auto"
                from lib_loraclr.merge.pipeline import MergeInputError, merge_device

                try:
                    merge_device(v)
                except MergeInputError as e:
                    raise MergeRequestError(f"{what}: {e}") from None
            out[k] = v
        elif k in _ADV_BOOL:
            if v is not None and not isinstance(v, bool):
                raise MergeRequestError(f"{what} must be true, false or null, got {v!r}")
            out[k] = v
        elif k in _ADV_PROMPTS:
            if (
                isinstance(v, str)
                or not isinstance(v, (list, tuple))
                or not 1 <= len(v) <= 32
                or not all(isinstance(t, str) and t.strip() for t in v)
            ):
                raise MergeRequestError(f"{what} must be a list of 1 to 32 non-empty strings")
            out[k] = tuple(v)
        elif k == "shape":
            if v is None:
                out[k] = None
                continue
            if isinstance(v, str) or not isinstance(v, (list, tuple)) or len(v) != 3:
                raise MergeRequestError(f"{what} must be [channels, height, width] (latent size), got {v!r}")
            dims = [_num(x, what) for x in v]
            if any(d != int(d) or not 1 <= d <= 1024 for d in dims):
                raise MergeRequestError(f"{what} entries must be whole numbers from 1 to 1024, got {v!r}")
            out[k] = tuple(int(d) for d in dims)
        else:  # loraclr_overrides: names are checked by MergeConfig, values must be plain and finite
            if not isinstance(v, Mapping):
                raise MergeRequestError(f"{what} must be an object of LoRACLR parameters")
            for name, x in v.items():
                if not isinstance(x, (bool, str)):
                    _num(x, f"{what}.{name}")
            out[k] = dict(v)
    return out


def validate_request(data: Any) -> MergeRequest:
    """JSON-like dict → `MergeRequest`; raises `MergeRequestError` with a message for the user."""
    if not isinstance(data, Mapping):
        raise MergeRequestError("the merge request must be a JSON object")
    _check_keys(data, REQUEST_KEYS, "the merge request")
    loras_in = data.get("loras")
    if not isinstance(loras_in, (list, tuple)) or len(loras_in) < 2:
        raise MergeRequestError("pick at least two LoRAs to merge")
    loras = []
    for i, item in enumerate(loras_in):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping):
            raise MergeRequestError(f"LoRA {i + 1} must be a name or an object with a name")
        _check_keys(item, LORA_KEYS, f"LoRA {i + 1}")
        name = str(item.get("name") or "").strip()
        if not name:
            raise MergeRequestError(f"LoRA {i + 1} has no name")
        trigger = item.get("trigger")
        if trigger is not None and not isinstance(trigger, str):
            raise MergeRequestError(f"LoRA {name!r}: trigger must be text, got {trigger!r}")
        if trigger and trigger.strip():
            try:
                validate.check_trigger(trigger, f"LoRA {name!r}")
            except LoraclrError as e:
                raise MergeRequestError(str(e)) from None
        prompts = item.get("prompts") or ()
        if isinstance(prompts, str) or not all(isinstance(q, str) for q in prompts):
            raise MergeRequestError(f"LoRA {name!r}: prompts must be a list of strings")
        loras.append(
            LoraSpec(
                name=name,
                trigger=str(item.get("trigger") or "").strip(),
                te_weight=_weight(item.get("te_weight", 1.0), f"{name}: te_weight"),
                unet_weight=_weight(item.get("unet_weight", 1.0), f"{name}: unet_weight"),
                prompts=tuple(prompts),
            )
        )
    names = [spec.name for spec in loras]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MergeRequestError(f"LoRA {dup[0]!r} is listed twice")
    method = str(data.get("method", "loraclr")).lower()
    if method not in METHODS:
        raise MergeRequestError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    preset = str(data.get("preset", "recommended")).lower()
    if preset not in PRESETS:
        raise MergeRequestError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out = data.get("output") or {}
    if not isinstance(out, Mapping):
        raise MergeRequestError("output must be an object {kind, name, rank, overwrite}")
    _check_keys(out, OUTPUT_KEYS, "output")
    kind = str(out.get("kind", "lora")).lower()
    if kind not in KINDS:
        raise MergeRequestError(f"output kind must be 'lora' or 'checkpoint', got {kind!r}")
    name = str(out.get("name") or "").strip()
    if not name:
        raise MergeRequestError("give the output a name")
    rank_v = _num(out.get("rank", DEFAULT_RANK), "rank")
    if rank_v != int(rank_v) or not 1 <= rank_v <= 1024:
        raise MergeRequestError(f"rank must be a whole number from 1 to 1024, got {out.get('rank')!r}")
    overwrite = out.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise MergeRequestError("overwrite must be true or false")
    advanced = data.get("advanced") or {}
    if not isinstance(advanced, Mapping):
        raise MergeRequestError("advanced must be an object")
    return MergeRequest(
        tuple(loras), method, preset, kind, name, int(rank_v), overwrite, validate_advanced(advanced)
    )
