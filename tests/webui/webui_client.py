"""A urllib JSON client for the HTTP tests against a RUNNING WebUI (A1111 or Forge) with sd-webui-loraclr installed.

They run only when ``LORACLR_WEBUI_URL`` names the server (e.g. ``http://127.0.0.1:7861``, started with
``--api`` or ``--nowebui``) and are skipped otherwise, so CI collects and skips them. No third-party HTTP
client: ``urllib`` only.

Environment:
- ``LORACLR_WEBUI_URL``      base URL of the WebUI (required to run anything here).
- ``LORACLR_WEBUI_LORAS``    two (or more) comma-separated LoRA names in the WebUI's LoRA folder, each with
                             trigger words in its metadata (default: the first two that have them).
- ``LORACLR_WEBUI_TIMEOUT``  seconds for one generation / merge request (default 1800; CPU hosts are slow).
- ``LORACLR_WEBUI_MERGE``    JSON object merged into the merge request's ``advanced`` (default
                             ``{"sample_steps": 2}`` so a CPU host finishes in minutes).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

URL_ENV = "LORACLR_WEBUI_URL"
TEST_PREFIX = "loraclr_test_"


@dataclass
class Response:
    status: int
    body: Any

    @property
    def text(self) -> str:
        return self.body if isinstance(self.body, str) else json.dumps(self.body)


class WebUI:
    """A tiny JSON client for one running WebUI."""

    def __init__(self, base: str, timeout: float) -> None:
        self.base = base.rstrip("/")
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Response:
        data = None if body is None else json.dumps(body).encode("utf8")
        req = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        text = raw.decode("utf8", "replace")
        try:
            return Response(status, json.loads(text))
        except ValueError:
            return Response(status, text)

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        return self.request("POST", path, {} if body is None else body, **kw)

    def txt2img(self, prompt: str, **payload: Any) -> tuple[dict[str, Any], str]:
        """Run a small txt2img (64×64, 2 steps, fixed seed unless overridden) → (info dict, first infotext)."""
        body = {
            "prompt": prompt,
            "negative_prompt": "",
            "seed": 1234,
            "steps": 2,
            "width": 64,
            "height": 64,
            "cfg_scale": 5,
            "sampler_name": "Euler",
            "batch_size": 1,
            "n_iter": 1,
            "send_images": True,
            "save_images": False,
            **payload,
        }
        r = self.post("/sdapi/v1/txt2img", body)
        assert r.status == 200, f"txt2img → {r.status}: {r.text[:2000]}"
        info = json.loads(r.body["info"])
        return {**info, "images": r.body["images"]}, info["infotexts"][0]


def infotext_params(infotext: str) -> dict[str, str]:
    """The ``Key: value`` pairs of an infotext's last line (quoted values unquoted)."""
    last = infotext.strip().splitlines()[-1]
    out: dict[str, str] = {}
    key, buf, quoted, i = None, "", False, 0
    parts: list[str] = []
    while i < len(last):  # split on ", " outside quotes
        ch = last[i]
        if ch == '"':
            quoted = not quoted
        if not quoted and last.startswith(", ", i):
            parts.append(buf)
            buf, i = "", i + 2
            continue
        buf += ch
        i += 1
    parts.append(buf)
    for part in parts:
        if ": " in part:
            key, val = part.split(": ", 1)
            val = val.strip()
            if len(val) >= 2 and val[0] == val[-1] == '"':
                val = json.loads(val)  # the WebUI quotes with json.dumps
            out[key.strip()] = val
    return out


def pick_loras(client: WebUI, host: str = "the WebUI") -> list[str]:
    """Two LoRAs with trigger words: ``LORACLR_WEBUI_LORAS`` (comma separated) or the first two the
    extension lists (not our own test outputs). Skips the test when there are fewer than two."""
    import os

    import pytest

    r = client.get("/loraclr/v1/loras")
    assert r.status == 200, f"/loraclr/v1/loras → {r.status}: {r.text[:500]}"
    listed = {x["name"]: x for x in r.body["loras"]}
    wanted = [n.strip() for n in os.environ.get("LORACLR_WEBUI_LORAS", "").split(",") if n.strip()]
    if wanted:
        missing = [n for n in wanted if n not in listed]
        assert not missing, (
            f"LORACLR_WEBUI_LORAS names {missing}, not in {host}'s LoRA folder: {sorted(listed)}"
        )
        return wanted
    usable = [n for n, x in listed.items() if x["trigger_words"] and not n.startswith(TEST_PREFIX)]
    if len(usable) < 2:
        pytest.skip(f"need two LoRAs with trigger words in {host}'s LoRA folder; found {usable}")
    return usable[:2]
