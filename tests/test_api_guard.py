"""The API door for txt2img / img2img (`lib_loraclr/api_guard.py`): bad CLoRA input → HTTP 422
before the request reaches the WebUI; every other request reaches it with its body unchanged."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from lib_loraclr import api_guard


def _run(guard, path: str, body: bytes, chunks: int = 1, method: str = "POST"):
    """Send one request through ``guard`` → (response status, response body, what the app received)."""
    seen = {}
    step = max(1, -(-len(body) // chunks))  # the body in ``chunks`` messages, as a client may send it
    parts = [body[i : i + step] for i in range(0, len(body), step)] or [b""]
    queue = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)
    ]

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        got = b""
        while True:
            m = await receive()
            got += m.get("body", b"")
            if not m.get("more_body"):
                break
        seen["body"] = got
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard.app = app
    scope = {"type": "http", "method": method, "path": path}
    asyncio.run(guard(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, payload, seen.get("body")


def _guard(calls):
    def check(body):
        calls.append(body)
        if "bad" in body.get("prompt", ""):
            return ("CloraArgsError", "CLoRA mask_threshold must be between 0 and 1, got 2")
        return None

    return api_guard.CloraRequestGuard(None, check)


def test_bad_clora_input_is_answered_422_and_never_reaches_the_webui():
    calls = []
    body = json.dumps({"prompt": "a bad cat", "alwayson_scripts": {"CLoRA": {"args": [True, {}]}}}).encode()
    status, payload, reached = _run(_guard(calls), "/sdapi/v1/txt2img", body, chunks=3)
    assert status == 422 and reached is None
    assert json.loads(payload) == {
        "error": "CloraArgsError",
        "detail": "CLoRA mask_threshold must be between 0 and 1, got 2",
    }
    assert calls == [json.loads(body)]


def test_good_requests_reach_the_webui_with_the_same_body():
    calls = []
    body = json.dumps({"prompt": "a cat", "steps": 3}).encode()  # checked, fine
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):
        assert _run(_guard(calls), path, body, chunks=4) == (200, b"ok", body)
    # not JSON, other routes, GET: passed on untouched and never checked
    assert _run(_guard(calls), "/sdapi/v1/txt2img", b"{not json") == (200, b"ok", b"{not json")
    bad = json.dumps({"prompt": "bad"}).encode()
    assert _run(_guard(calls), "/sdapi/v1/options", bad) == (200, b"ok", bad)
    assert _run(_guard(calls), "/sdapi/v1/txt2img", b"", method="GET") == (200, b"ok", b"")
    assert len(calls) == 2


def test_install_once_and_rebuild_the_stack():
    added = []
    app = SimpleNamespace(user_middleware=[], middleware_stack=object())

    def add_middleware(cls, **kw):
        added.append((cls, kw))
        app.user_middleware.insert(0, SimpleNamespace(cls=cls, kwargs=kw))

    app.add_middleware = add_middleware
    check = lambda body: None  # noqa: E731
    assert api_guard.install(app, check) is True
    assert app.middleware_stack is None  # rebuilt by the app on its next request
    assert added == [(api_guard.CloraRequestGuard, {"check": check})]
    assert api_guard.install(app, check) is False and len(added) == 1
