"""A test-only WebUI extension: ANOTHER extension's CFG callbacks, counted, for the real-host check that they
still fire while CLoRA runs (issue #10: CLoRA wraps only the model call, the host's CFG denoiser stays).

Install it beside the extension (symlink this folder into the host's ``extensions/``). It registers
``on_cfg_denoiser``, ``on_cfg_denoised`` and ``on_cfg_after_cfg`` and serves the counts:
``GET /loraclr-probe/v1/counts`` → ``{"cfg_denoiser": n, "cfg_denoised": n, "cfg_after_cfg": n}``;
``POST /loraclr-probe/v1/reset``. Never shipped: it lives under ``tests/webui/``.
"""

from __future__ import annotations

from modules import script_callbacks  # type: ignore[import-not-found]

COUNTS = {"cfg_denoiser": 0, "cfg_denoised": 0, "cfg_after_cfg": 0}


def _counter(name: str):
    def count(params: object) -> None:
        COUNTS[name] += 1

    return count


for _name in COUNTS:
    register = getattr(script_callbacks, f"on_{_name}", None)
    if callable(register):
        register(_counter(_name))


def _routes(_demo: object, app) -> None:
    @app.get("/loraclr-probe/v1/counts")
    def counts() -> dict:
        return dict(COUNTS)

    @app.post("/loraclr-probe/v1/reset")
    def reset() -> dict:
        for k in COUNTS:
            COUNTS[k] = 0
        return dict(COUNTS)


script_callbacks.on_app_started(_routes)
