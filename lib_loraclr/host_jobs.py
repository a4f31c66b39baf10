"""Long work run the way a WebUI runs its own jobs, over objects the glue passes in (the WebUI's
``shared.state``, its queue lock, Forge's main-thread helper): progress, interrupt, lock and thread."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def show_progress(state: Any, stage: str, done: int, total: int) -> None:
    """Show ``done`` of ``total`` of a stage in the WebUI's progress bar (``state``: ``shared.state`` or None).

    The WebUI's progress is ``job_no/job_count + sampling_step/sampling_steps/job_count``: one job whose
    steps are the stage's units."""
    if state is None:
        return
    state.textinfo = f"LoRACLR merge: {stage}"
    state.job_count = 1
    state.job_no = 0
    state.sampling_steps = max(int(total), 1)
    state.sampling_step = min(int(done), state.sampling_steps)


def interrupted(state: Any) -> bool:
    """Whether the user pressed Interrupt (``state.interrupted``)."""
    return bool(getattr(state, "interrupted", False))


def call_on(main_thread: Any, fn: Callable[[], T]) -> T:
    """``fn()`` on Forge's main thread (``main_thread.run_and_wait_result``; None = here), its exception
    re-raised in the caller's thread."""
    if main_thread is None:
        return fn()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # carried back to the caller's thread
            box["error"] = e

    main_thread.run_and_wait_result(work)
    # emptied before raising: Forge Neo's main-thread loop keeps its last task (`work`, hence `box`) alive
    # until the next one, and the error's frames hold a failed merge's model
    error, result = box.pop("error", None), box.pop("result", None)
    if error is not None:
        raise error
    return result


def as_job(state: Any, lock: Any, fn: Callable[[], T], job: str) -> T:
    """``fn()`` as a WebUI job: under ``lock`` (the queue lock; None = none) with ``state.begin``/``end``
    around it, and ``interrupted`` cleared afterwards as the WebUI's ``wrap_gradio_call`` does."""
    with lock if lock is not None else contextlib.nullcontext():
        if state is not None:
            state.begin(job=job)
        try:
            return fn()
        finally:
            if state is not None:
                state.end()
                state.interrupted = False
