"""``modules.call_queue`` stand-in: the queue lock and ``wrap_gradio_gpu_call`` (task id, state begin/end,
errors → extra outputs + an HTML error as the last output)."""

import html
import threading

from modules import shared

queue_lock = threading.Lock()


def wrap_gradio_gpu_call(func, extra_outputs=None):
    def f(*args, **kwargs):
        id_task = args[0] if args and isinstance(args[0], str) and args[0].startswith("task(") else None
        with queue_lock:
            shared.state.begin(job=id_task)
            try:
                res = list(func(*args, **kwargs))
            except Exception as e:
                res = [
                    *list(extra_outputs or [None, ""]),
                    f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>",
                ]
            finally:
                shared.state.end()
        res[-1] += "<div class='performance'></div>"
        return tuple(res)

    return f
