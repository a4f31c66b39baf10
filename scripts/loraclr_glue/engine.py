"""The one place where the glue calls the ``lib_loraclr`` engines (small adapter functions).

An engine API that does not exist yet raises `EngineUnavailable` with the missing name, so the UI and
the REST route can say so instead of failing with an ImportError stack trace.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lib_loraclr.clora.tokens import token_positions_from as token_positions_from  # the adapters call it here
from lib_loraclr.clora_args import CloraArgs


class EngineUnavailable(RuntimeError):
    """An engine function this glue needs is missing from this build of lib_loraclr."""


# ------------------------------------------------------------------------------------------------ LoRA files

_lora_cache: dict[tuple[str, int, int], Any] = {}
_lora_cache_lock = threading.Lock()
_LORA_CACHE_SIZE = 8


def read_lora(path: Path) -> Any:
    """`lib_loraclr.readers.read_lora` with a small cache keyed by (path, mtime, size) → DeltaSet."""
    from lib_loraclr.readers import read_lora as _read

    st = os.stat(path)
    key = (str(path), int(st.st_mtime_ns), int(st.st_size))
    with _lora_cache_lock:
        hit = _lora_cache.get(key)
    if hit is not None:
        return hit
    ds = _read(path)
    with _lora_cache_lock:
        if len(_lora_cache) >= _LORA_CACHE_SIZE:
            _lora_cache.pop(next(iter(_lora_cache)))
        _lora_cache[key] = ds
    return ds


def trigger_words(path: Path) -> list[str]:
    """`lib_loraclr.merge.job.file_trigger_words`: the file's metadata, else the sidecar's activation text."""
    from lib_loraclr.merge.job import file_trigger_words

    return file_trigger_words(Path(path))


def inspect_lora(path: Path) -> dict[str, Any]:
    """`lib_loraclr.inspect.inspect_file` (plain JSON-able dict)."""
    try:
        from lib_loraclr.inspect import inspect_file
    except ImportError as e:  # pragma: no cover - depends on the build
        raise EngineUnavailable(f"lib_loraclr.inspect.inspect_file is missing ({e})") from None
    return inspect_file(path)


# ------------------------------------------------------------------------------------------------ merge


def merge_loras(
    model: Any, concepts: Sequence[Any], config: Any, progress: Callable[[str, int, int], None] | None
) -> Any:
    """`lib_loraclr.merge.pipeline.merge_loras(model, concepts, config, progress)` → MergeResult(deltas, report)."""
    try:
        from lib_loraclr.merge.pipeline import merge_loras as _merge
    except ImportError as e:
        raise EngineUnavailable(
            f"the merge pipeline (lib_loraclr.merge.pipeline.merge_loras) is not available in this build ({e})"
        ) from None
    return _merge(model, concepts, config, progress=progress)


def load_base_model(checkpoint: Path, unet_factory: Callable[[Any], Any] | None = None) -> Any:
    """The base model for the merge, built from the checkpoint FILE (A1111 keeps LoRA deltas patched into
    the live model between generations, so the live model is not a clean base).

    Uses `lib_loraclr.base_model.load_base` (SD1.x and the bundled tiny models). Its UNet is ldm's, which
    A1111 ships; a host without ldm passes ``unet_factory`` (Forge: `host_models.forge_unet_factory`).
    Without either, raises EngineUnavailable (HTTP 503) with what to do instead.
    """
    try:
        from lib_loraclr.base_model import load_base
    except ImportError as e:
        raise EngineUnavailable(f"lib_loraclr.base_model is not available in this build ({e})") from None
    try:
        return load_base(checkpoint, unet_factory=unet_factory)
    except ModuleNotFoundError as e:
        raise EngineUnavailable(
            f"merging needs the '{e.name}' package to rebuild the base model, and this WebUI does not have it "
            "(nor Forge's UNet class); run `python -m lib_loraclr merge` in a venv made by .ci/venv.sh instead"
        ) from None


def loader_gap_lines(gaps: dict[str, list[str]]) -> list[str]:
    """`lib_loraclr.keymap.format_loader_gaps`: one readable line per loader that ignores modules."""
    from lib_loraclr.keymap import format_loader_gaps

    return format_loader_gaps(gaps)


def output_path(name: str, folder: Path) -> Path:
    """`lib_loraclr.safeio.check_output_name`: a bare file name inside ``folder`` (no path tricks)."""
    from lib_loraclr.safeio import check_output_name

    return check_output_name(name, folder)


# ------------------------------------------------------------------------------------------------ CLoRA


def clora_options(args: CloraArgs, steps: int) -> Any:
    """`CloraArgs.to_options`: the UI/API/infotext value → the engine's `lib_loraclr.clora.CloraOptions`."""
    return args.to_options(steps)


def host_tokenize_line(sd_model: Any) -> Callable[[str], tuple[Sequence[Any], int]]:
    """The first text encoder's ``tokenize_line``: Forge ``text_processing_engine`` (``_l`` for SDXL),
    A1111 ``cond_stage_model`` (SD1/SD2) or ``conditioner.embedders[0]`` (SDXL)."""
    candidates = [
        getattr(sd_model, "text_processing_engine", None),
        getattr(sd_model, "text_processing_engine_l", None),
        getattr(sd_model, "cond_stage_model", None),
    ]
    embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", None)
    if embedders:
        candidates.append(embedders[0])
    for c in candidates:
        fn = getattr(c, "tokenize_line", None)
        if callable(fn):
            return fn
    raise EngineUnavailable("this model has no tokenize_line (unsupported model type for CLoRA)")


def branch_prompts(
    base_prompt: str, concepts: Sequence[tuple[str, str]], token_positions: Callable[[str, str], list[int]]
) -> Any:
    """`lib_loraclr.clora.branch_prompts` with ``concepts`` = ``[(trigger, words)]``.

    TODO(D): bindings locate their words by character span (``Binding.span``); branch_prompts takes the
    first occurrence of the words, so a repeated word binds its first occurrence.
    """
    from lib_loraclr.clora import Concept
    from lib_loraclr.clora import branch_prompts as _bp

    return _bp(base_prompt, [Concept(t, w) for t, w in concepts], token_positions)


def routed_loras(
    model: Any, branches: Sequence[Sequence[tuple[Any, float]]], prefix: str = "", key_filter: Any = None
) -> Any:
    from lib_loraclr.clora import RoutedLoras

    return RoutedLoras(model, branches, prefix=prefix, key_filter=key_filter)


def te_branch_conds(
    encode: Callable[[list[str]], Any], prompts: Sequence[Sequence[str]], router: Any
) -> list[Any]:
    from lib_loraclr.clora import te_branch_conds as _te

    return _te(encode, prompts, router)


def clora_denoiser(**kwargs: Any) -> Any:
    from lib_loraclr.clora import CloraDenoiser

    return CloraDenoiser(**kwargs)


def input_scale_of(inner_model: Any) -> Callable[[Any], Any]:
    """``c_in(σ)`` of a k-diffusion wrapper (`lib_loraclr.clora.denoiser.default_input_scale`)."""
    from lib_loraclr.clora.denoiser import default_input_scale

    return default_input_scale(inner_model)


def attention_capture(unet: Any) -> Any:
    """Capture at the layers whose maps localise the concepts (`localizing_layers`)."""
    from lib_loraclr.clora import AttentionCapture
    from lib_loraclr.clora.attention import localizing_layers

    return AttentionCapture(unet, localizing_layers(unet))


def user_layout(args: CloraArgs, n_concepts: int, latent_hw: tuple[int, int]) -> Any:
    """The user's ratio-string layout as ``[1, K, h, w]`` masks (region r → the r-th concept), or None."""
    if not args.layout or n_concepts < 1:
        return None
    from lib_loraclr.clora.layout import box_masks, layout_weights, parse_ratio_layout

    return layout_weights(box_masks(parse_ratio_layout(args.layout), latent_hw), n_concepts)


def regional_denoiser(fusion: Any, layout: Any) -> Any:
    """CLoRA's routed mode around a built `CloraDenoiser` ``fusion`` (same conds and LoRAs): one UNet pass
    per step with per-region LoRAs; with no user layout, ``fusion`` finds the layout in the first steps."""
    from lib_loraclr.clora.regional import RegionalDenoiser

    return RegionalDenoiser(
        fusion.inner_model,
        fusion.unet,
        fusion.conds,
        fusion.unconds,
        fusion.router,
        layout=layout,
        estimator=None if layout is not None else fusion,
    )
