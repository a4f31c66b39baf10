"""A urllib JSON client for the HTTP tests against a RUNNING WebUI (A1111 or Forge) with sd-webui-loraclr installed.

They run only when ``LORACLR_WEBUI_URL`` names the server (e.g. ``http://127.0.0.1:7861``, started with
``--api`` or ``--nowebui``) and are skipped otherwise, so CI collects and skips them. No third-party HTTP
client: ``urllib`` only.

Environment:
- ``LORACLR_WEBUI_URL``      base URL of the WebUI (required to run anything here).
- ``LORACLR_WEBUI_LORAS``    two (or more) comma-separated LoRA names in the WebUI's LoRA folder, each with
                             trigger words in its metadata (default: the first two that have them).
- ``LORACLR_WEBUI_TIMEOUT``  seconds for one generation / merge request (default 1800; CPU hosts are slow).
- ``LORACLR_WEBUI_SIZE``     image width = height of the test generations (default 128; a random-weight
                             SD1.5 gives NaNs in A1111 at 64×64, an 8×8 latent).
- ``LORACLR_WEBUI_REFERENCE`` a folder of reference generations made by the same host WITHOUT the
                             extension (``python tests/webui/webui_client.py reference …``); enables the
                             "CLoRA off changes nothing" test.
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


def image_size() -> int:
    import os

    return int(os.environ.get("LORACLR_WEBUI_SIZE", "128"))


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
        """Run a small txt2img (`image_size()`², 2 steps, fixed seed unless overridden) → (info dict, first infotext)."""
        body = {
            "prompt": prompt,
            "negative_prompt": "",
            "seed": 1234,
            "steps": 2,
            "width": image_size(),
            "height": image_size(),
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


# ---------------------------------------------------------------------------------------------- "off changes nothing"

#: a directory of reference images made by the SAME host WITHOUT the extension (see README.md here)
REFERENCE_ENV = "LORACLR_WEBUI_REFERENCE"

#: txt2img payloads of the "CLoRA off changes nothing" check; ``{lora}`` = a LoRA of the host's folder
REFERENCE_CASES: dict[str, dict[str, Any]] = {
    "plain": {"prompt": "a photo of a cat and a dog"},
    "lora": {"prompt": "a photo of a cat and a dog <lora:{lora}:1>"},
    "cfg_batch2": {"prompt": "a cat, a dog", "negative_prompt": "blurry", "batch_size": 2, "cfg_scale": 7},
}


def reference_payload(case: str, lora: str) -> dict[str, Any]:
    """The full txt2img body of a reference case (the defaults of `WebUI.txt2img` plus the case's fields)."""
    body: dict[str, Any] = {
        "negative_prompt": "",
        "seed": 1234,
        "steps": 2,
        "width": image_size(),
        "height": image_size(),
        "cfg_scale": 5,
        "sampler_name": "Euler",
        "batch_size": 1,
        "n_iter": 1,
        "send_images": True,
        "save_images": False,
    }
    body.update(REFERENCE_CASES[case])
    body["prompt"] = body["prompt"].replace("{lora}", lora)
    return body


def decoded_pixels(b64: str) -> tuple[tuple[int, int], str, bytes]:
    """(size, mode, raw pixel bytes) of a base64 PNG from the API (PNG text chunks are ignored)."""
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return im.size, im.mode, im.tobytes()


def save_references(client: WebUI, folder: str, lora: str) -> list[str]:
    """Run every reference case on ``client`` (a host WITHOUT the extension) and write ``CASE.json``
    (payload, images as base64, infotexts) into ``folder``. Returns the files written."""
    import os

    os.makedirs(folder, exist_ok=True)
    written = []
    for case in REFERENCE_CASES:
        body = reference_payload(case, lora)
        r = client.post("/sdapi/v1/txt2img", body)
        assert r.status == 200, f"txt2img → {r.status}: {r.text[:2000]}"
        info = json.loads(r.body["info"])
        path = os.path.join(folder, f"{case}.json")
        with open(path, "w", encoding="utf8") as f:
            json.dump(
                {
                    "case": case,
                    "lora": lora,
                    "payload": body,
                    "images": r.body["images"],
                    "infotexts": info["infotexts"],
                },
                f,
            )
        written.append(path)
    return written


if __name__ == "__main__":  # python tests/webui/webui_client.py reference FOLDER LORA_NAME
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "reference":
        sys.exit("usage: LORACLR_WEBUI_URL=… python tests/webui/webui_client.py reference FOLDER LORA_NAME")
    import os

    for p in save_references(
        WebUI(os.environ.get(URL_ENV, "http://127.0.0.1:7861"), 1800), sys.argv[2], sys.argv[3]
    ):
        print("wrote", p)
