"""A door check for ``POST /sdapi/v1/txt2img`` and ``img2img``: bad CLoRA input answers HTTP 422.

The WebUI runs a script's hooks inside its own ``try``/``except`` (an error there is logged and the image is
made anyway), so a script cannot refuse an API request. This ASGI middleware reads the request body first:
when the body uses CLoRA (``alwayson_scripts`` → ``CLoRA`` or ``<clora:…>`` tags in the prompt), it runs
the same checks the script runs (`lib_loraclr.clora_job.check_request`: the arguments dict, the prompt
syntax, the LoRA files and their trigger words) and answers ``422 {"error": <class>, "detail": <message>}`` before any work
is queued; otherwise the body is handed on unchanged. The UI path keeps the script's behaviour (CLoRA off for
that image, the message in the infotext and the console).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

GUARDED_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
MAX_BODY = 256 << 20  # an img2img body carries base64 images; larger bodies are passed on unchecked

#: ``check(body) → (error class name, message)`` of the first user error, or None
Check = Callable[[Mapping[str, Any]], "tuple[str, str] | None"]


class CloraRequestGuard:
    """Pure ASGI middleware (no Starlette ``BaseHTTPMiddleware``: reading the body there hangs the route on
    the Starlette of A1111 1.10); ``check`` runs in a worker thread (it may read LoRA files)."""

    def __init__(self, app: Any, check: Check) -> None:
        self.app = app
        self.check = check

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        if (
            scope.get("type") != "http"
            or scope.get("method") != "POST"
            or scope.get("path") not in GUARDED_PATHS
        ):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = None
        if size <= MAX_BODY:
            try:
                data = json.loads(body or b"null")
            except ValueError:  # not JSON: the route answers that itself
                data = None
            if isinstance(data, Mapping):
                problem = await asyncio.get_running_loop().run_in_executor(None, self.check, data)
        if problem is not None:
            kind, detail = problem
            await _json_response(send, 422, {"error": kind, "detail": detail})
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _json_response(send: Any, status: int, content: Mapping[str, Any]) -> None:
    payload = json.dumps(content).encode("utf8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def install(app: Any, check: Check) -> bool:
    """Add the guard to the WebUI's FastAPI ``app`` once (``on_app_started``; the app is already serving, so
    the middleware stack is rebuilt on the next request, as the WebUI's own ``setup_middleware`` does).
    Returns False when it was installed before (a reloaded script)."""
    for m in getattr(app, "user_middleware", []):
        if getattr(getattr(m, "cls", None), "__name__", "") == CloraRequestGuard.__name__:
            return False
    app.middleware_stack = None
    app.add_middleware(CloraRequestGuard, check=check)
    return True
