"""Safe file input/output: safetensors and weights-only torch files in, atomic safetensors out.

Nothing here ever unpickles code: safetensors files are validated before they reach the safetensors
library (so a truncated file or a renamed pickle gets a clear message, not a crash), and ``.pt``/``.pth``
files go through ``torch.load(weights_only=True)`` only. Writes go to a temporary file in the target
folder and are renamed into place, so a failed or interrupted write never leaves a half file and never
replaces a user's file unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import secrets
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lib_loraclr.errors import (
    ArchitectureMismatchError,
    BadOutputNameError,
    LoraclrError,
    LoraFormatError,
    NonFiniteWeightsError,
    OutputExistsError,
    ShapeMismatchError,
    UnmappedKeysError,
    UnsafeFileError,
)
from lib_loraclr.validate import check_input_file

__all__ = [  # the errors are re-exported here for convenience (docs/DESIGN.md names safeio)
    "ArchitectureMismatchError",
    "BadOutputNameError",
    "LoraFormatError",
    "LoraclrError",
    "NonFiniteWeightsError",
    "OutputExistsError",
    "ShapeMismatchError",
    "UnmappedKeysError",
    "UnsafeFileError",
    "atomic_write_safetensors",
    "check_output_name",
    "load_torch_file",
    "read_safetensors",
    "read_safetensors_metadata",
    "sniff_format",
]

#: safetensors headers above this size are treated as corrupt (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000

_ZIP_MAGIC = b"PK\x03\x04"
#: bytes per element of the safetensors dtypes (sub-byte float types are left out of the size check)
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "C64": 8,
}
_SAFETENSORS_DTYPES = {
    "F64",
    "F32",
    "F16",
    "BF16",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "BOOL",
    "F8_E4M3",
    "F8_E5M2",
    "U16",
    "U32",
    "U64",
    "F8_E8M0",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "C64",
}


def sniff_format(path: str | os.PathLike[str]) -> str:
    """What a file holds judging by its first bytes.

    Returns ``"empty"``, ``"safetensors"`` (8-byte length + ``{``), ``"zip"`` (torch.save's format),
    ``"pickle"`` (legacy torch.save / raw pickle) or ``"unknown"``.
    """
    p = Path(path)
    with p.open("rb") as f:
        head = f.read(9)
    if not head:
        return "empty"
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """Validate the safetensors framing; returns (header, header_len, file_size)."""
    check_input_file(path, "file")  # InputFileError: missing, a folder, a device, no permission
    name = path.name
    size = path.stat().st_size
    if size == 0:
        raise LoraFormatError(f"{name}: the file is empty (0 bytes). Download or export it again.")
    kind = sniff_format(path)
    if kind in ("zip", "pickle"):
        raise UnsafeFileError(
            f"{name}: this is a PyTorch pickle file renamed to .safetensors. Pickle files can run code, "
            "so it is not loaded. Ask for a real .safetensors file, or convert the pickle yourself in a "
            "safe environment."
        )
    if size < 8:
        raise LoraFormatError(f"{name}: only {size} bytes; the file is truncated or not a safetensors file.")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or n > MAX_HEADER_BYTES:
            raise LoraFormatError(
                f"{name}: corrupt safetensors header (claims {n} header bytes); "
                "the file is damaged or not a safetensors file."
            )
        if 8 + n > size:
            raise LoraFormatError(
                f"{name}: the file is truncated: its header needs {8 + n} bytes but the file has {size}. "
                "Download it again."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFormatError(f"{name}: corrupt safetensors header ({e}); the file is damaged.") from e
    if not isinstance(header, dict):
        raise LoraFormatError(f"{name}: corrupt safetensors header (not a JSON object).")
    data_len = size - 8 - n
    end_max = 0
    for key, info in header.items():
        if key == "__metadata__":
            if info is not None and not isinstance(info, dict):
                raise LoraFormatError(f"{name}: corrupt safetensors metadata (not a JSON object).")
            continue
        ok = (
            isinstance(info, dict)
            and info.get("dtype") in _SAFETENSORS_DTYPES
            and isinstance(info.get("shape"), list)
            and all(isinstance(s, int) and s >= 0 for s in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(isinstance(o, int) for o in info["data_offsets"])
            and 0 <= info["data_offsets"][0] <= info["data_offsets"][1]
        )
        if not ok:
            raise LoraFormatError(f"{name}: corrupt safetensors header entry for tensor {key!r}.")
        width = _DTYPE_BYTES.get(info["dtype"])
        begin, end = info["data_offsets"]
        if width is not None and end - begin != math.prod(info["shape"]) * width:
            raise LoraFormatError(
                f"{name}: corrupt safetensors header: tensor {key!r} claims shape {info['shape']} "
                f"({info['dtype']}) but holds {end - begin} bytes; the file is damaged. Download or export it again."
            )
        end_max = max(end_max, info["data_offsets"][1])
    if end_max > data_len:
        raise LoraFormatError(
            f"{name}: the file is truncated: tensor data needs {end_max} bytes after the header "
            f"but only {data_len} are there. Download it again."
        )
    return header, n, size


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Only the ``__metadata__`` strings of a safetensors file (validated, no tensor is read)."""
    header, _, _ = _read_header(Path(path))
    meta = header.get("__metadata__") or {}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor (on CPU) and the metadata strings of a safetensors file.

    Raises:
        LoraFormatError: empty, truncated or corrupt file.
        UnsafeFileError: the file is a pickle (PyTorch checkpoint) renamed to ``.safetensors``.
    """
    p = Path(path)
    if not p.is_file():
        raise LoraFormatError(f"{p.name}: file not found ({p}).")
    header, _, _ = _read_header(p)
    meta = header.get("__metadata__") or {}
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(p), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError (and others) on damaged data
        raise LoraFormatError(f"{p.name}: the safetensors file is damaged and cannot be read ({e}).") from e
    return tensors, metadata


def load_torch_file(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with clear errors.

    Raises:
        UnsafeFileError: the file needs code execution (any global besides tensors and plain containers).
        LoraFormatError: empty, truncated or otherwise unreadable file.
    """
    p = Path(path)
    if not p.is_file():
        raise LoraFormatError(f"{p.name}: file not found ({p}).")
    if p.stat().st_size == 0:
        raise LoraFormatError(f"{p.name}: the file is empty (0 bytes). Download or export it again.")
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(
            f"{p.name}: refused to load: the file contains Python objects that could run code "
            f"(weights-only loading failed: {str(e).splitlines()[0][:200]}). Only load files from "
            "sources you trust, and prefer .safetensors."
        ) from e
    except Exception as e:  # zip/pickle framing errors, EOF on truncated files
        raise LoraFormatError(f"{p.name}: cannot read this PyTorch file ({type(e).__name__}: {e}).") from e


def _owns_storage(t: torch.Tensor) -> bool:
    return (
        t.is_contiguous()
        and t.storage_offset() == 0
        and (t.untyped_storage().nbytes() == t.numel() * t.element_size())
    )


def _sort_metadata_in_place(path: Path) -> None:
    """Rewrite the ``__metadata__`` of a just-written safetensors file with its keys sorted.

    The safetensors writer keeps metadata in a hash map, so the same metadata comes out in a different
    order on every save; sorted, the same tensors and metadata give the same bytes. The header keeps its
    length (the same JSON in another order; spaces pad, as the format allows), so only the header is
    rewritten. Left as written if the header cannot be re-encoded to the same length."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf8")
        if len(text) > n or json.loads(text) != json.loads(raw):
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def atomic_write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` to ``path`` atomically (temp file in the same folder, then rename).

    Tensors are moved to CPU and made contiguous (views are copied, so shared storage is fine).
    Metadata values that are not strings are stored as JSON. Returns the written path.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false (nothing is written).
    """
    from safetensors.torch import save_file

    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError(
            f"{p.name} already exists in {p.parent}. Choose another name or allow overwriting."
        )
    p.parent.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in tensors.items():
        t = t.detach().to("cpu")
        if not _owns_storage(t) or t.untyped_storage().data_ptr() in seen:
            t = t.contiguous().clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    meta = None
    if metadata:
        meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    # a fresh name in the same folder (same filesystem, so the rename is atomic)
    tmp = p.parent / f".{p.name}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "xb"):
            pass
        mode = tmp.stat().st_mode & 0o777  # the user's normal permissions (umask applied)
        save_file(out, str(tmp), metadata=meta)
        _sort_metadata_in_place(tmp)
        os.chmod(tmp, mode)  # safetensors may create its file 0600
        if overwrite:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)  # fails if p appeared meanwhile: never replaces a user's file
            except FileExistsError as e:
                raise OutputExistsError(
                    f"{p.name} already exists in {p.parent}. Choose another name or allow overwriting."
                ) from e
            except OSError:  # filesystems without hard links
                if p.exists():
                    raise OutputExistsError(
                        f"{p.name} already exists in {p.parent}. Choose another name or allow overwriting."
                    ) from None
                os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


_RESERVED_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
_WINDOWS_RESERVED = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"COM{i}" for i in range(1, 10)),
    *(f"LPT{i}" for i in range(1, 10)),
}


def check_output_name(name: str, folder: str | os.PathLike[str], suffix: str = ".safetensors") -> Path:
    """Validate a user-typed output name and return the resolved path inside ``folder``.

    The name is a bare file name: no path separators, no ``..``, no absolute paths or drive letters, no
    characters Windows reserves (``<>:"|?*``, control characters), no reserved device names (``CON``…),
    no leading dot, no trailing dot or space, at most 200 characters. ``suffix`` is appended unless the
    name already ends with it (case-insensitive).

    Raises:
        BadOutputNameError: with the reason.
    """
    if not isinstance(name, str):
        raise BadOutputNameError("The output name must be text.")
    n = name.strip()
    if not n:
        raise BadOutputNameError("The output name is empty. Type a file name such as my_merge.")
    if "/" in n or "\\" in n or os.sep in n or (os.altsep and os.altsep in n):
        raise BadOutputNameError(
            f"Output name {name!r} contains a path separator. Type only a file name; the file is "
            f"saved in {folder}."
        )
    if ".." in n:
        raise BadOutputNameError(f"Output name {name!r} contains '..'. Type a plain file name.")
    if _RESERVED_CHARS.search(n):
        raise BadOutputNameError(
            f'Output name {name!r} contains a reserved character (one of < > : " | ? * or a control '
            "character). Use letters, digits, spaces, '-', '_' or '.'."
        )
    if n.startswith("."):
        raise BadOutputNameError(f"Output name {name!r} starts with a dot (a hidden file). Remove the dot.")
    if n.endswith((".", " ")):
        raise BadOutputNameError(f"Output name {name!r} ends with a dot or a space. Remove it.")
    if n.split(".")[0].upper() in _WINDOWS_RESERVED:
        raise BadOutputNameError(f"Output name {name!r} is a reserved device name on Windows. Pick another.")
    if suffix and not n.lower().endswith(suffix.lower()):
        n = n + suffix
    if len(n) > 200:
        raise BadOutputNameError(f"Output name is {len(n)} characters long; keep it under 200.")
    base = Path(folder).resolve()
    target = (base / n).resolve()
    if target.parent != base:
        raise BadOutputNameError(f"Output name {name!r} would leave the folder {base}.")
    return target
