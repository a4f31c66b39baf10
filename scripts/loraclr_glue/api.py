"""The merge service (shared by the tab and the REST routes) and the FastAPI routes.

Routes (registered in ``on_app_started``; JSON in, JSON out; with the WebUI's ``--api`` or ``--nowebui``):

- ``POST /loraclr/v1/merge``   — body: see `lib_loraclr.merge.request`; 200 ``{file, kind, prompt, report, report_rows}``;
  400 bad request, 409 interrupted, 503 engine missing in this build;
- ``POST /loraclr/v1/inspect`` — body ``{"name": "mycat"}`` or ``{"names": [...]}``; 200 ``{"loras": [summary…]}``;
- ``GET  /loraclr/v1/loras?search=`` — ``{"loras": [{name, file, trigger_words}]}``.

Heavy work runs like the WebUI's own jobs: A1111 under ``call_queue.queue_lock`` with ``shared.state``
begun and ended (so ``/sdapi/v1/progress`` and Interrupt work); Forge on its main-thread helper.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib_loraclr.errors import ServiceError
from lib_loraclr.folder_merge import release_memory, service_error
from lib_loraclr.host_jobs import as_job, call_on, interrupted, show_progress
from lib_loraclr.lora_folder import inspect_request, lora_listing
from lib_loraclr.merge.request import MergeRequestError, validate_request

from .lora_files import find_lora, list_host_loras, lora_dir, run_merge

__all__ = ["MergeService", "ServiceError", "register_routes"]


class MergeService:
    """Merge/inspect/list on the running WebUI (``shared`` = ``modules.shared``; lazily imported)."""

    def __init__(self, shared: Any = None, runner: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        self._shared = shared
        self._runner = runner

    @property
    def shared(self) -> Any:
        if self._shared is None:
            from modules import shared

            self._shared = shared
        return self._shared

    # ------------------------------------------------------------------ folders
    def lora_folder(self) -> Path | None:
        return lora_dir(self.shared)

    def checkpoint_folder(self) -> Path | None:
        d = getattr(getattr(self.shared, "cmd_opts", None), "ckpt_dir", None)
        if d:
            return Path(d)
        try:
            from modules import paths

            return Path(paths.models_path) / "Stable-diffusion"
        except Exception:
            return None

    def loaded_model(self) -> Any:
        """The host's loaded model, or None, without loading one: on A1111 ``shared.sd_model`` is a property
        that loads the checkpoint when none was loaded yet (``--skip-load-model-at-start``, a model unloaded
        to free memory); ``sd_models.model_data.sd_model`` is the plain attribute behind it."""
        try:
            from modules import sd_models
        except ImportError:
            sd_models = None
        data = getattr(sd_models, "model_data", None)
        if data is not None and hasattr(data, "sd_model"):
            return data.sd_model
        return getattr(self.shared, "sd_model", None)

    def base_checkpoint(self) -> Path | None:
        """The file of the loaded checkpoint; when none is loaded (Forge loads lazily and holds a placeholder
        model until the first generation; A1111 may start without one) the selected one: Forge's loading
        parameters, else the ``sd_model_checkpoint`` option matched against the WebUI's checkpoint list. The
        merge reads the file, so nothing is loaded for it."""
        info = getattr(self.loaded_model(), "sd_checkpoint_info", None)
        filename = getattr(info, "filename", None)
        if filename:
            return Path(filename)
        return self.selected_checkpoint()

    def selected_checkpoint(self) -> Path | None:
        try:
            from modules import sd_models
        except ImportError:
            return None
        params = getattr(getattr(sd_models, "model_data", None), "forge_loading_parameters", None)
        info = params.get("checkpoint_info") if isinstance(params, dict) else None
        if info is None:
            title = getattr(getattr(self.shared, "opts", None), "sd_model_checkpoint", None)
            match = getattr(sd_models, "get_closet_checkpoint_match", None)
            info = match(title) if title and callable(match) else None
        filename = getattr(info, "filename", None)
        return Path(filename) if filename else None

    def unet_factory(self) -> Any:
        """The base model's UNet builder for this host (`host_models.merge_unet_factory`; None = ldm's)."""
        from .host_models import merge_unet_factory

        return merge_unet_factory()

    # ------------------------------------------------------------------ progress / interrupt / thread
    def progress(self, stage: str, done: int, total: int) -> None:
        show_progress(getattr(self.shared, "state", None), stage, done, total)

    def should_stop(self) -> bool:
        return interrupted(getattr(self.shared, "state", None))

    def run_heavy(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` like the WebUI runs generation jobs (see the module docstring)."""
        return self._runner(fn) if self._runner is not None else call_on(forge_main_thread(), fn)

    def locked(self, fn: Callable[[], Any]) -> Any:
        """For the REST route: the WebUI's queue lock and ``shared.state`` begin/end around ``fn``."""
        try:
            from modules.call_queue import queue_lock
        except ImportError:
            queue_lock = None
        state = getattr(self.shared, "state", None)
        return as_job(state, queue_lock, lambda: self.run_heavy(fn), "loraclr_merge")

    # ------------------------------------------------------------------ operations
    def merge(self, body: Any, *, locked: bool = True) -> dict[str, Any]:
        try:
            req = validate_request(body)
        except MergeRequestError as e:
            raise ServiceError(400, str(e), type(e).__name__) from None

        def work() -> dict[str, Any]:
            import torch

            from .host_models import seed_clip_tokenizer

            seed_clip_tokenizer()  # Forge Neo: no open_clip_torch (see host_models)
            with torch.inference_mode(False), torch.enable_grad():
                return run_merge(
                    req,
                    lora_folder=self.lora_folder(),
                    checkpoint_folder=self.checkpoint_folder(),
                    base_checkpoint=self.base_checkpoint(),
                    progress=self.progress,
                    should_stop=self.should_stop,
                    unet_factory=self.unet_factory(),
                )

        err: ServiceError | None = None
        try:
            try:
                result = self.locked(work) if locked else self.run_heavy(work)
            except Exception as e:
                err = service_error(e)  # `e` (its frames hold the merge's model) is dropped with this block
        finally:
            release_memory()
        if err is not None:
            raise err
        self.refresh_loras()
        return result

    def preview(self, result: dict[str, Any], settings: Any) -> list[tuple[Any, str]]:
        """Preview images of a merged LoRA (`preview`): ``[(image, caption)]``, made by the WebUI's txt2img."""
        from modules import processing

        from . import preview

        prompts = preview.preview_prompts(
            Path(result["file"]).stem, [(c["name"], c["trigger"]) for c in result.get("concepts", [])]
        )
        return self.run_heavy(lambda: preview.render(processing, self.shared, prompts, settings))

    def refresh_loras(self) -> None:
        """Let the built-in Lora extension see a new file (its ``networks`` module, when loaded)."""
        import sys

        networks = sys.modules.get("networks")
        fn = getattr(networks, "list_available_networks", None)
        if callable(fn):
            try:
                fn()
            except Exception as e:
                print(f"[sd-webui-loraclr] could not refresh the LoRA list: {e}")

    def inspect(self, body: Any) -> dict[str, Any]:
        return inspect_request(body, lambda name: find_lora(name, self.lora_folder()))

    def loras(self, search: str = "") -> dict[str, Any]:
        return {"loras": lora_listing(list_host_loras(self.shared, search))}


def forge_main_thread() -> Any:
    """Forge's ``modules_forge.main_thread`` (heavy jobs run there), or None on A1111 (capability: the module
    exists; the model object cannot tell, Forge holds a placeholder until the first generation)."""
    import importlib.util

    if importlib.util.find_spec("modules_forge") is None:
        return None
    try:
        from modules_forge import main_thread
    except ImportError:
        return None
    return main_thread if callable(getattr(main_thread, "run_and_wait_result", None)) else None


def register_routes(app: Any, service: MergeService) -> None:
    """Add the routes to the WebUI's FastAPI app (``on_app_started(demo, app)``)."""
    from fastapi import Body
    from fastapi.responses import JSONResponse

    def respond(fn: Callable[[], dict[str, Any]]) -> Any:
        try:
            return fn()
        except ServiceError as e:
            content = {"error": e.message, **({"error_type": e.kind} if e.kind else {})}
            return JSONResponse(status_code=e.status, content=content)

    @app.post("/loraclr/v1/merge")
    def loraclr_merge(body: dict = Body(...)):  # noqa: B008 - FastAPI's idiom
        return respond(lambda: service.merge(body))

    @app.post("/loraclr/v1/inspect")
    def loraclr_inspect(body: dict = Body(...)):  # noqa: B008
        return respond(lambda: service.inspect(body))

    @app.get("/loraclr/v1/loras")
    def loraclr_loras(search: str = ""):
        return respond(lambda: service.loras(search))
