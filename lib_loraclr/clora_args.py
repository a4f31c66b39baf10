"""CLoRA script arguments: ONE validated value for the UI, the API and the infotext (pure, no WebUI import).

The WebUI passes an AlwaysVisible script's arguments positionally (``alwayson_scripts`` args follow
``ui()`` order), which breaks API users whenever the UI changes. As in ADetailer, the script takes
``[enabled, {dict}]`` (or just ``[{dict}]``); the dict is order-independent, every key is optional
(defaults below), unknown keys are refused with a clear message. See :func:`validate` and
:func:`from_script_args`.

Keys (types, defaults, ranges):

==================== ========= ========= ===============================================================
key                  type      default   meaning
==================== ========= ========= ===============================================================
enabled              bool      False     use the table rows (``<clora:…>`` tags in the prompt turn CLoRA
                                         on by themselves, like ``<lora:…>`` tags)
mode                 str       fusion    "fusion": one branch per LoRA, masked fusion (CLoRA);
                                         "routed": one UNet pass, each LoRA only inside its region
layout               str       ""        the user's layout as a Regional Prompter ratio string ("1,1" =
                                         two columns, "1,2;1" = rows); region r → the r-th concept in
                                         the prompt; "" = automatic masks from the attention
region_prompt        str       concept   routed mode: what region k's cross-attention reads: "concept" = the
                                         concept's own phrase ("sks cat", like one Regional Prompter
                                         region), "scene" = the whole prompt with that concept's trigger
region_crops         float     0         routed mode: weight (0–1) of each region also denoised as its own
                                         cropped canvas with only its LoRA and prompt (0 = off)
base_uncond          float     1         weight (0–1) of the base model's unconditional prediction (no
                                         LoRA) in the concept regions: 1 = CFG guides from the bare base
                                         toward each LoRA, 0 = each region's own (the paper's CFG)
mask_rule            str       layout    automatic masks: "layout" (concepts compete for each position,
                                         frozen after the first steps) or "paper" (α·max thresholds)
latent_update        bool      False     contrastive latent update (off by default: it lowered
                                         two-concept success in the measuring world)
update_steps         int       None      the update runs during the first N sampling steps (0–1000);
                                         None = the engine's recommended schedule (scales with steps)
step_size            float     None      latent step size; None = the engine's default
refinement_steps     [int]     [0]       sampling steps at which the update is iterated (e.g. [0, 10, 20])
refinement_iters     int       5         iterations at each refinement step (0–100)
mask_threshold       float     0.3       mask = attention > threshold · max (0 < t < 1)
masks_only           bool      False     masked fusion without any gradient (fast; also the fallback)
show_masks           bool      False     save the fusion masks beside the output images
mask_preview         bool      False     add each image's masks to the result gallery / API images
                                         (the UI's checkbox is on by default; API users opt in)
loras                [row]     []        table rows: {lora, weight, words, trigger[, unet_weight]}
==================== ========= ========= ===============================================================

Infotext: ``CLoRA`` holds the options as ``key=value`` pairs (no commas, so the WebUI does not quote
it), ``CLoRA table`` the table rows as JSON. ``<clora:…>`` tags stay in the prompt itself.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lib_loraclr.clora.options import CloraOptions
from lib_loraclr.errors import LoraclrError
from lib_loraclr.prompt_syntax import ParsedPrompt, bind_words, has_clora_tags, parse_prompt, with_bindings
from lib_loraclr.validate import MAX_CONCEPT_WEIGHT

#: largest latent step size (the engine's default is 20; far larger values only blow the latent up)
MAX_STEP_SIZE = 1e4
#: the engine's recommended settings: the one source of the defaults both share
_RECOMMENDED = CloraOptions.recommended()

INFOTEXT_KEY = "CLoRA"
INFOTEXT_TABLE_KEY = "CLoRA table"
INFOTEXT_NOTICE_KEY = "CLoRA notice"
ROW_KEYS = ("lora", "weight", "words", "trigger", "unet_weight")
TABLE_HEADERS = ["LoRA", "weight", "words", "trigger words"]


class CloraArgsError(LoraclrError, ValueError):
    """CLoRA arguments that cannot be accepted; the message names the key and what is allowed."""


@dataclass(frozen=True)
class LoraRow:
    """One table row: a LoRA bound to ``words`` of the prompt, with optional explicit ``trigger`` words.

    ``weight`` is the text-encoder weight and, unless ``unet_weight`` is set, the UNet weight too.
    """

    lora: str
    weight: float = 1.0
    words: str = ""
    trigger: str = ""
    unet_weight: float | None = None

    @property
    def te_weight(self) -> float:
        return self.weight

    @property
    def unet(self) -> float:
        return self.weight if self.unet_weight is None else self.unet_weight


@dataclass(frozen=True)
class CloraArgs:
    """Validated CLoRA options (see the module docstring for each field)."""

    enabled: bool = False
    mode: str = "fusion"
    layout: str = ""
    region_prompt: str = "concept"
    region_crops: float = 0.0
    base_uncond: float = _RECOMMENDED.base_uncond
    mask_rule: str = "layout"
    latent_update: bool = False
    update_steps: int | None = None
    step_size: float | None = None
    refinement_steps: tuple[int, ...] = _RECOMMENDED.refinement_steps
    refinement_iters: int = _RECOMMENDED.refinement_iters
    mask_threshold: float = _RECOMMENDED.mask_threshold
    masks_only: bool = False
    show_masks: bool = False
    mask_preview: bool = False
    loras: tuple[LoraRow, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the API form); ``validate(args.to_dict()) == args``."""
        d = asdict(self)
        d["refinement_steps"] = list(self.refinement_steps)
        d["loras"] = [
            {k: v for k, v in asdict(r).items() if not (k == "unet_weight" and v is None)} for r in self.loras
        ]
        return d

    def to_options(self, steps: int) -> CloraOptions:
        """These arguments → the engine's options for a run of ``steps`` sampling steps: the recommended
        schedule (`CloraOptions.recommended`) with what the user set."""
        kw: dict[str, Any] = {
            "latent_update": self.latent_update,
            "refinement_steps": tuple(self.refinement_steps),
            "refinement_iters": self.refinement_iters,
            "mask_threshold": self.mask_threshold,
            "masks_only": self.masks_only,
            "mask_rule": self.mask_rule,
            "region_crops": self.region_crops,
            "base_uncond": self.base_uncond,
        }
        if self.update_steps is not None:
            kw["update_until"] = self.update_steps
        if self.step_size is not None:
            kw["step_size"] = self.step_size
        return CloraOptions.recommended(steps, **kw)

    @property
    def gradient_free(self) -> bool:
        """True when no latent gradient is needed (masks only, or latent update off)."""
        return self.masks_only or not self.latent_update


FIELD_NAMES = tuple(f.name for f in fields(CloraArgs))
DEFAULTS = CloraArgs()


def _unknown(key: str, known: Sequence[str], where: str) -> CloraArgsError:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return CloraArgsError(f"unknown CLoRA {where} {key!r}{hint}; known: {', '.join(known)}")


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise CloraArgsError(f"CLoRA {key} must be true or false, got {v!r}")


def _number(key: str, v: Any) -> float:
    if isinstance(v, bool):
        raise CloraArgsError(f"CLoRA {key} must be a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise CloraArgsError(f"CLoRA {key} must be a number, got {v!r}") from None
    if not math.isfinite(x):
        raise CloraArgsError(f"CLoRA {key} must be a finite number, got {v!r}")
    return x


def _int(key: str, v: Any, lo: int, hi: int) -> int:
    x = _number(key, v)
    if x != int(x):
        raise CloraArgsError(f"CLoRA {key} must be a whole number, got {v!r}")
    if not lo <= x <= hi:
        raise CloraArgsError(f"CLoRA {key} must be between {lo} and {hi}, got {int(x)}")
    return int(x)


def _steps(key: str, v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        parts = [p for p in v.replace("/", ",").replace(";", ",").replace(" ", ",").split(",") if p]
    elif isinstance(v, Iterable):
        parts = list(v)
    else:
        parts = [v]
    return tuple(sorted({_int(key, p, 0, 10000) for p in parts}))


def _weight(key: str, v: Any) -> float:
    """A LoRA weight: finite, ``|w|`` ≤ `lib_loraclr.validate.MAX_CONCEPT_WEIGHT`."""
    x = _number(key, v)
    if abs(x) > MAX_CONCEPT_WEIGHT:
        raise CloraArgsError(
            f"CLoRA {key} is {x:g}; a LoRA weight must be between {-MAX_CONCEPT_WEIGHT:g} and "
            f"{MAX_CONCEPT_WEIGHT:g} (typically 0.5 to 1.5)"
        )
    return x


def _text(key: str, v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):  # empty cell of a pandas-backed Dataframe
        return ""
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise CloraArgsError(f"CLoRA {key} must be text, got {v!r}")
    return str(v).strip()


MODES = ("fusion", "routed")
REGION_PROMPTS = ("concept", "scene")
MASK_RULES = ("layout", "paper")


def _choice(key: str, v: Any, allowed: Sequence[str]) -> str:
    text = _text(key, v).lower() or allowed[0]
    if text not in allowed:
        raise CloraArgsError(f"CLoRA {key} must be one of {', '.join(allowed)}, got {v!r}")
    return text


def _layout(v: Any) -> str:
    """A Regional Prompter ratio string (``"1,1"``, ``"1,2;1"``), checked by parsing it; "" = automatic."""
    from lib_loraclr.clora.layout import LayoutError, parse_ratio_layout

    text = "".join(_text("layout", v).split())
    if not text:
        return ""
    try:
        parse_ratio_layout(text)
    except LayoutError as e:
        raise CloraArgsError(f"CLoRA {e}") from None
    return text


def _is_blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def validate_row(row: Any, index: int = 0) -> LoraRow | None:
    """One table row from a dict (``{lora, weight, words, trigger[, unet_weight]}``), a list in table
    column order (``[lora, weight, words, trigger]``) or a `LoraRow`; ``None`` for a blank row."""
    where = f"table row {index + 1}"
    if isinstance(row, LoraRow):
        row = asdict(row)
    if isinstance(row, Mapping):
        for k in row:
            if k not in ROW_KEYS:
                raise _unknown(k, ROW_KEYS, f"{where} key")
        data = dict(row)
    elif isinstance(row, Sequence) and not isinstance(row, str):
        if len(row) > len(ROW_KEYS):
            raise CloraArgsError(
                f"CLoRA {where} has {len(row)} cells; expected at most {len(ROW_KEYS)}: {', '.join(ROW_KEYS)}"
            )
        data = dict(zip(ROW_KEYS, row))
    else:
        raise CloraArgsError(f"CLoRA {where} must be a dict or a list, got {row!r}")
    if all(_is_blank(data.get(k)) for k in ("lora", "words", "trigger")):
        return None
    lora = _text(f"{where} lora", data.get("lora"))
    if not lora:
        raise CloraArgsError(f"CLoRA {where}: choose a LoRA (the words {data.get('words')!r} have none)")
    weight = 1.0 if _is_blank(data.get("weight")) else _weight(f"{where} weight", data["weight"])
    unet = (
        None if _is_blank(data.get("unet_weight")) else _weight(f"{where} unet_weight", data["unet_weight"])
    )
    words = _text(f"{where} words", data.get("words"))
    if not words:
        raise CloraArgsError(f"CLoRA {where} ({lora}): give the words of the prompt this LoRA binds to")
    trigger = _text(f"{where} trigger", data.get("trigger"))
    return LoraRow(lora=lora, weight=weight, words=words, trigger=trigger, unet_weight=unet)


def validate(data: Mapping[str, Any] | CloraArgs | None = None, **overrides: Any) -> CloraArgs:
    """The one validation function: a dict (any key order, any subset of keys) → `CloraArgs`.

    Raises `CloraArgsError` for unknown keys, wrong types and out-of-range values.
    """
    if data is None:
        data = {}
    if isinstance(data, CloraArgs):
        data = data.to_dict()
    if not isinstance(data, Mapping):
        raise CloraArgsError(f"CLoRA arguments must be a dict, got {type(data).__name__}")
    merged = {**data, **overrides}
    for k in merged:
        if k not in FIELD_NAMES:
            raise _unknown(k, FIELD_NAMES, "argument")
    d = DEFAULTS
    get = merged.get
    threshold = _number("mask_threshold", get("mask_threshold", d.mask_threshold))
    if not 0.0 < threshold < 1.0:
        raise CloraArgsError(f"CLoRA mask_threshold must be between 0 and 1 (exclusive), got {threshold}")
    step_size = get("step_size", d.step_size)
    if _is_blank(step_size):
        step_size = None
    else:
        step_size = _number("step_size", step_size)
        if step_size < 0:
            raise CloraArgsError(
                f"CLoRA step_size must be positive (0 = the engine's default), got {step_size}"
            )
        if step_size > MAX_STEP_SIZE:
            raise CloraArgsError(
                f"CLoRA step_size must be at most {MAX_STEP_SIZE:g} (default 20), got {step_size:g}"
            )
        step_size = step_size or None  # 0 → the engine's default
    rows_in = get("loras", ())
    if rows_in is None:
        rows_in = ()
    if isinstance(rows_in, (str, bytes, Mapping)) or not isinstance(rows_in, Iterable):
        raise CloraArgsError("CLoRA loras must be a list of rows {lora, weight, words, trigger}")
    rows = tuple(r for r in (validate_row(x, i) for i, x in enumerate(rows_in)) if r is not None)
    triggers: dict[str, list[str]] = {}
    for r in rows:
        triggers.setdefault(r.lora, []).append(r.trigger)
    dup = sorted(n for n, ts in triggers.items() if len(ts) > 1 and (not all(ts) or len(set(ts)) < len(ts)))
    if dup:
        raise CloraArgsError(
            f"CLoRA table: LoRA {dup[0]!r} appears in several rows; use one row per LoRA, or give each row "
            "its own trigger words (a merged LoRA holding several concepts)"
        )
    mode = _choice("mode", get("mode", d.mode), MODES)
    mask_rule = _choice("mask_rule", get("mask_rule", d.mask_rule), MASK_RULES)
    layout = _layout(get("layout", d.layout))
    crops = _number("region_crops", get("region_crops", d.region_crops))
    if not 0.0 <= crops <= 1.0:
        raise CloraArgsError(f"CLoRA region_crops must lie between 0 and 1, got {crops:g}")
    base_uncond = _number("base_uncond", get("base_uncond", d.base_uncond))
    if not 0.0 <= base_uncond <= 1.0:
        raise CloraArgsError(f"CLoRA base_uncond must lie between 0 and 1, got {base_uncond:g}")
    return CloraArgs(
        enabled=_bool("enabled", get("enabled", d.enabled)),
        mode=mode,
        layout=layout,
        region_prompt=_choice("region_prompt", get("region_prompt", d.region_prompt), REGION_PROMPTS),
        region_crops=crops,
        base_uncond=base_uncond,
        mask_rule=mask_rule,
        latent_update=_bool("latent_update", get("latent_update", d.latent_update)),
        update_steps=None
        if _is_blank(get("update_steps")) or str(get("update_steps")).strip().lower() == "auto"
        else _int("update_steps", get("update_steps"), 0, 1000),
        step_size=step_size,
        refinement_steps=_steps("refinement_steps", get("refinement_steps", d.refinement_steps)),
        refinement_iters=_int("refinement_iters", get("refinement_iters", d.refinement_iters), 0, 100),
        mask_threshold=threshold,
        masks_only=_bool("masks_only", get("masks_only", d.masks_only)),
        show_masks=_bool("show_masks", get("show_masks", d.show_masks)),
        mask_preview=_bool("mask_preview", get("mask_preview", d.mask_preview)),
        loras=rows,
    )


def from_script_args(args: Sequence[Any]) -> CloraArgs:
    """The script's ``*args`` → `CloraArgs`.

    Accepted forms (UI and API): ``[]``, ``[enabled]``, ``[{dict}]``, ``[enabled, {dict}]``; a CloraArgs
    instead of the dict. The dict's own ``enabled`` wins over the positional flag.
    """
    args = list(args or ())
    enabled: Any = None
    if args and not isinstance(args[0], (Mapping, CloraArgs)):
        enabled = args.pop(0)
    if len(args) > 1:
        raise CloraArgsError(
            f"CLoRA expects [enabled, {{options}}] as script args, got {len(args) + (enabled is not None)} values"
        )
    data: Mapping[str, Any] | CloraArgs = args[0] if args else {}
    if data is None:
        data = {}
    if isinstance(data, CloraArgs):
        data = data.to_dict()
    if not isinstance(data, Mapping):
        raise CloraArgsError(f"CLoRA options must be a dict, got {type(data).__name__}")
    if enabled is not None and "enabled" not in data:
        data = {**data, "enabled": enabled}
    return validate(data)


# ---------------------------------------------------------------------------------------------- infotext

_INFOTEXT_SHORT = {
    "mode": "mode",
    "layout": "layout",
    "region_prompt": "regions",
    "region_crops": "crops",
    "base_uncond": "base_uncond",
    "mask_rule": "masks",
    "latent_update": "latent",
    "update_steps": "steps",
    "step_size": "step",
    "refinement_steps": "refine",
    "refinement_iters": "iters",
    "mask_threshold": "threshold",
    "masks_only": "masks_only",
    "show_masks": "show_masks",
}
_INFOTEXT_LONG = {v: k for k, v in _INFOTEXT_SHORT.items()}


def _fmt(v: Any) -> str:
    if isinstance(v, str) and not v:
        return "-"
    if isinstance(v, str):
        return v.replace(",", "_").replace(";", "~")  # no commas: the WebUI would quote the value
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, tuple):
        return "/".join(str(x) for x in v) or "-"
    if v is None:
        return "auto"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def to_infotext(args: CloraArgs, include_table: bool = True) -> dict[str, str]:
    """``p.extra_generation_params`` entries: ``{"CLoRA": "latent=1 steps=10 …", "CLoRA table": "[…]"}``.

    Every option is written (not only non-defaults), so a later change of a default cannot change what
    an old image's infotext restores.
    """
    opts = " ".join(f"{short}={_fmt(getattr(args, name))}" for name, short in _INFOTEXT_SHORT.items())
    out = {INFOTEXT_KEY: opts}
    if include_table and args.loras:
        rows = [
            [r.lora, r.weight, r.words, r.trigger] + ([r.unet_weight] if r.unet_weight is not None else [])
            for r in args.loras
        ]
        out[INFOTEXT_TABLE_KEY] = json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
    return out


def parse_infotext_options(text: str) -> dict[str, Any]:
    """``"latent=1 steps=10 …"`` → ``{"latent_update": "1", "update_steps": "10", …}`` (unvalidated)."""
    out: dict[str, Any] = {}
    for part in str(text).split():
        if "=" not in part:
            raise CloraArgsError(f"CLoRA infotext: expected key=value, got {part!r}")
        k, v = part.split("=", 1)
        if k not in _INFOTEXT_LONG:
            raise _unknown(k, list(_INFOTEXT_LONG), "infotext key")
        name = _INFOTEXT_LONG[k]
        if name in ("refinement_steps", "layout") and v == "-":
            v = ""
        if name == "layout":
            v = v.replace("_", ",").replace("~", ";")
        if name in ("step_size", "update_steps") and v == "auto":
            v = None
        out[name] = v
    return out


def from_infotext(params: Mapping[str, Any]) -> CloraArgs | None:
    """Parsed infotext (``{key: value}`` as the WebUI's ``parse_generation_parameters`` gives it) →
    `CloraArgs` with ``enabled=True``, or ``None`` when the infotext has no CLoRA entry."""
    if INFOTEXT_KEY not in params:
        return None
    data = parse_infotext_options(params[INFOTEXT_KEY])
    data.setdefault("mask_rule", "paper")  # written before the layout rule existed: restore what made it
    data.setdefault("region_prompt", "scene")  # written before concept region prompts existed
    data.setdefault("base_uncond", 0.0)  # written before the base model's uncond (2026-12-07)
    table = params.get(INFOTEXT_TABLE_KEY)
    if table:
        if isinstance(table, str):
            try:
                table = json.loads(table)
            except json.JSONDecodeError as e:
                raise CloraArgsError(f"CLoRA infotext: the table is not valid JSON ({e})") from None
        data["loras"] = table
    data["enabled"] = bool(data.get("loras"))
    return validate(data)


# ------------------------------------------------------------------------------- syntax + table together


def rows_from_prompt(parsed: ParsedPrompt) -> tuple[LoraRow, ...]:
    """The ``<clora:…>`` tags of a parsed prompt as table rows (the same fields as the table)."""
    return tuple(
        LoraRow(
            lora=b.lora,
            weight=b.te_weight,
            words=b.words,
            trigger=b.trigger or "",
            unet_weight=None if b.unet_weight == b.te_weight else b.unet_weight,
        )
        for b in parsed.bindings
    )


def resolve(args: CloraArgs, prompt: str) -> ParsedPrompt:
    """Bindings for one prompt: its ``<clora:…>`` tags plus (when ``args.enabled``) the table rows.

    Raises `lib_loraclr.prompt_syntax.PromptSyntaxError` for bad tags, table words missing from the
    prompt, a LoRA both in the prompt and in the table, or two LoRAs on the same words.
    """
    parsed = parse_prompt(prompt)
    for b in parsed.bindings:  # tag weights, checked like the table's (CloraArgsError names the LoRA)
        _weight(f"<clora:{b.lora}> weight", b.te_weight)
        _weight(f"<clora:{b.lora}> unet weight", b.unet_weight)
    if not args.enabled or not args.loras:
        return parsed
    extra = [
        bind_words(parsed, r.lora, r.words, r.weight, r.unet_weight, r.trigger or None) for r in args.loras
    ]
    return with_bindings(parsed, extra)


def is_active(args: CloraArgs, prompt: str) -> bool:
    """CLoRA runs when the table is enabled with rows, or the prompt holds ``<clora:…>`` tags."""
    return (args.enabled and bool(args.loras)) or has_clora_tags(prompt)


__all__ = [
    "DEFAULTS",
    "FIELD_NAMES",
    "INFOTEXT_KEY",
    "INFOTEXT_NOTICE_KEY",
    "INFOTEXT_TABLE_KEY",
    "TABLE_HEADERS",
    "CloraArgs",
    "CloraArgsError",
    "LoraRow",
    "from_infotext",
    "from_script_args",
    "is_active",
    "parse_infotext_options",
    "resolve",
    "rows_from_prompt",
    "to_infotext",
    "validate",
    "validate_row",
]
