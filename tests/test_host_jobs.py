"""`lib_loraclr.host_jobs`: progress, interrupt, queue lock and Forge's main thread for long work."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from lib_loraclr.host_jobs import as_job, call_on, interrupted, show_progress


class State(SimpleNamespace):
    def begin(self, job: str) -> None:
        self.log.append(("begin", job))

    def end(self) -> None:
        self.log.append(("end",))


def test_progress_is_one_job_whose_steps_are_the_stage_units():
    state = State(log=[])
    show_progress(state, "text encoder", 7, 5)
    assert (state.job_count, state.job_no, state.sampling_steps, state.sampling_step) == (1, 0, 5, 5)
    assert state.textinfo == "LoRACLR merge: text encoder"
    show_progress(state, "x", 0, 0)
    assert (state.sampling_steps, state.sampling_step) == (1, 0)
    show_progress(None, "x", 1, 2)  # no state: nothing to show, no error
    assert interrupted(SimpleNamespace(interrupted=True)) and not interrupted(None)


def test_a_job_holds_the_lock_and_clears_the_interrupt_even_when_it_fails():
    state, lock = State(log=[], interrupted=True), threading.Lock()

    def work() -> int:
        assert lock.locked() and state.log == [("begin", "merge")]
        return 3

    assert as_job(state, lock, work, "merge") == 3
    assert state.log == [("begin", "merge"), ("end",)] and state.interrupted is False and not lock.locked()
    state.interrupted = True
    with pytest.raises(KeyError):
        as_job(state, lock, lambda: {}["missing"], "merge")
    assert state.log[-1] == ("end",) and state.interrupted is False and not lock.locked()
    assert as_job(None, None, lambda: 4, "merge") == 4


def test_work_on_the_main_thread_returns_its_result_and_raises_its_error_here():
    ran_on: list[str] = []

    class MainThread:
        def run_and_wait_result(self, fn):
            t = threading.Thread(target=fn, name="main")
            t.start()
            t.join()

    def work() -> int:
        ran_on.append(threading.current_thread().name)
        return 5

    assert call_on(MainThread(), work) == 5 and ran_on == ["main"]
    with pytest.raises(ZeroDivisionError):
        call_on(MainThread(), lambda: 1 / 0)
    assert call_on(None, lambda: 6) == 6


def test_a_failed_main_thread_job_leaves_nothing_alive_in_the_hosts_last_task():
    """Forge Neo's main-thread loop keeps its last task (our closure) until the next one comes; the closure's
    result box must not keep the error, whose frames hold a failed merge's model (~4 GiB on SD1.5)."""
    import gc
    import weakref

    class Model:
        pass

    refs: list[weakref.ref] = []

    class KeepsLastTask:  # like modules_forge.main_thread.loop: `task` stays referenced after it ran
        last = None

        def run_and_wait_result(self, fn):
            self.last = fn
            fn()

    def failing_merge() -> None:
        model = Model()
        refs.append(weakref.ref(model))
        raise RuntimeError("a bug in the merge")

    host = KeepsLastTask()
    with pytest.raises(RuntimeError):
        call_on(host, failing_merge)
    gc.collect()
    assert host.last is not None and refs[0]() is None
