"""``modules.script_callbacks`` stand-in: registration (``on_*``) and the invokers the WebUI calls.

As in A1111 1.8 the registration functions take only the callback (``name=`` exists since 1.9: the glue
must not rely on it); invokers catch and print exceptions like the WebUI does."""

from collections import defaultdict

callback_map = defaultdict(list)


class CFGDenoiserParams:
    def __init__(
        self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None
    ):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


def _add(category, fn):
    callback_map[category].append(fn)


def clear_callbacks():
    callback_map.clear()


def _call(category, *args):
    out = []
    for fn in list(callback_map[category]):
        try:
            out.append(fn(*args))
        except Exception as e:  # the WebUI reports and goes on
            print(f"callback {category} failed: {type(e).__name__}: {e}")
    return out


def on_app_started(callback):
    _add("app_started", callback)


def on_ui_tabs(callback):
    _add("ui_tabs", callback)


def on_ui_settings(callback):
    _add("ui_settings", callback)


def on_before_ui(callback):
    _add("before_ui", callback)


def on_script_unloaded(callback):
    _add("script_unloaded", callback)


def on_infotext_pasted(callback):
    _add("infotext_pasted", callback)


def on_cfg_denoiser(callback):
    _add("cfg_denoiser", callback)


def on_cfg_denoised(callback):
    _add("cfg_denoised", callback)


def on_cfg_after_cfg(callback):
    _add("cfg_after_cfg", callback)


def on_model_loaded(callback):
    _add("model_loaded", callback)


def app_started_callback(demo, app):
    _call("app_started", demo, app)


def ui_tabs_callback():
    res = []
    for r in _call("ui_tabs"):
        res += r or []
    return res


def before_ui_callback():
    _call("before_ui")


def script_unloaded_callback():
    for fn in reversed(list(callback_map["script_unloaded"])):
        fn()


def cfg_denoiser_callback(params):
    _call("cfg_denoiser", params)


def cfg_denoised_callback(params):
    _call("cfg_denoised", params)


def cfg_after_cfg_callback(params):
    _call("cfg_after_cfg", params)


def remove_callbacks_for_function(callback_func):
    for callbacks in callback_map.values():
        while callback_func in callbacks:
            callbacks.remove(callback_func)


def infotext_pasted_callback(infotext, params):
    _call("infotext_pasted", infotext, params)
