"""What the CLoRA script does in each WebUI hook (the ``Script`` subclass only delegates here).

Errors never stop the user's generation with a stack trace: the WebUI catches exceptions of script
hooks and prints tracebacks itself, so every hook here catches, prints ``[sd-webui-loraclr] …`` with
the user-facing message (caret lines for syntax errors), writes ``CLoRA error`` into the infotext,
removes any hook and lets the image generate without CLoRA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lib_loraclr import clora_args as ca
from lib_loraclr.clora.masks import mask_image, save_mask_images
from lib_loraclr.clora_job import LOG_PREFIX, batch_prompt, fail, invalidate_cond_cache
from lib_loraclr.host_objects import unsupported_model

from . import clora_run
from .adapters import pick_adapter
from .lora_files import lora_dir


class CloraScriptLogic:
    """Hook implementations; ``shared`` is the WebUI's ``modules.shared`` (for the LoRA folder)."""

    def __init__(self, shared: Any = None) -> None:
        self._shared = shared

    @property
    def shared(self) -> Any:
        if self._shared is None:
            from modules import shared

            self._shared = shared
        return self._shared

    # ------------------------------------------------------------------ hooks
    def process(self, p: Any, *script_args: Any) -> clora_run.CloraRun | None:
        clora_run.finish(p)  # a stale run of the same object (should not happen)
        try:
            args = ca.from_script_args(script_args)
        except ca.CloraArgsError as e:
            fail(p, e)
            return None
        prompts = list(getattr(p, "all_prompts", None) or [getattr(p, "prompt", "")])
        if not any(ca.is_active(args, q) for q in prompts):
            return None
        why = unsupported_model(getattr(p, "sd_model", None))
        if why is not None:  # inert: nothing hooked, the host's own LoRA loading untouched
            print(f"{LOG_PREFIX} {why}")
            params = getattr(p, "extra_generation_params", None)
            if isinstance(params, dict):
                params[ca.INFOTEXT_NOTICE_KEY] = why
            return None
        if getattr(p, "_ad_inner", False):
            print(f"{LOG_PREFIX} ADetailer inpaint pass: CLoRA is not applied to face/region crops")
            return None
        run = clora_run.CloraRun(args=args, lora_folder=lora_dir(self.shared))
        run.infotext = p.extra_generation_params
        try:
            run.prepare(prompts)
        except Exception as e:
            fail(p, e)
            return None
        clora_run.register(p, run)
        p.extra_generation_params.update(ca.to_infotext(args, include_table=args.enabled))
        invalidate_cond_cache(p)
        return run

    def before_sampling(self, p: Any, *, cfg: Any = None, late: bool = False) -> None:
        """``process_before_every_sampling`` (or the first CFG-denoiser call on A1111 < 1.10)."""
        run = clora_run.get(p)
        if run is None:
            return
        masks_only = bool(getattr(p, "is_hr_pass", False))
        if late:
            run.notice("A1111 before 1.10: CLoRA starts at the second sampling step")
        try:
            run.install(pick_adapter(p), p, batch_prompt(p), masks_only=masks_only)
        except Exception as e:
            run.remove()
            clora_run.finish(p)
            fail(p, e)

    def cfg_denoiser(self, params: Any) -> None:
        """``on_cfg_denoiser`` fallback for A1111 1.8/1.9 (no ``process_before_every_sampling``)."""
        denoiser = getattr(params, "denoiser", None)
        p = getattr(denoiser, "p", None)
        run = clora_run.get(p) if p is not None else None
        if run is None or (
            run.installed
            and run.installed_on is p
            and run.adapter is not None
            and getattr(run.adapter, "_cfg", None) is denoiser
        ):
            return
        run.remove()
        try:
            run.install(pick_adapter(p), p, batch_prompt(p), masks_only=bool(getattr(p, "is_hr_pass", False)))
            run.notice("A1111 before 1.10: CLoRA starts at the second sampling step")
        except Exception as e:
            clora_run.finish(p)
            fail(p, e)

    def postprocess_batch(self, p: Any) -> list[Path]:
        """Keep this batch's mask previews (``mask_preview``) and save the masks beside the images
        (``show_masks``); returns the written files."""
        run = clora_run.get(p)
        weights = getattr(run.denoiser, "last_weights", None) if run is not None else None
        if run is None or weights is None:
            return []
        try:
            if run.args.mask_preview:
                run.mask_images.extend(mask_image(weights[i]) for i in range(weights.shape[0]))
            if run.args.show_masks:
                folder = Path(getattr(p, "outpath_samples", None) or ".")
                seeds = list(getattr(p, "seeds", None) or [])
                return save_mask_images(weights, folder, seeds, int(getattr(p, "iteration", 0) or 0))
        except Exception as e:
            fail(p, e, "could not draw or save the CLoRA masks")
        return []

    def postprocess(self, p: Any, processed: Any = None) -> None:
        """End the run; with ``mask_preview`` the masks join the result images (gallery and API), each
        with the infotext of the first image."""
        run = clora_run.finish(p)
        if run is not None:
            run.add_mask_previews(getattr(processed, "images", None), getattr(processed, "infotexts", None))

    def unload(self) -> None:
        clora_run.remove_all()
