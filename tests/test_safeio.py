"""Safe loading and atomic writing: every bad file gets a typed, readable error and nothing runs or is lost."""

from __future__ import annotations

import builtins
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_loraclr.errors import (
    BadOutputNameError,
    LoraclrError,
    LoraFormatError,
    OutputExistsError,
    UnsafeFileError,
)
from lib_loraclr.readers import read_lora
from lib_loraclr.safeio import (
    atomic_write_safetensors,
    check_output_name,
    load_torch_file,
    read_safetensors,
    read_safetensors_metadata,
    sniff_format,
)


def _good_file(tmp_path: Path, name: str = "good.safetensors") -> Path:
    p = tmp_path / name
    save_file(
        {
            "lora_unet_conv_in.lora_down.weight": torch.arange(12.0).reshape(2, 6),
            "lora_unet_conv_in.lora_up.weight": torch.ones(3, 2),
        },
        str(p),
        metadata={"ss_network_dim": "2", "note": "hello"},
    )
    return p


class _MarkerPayload:
    """Unpickling this object creates a file (a stand-in for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (builtins.open, (str(self.marker), "w"))


def test_read_valid_file_returns_tensors_and_metadata(tmp_path: Path) -> None:
    p = _good_file(tmp_path)
    tensors, meta = read_safetensors(p)
    assert meta == {"ss_network_dim": "2", "note": "hello"}
    assert torch.equal(tensors["lora_unet_conv_in.lora_down.weight"], torch.arange(12.0).reshape(2, 6))
    assert read_safetensors_metadata(p) == meta
    assert sniff_format(p) == "safetensors"


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    with pytest.raises(LoraFormatError, match=r"empty\.safetensors: the file is empty"):
        read_safetensors(p)
    with pytest.raises(LoraFormatError, match="empty"):
        read_lora(p)
    q = tmp_path / "empty.pt"
    q.write_bytes(b"")
    with pytest.raises(LoraFormatError, match="empty"):
        load_torch_file(q)


@pytest.mark.parametrize("cut", [1, 100, 2000])
def test_truncated_file_names_file_and_sizes(tmp_path: Path, cut: int) -> None:
    p = _good_file(tmp_path)
    data = p.read_bytes()
    t = tmp_path / "cut.safetensors"
    t.write_bytes(data[: max(9, len(data) - cut)])
    with pytest.raises(LoraFormatError, match=r"cut\.safetensors: the file is truncated"):
        read_safetensors(t)


def test_tiny_file_is_truncated(tmp_path: Path) -> None:
    p = tmp_path / "tiny.safetensors"
    p.write_bytes(b"\x10\x00\x00")
    with pytest.raises(LoraFormatError, match="truncated"):
        read_safetensors(p)


def test_corrupt_header_json(tmp_path: Path) -> None:
    header = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'  # unterminated JSON
    p = tmp_path / "corrupt.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 4)
    with pytest.raises(LoraFormatError, match=r"corrupt\.safetensors: corrupt safetensors header"):
        read_safetensors(p)


def test_corrupt_header_entry(tmp_path: Path) -> None:
    header = json.dumps({"a": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 4]}}).encode()
    p = tmp_path / "entry.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 4)
    with pytest.raises(LoraFormatError, match="corrupt safetensors header entry for tensor 'a'"):
        read_safetensors(p)


def test_random_bytes_are_rejected(tmp_path: Path) -> None:
    p = tmp_path / "noise.safetensors"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(LoraFormatError):
        read_safetensors(p)


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_disguised_as_safetensors(tmp_path: Path, zipfile: bool) -> None:
    marker = tmp_path / "pwned_marker"
    p = tmp_path / "disguised.safetensors"
    torch.save({"x": _MarkerPayload(marker)}, p, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(UnsafeFileError, match=r"disguised\.safetensors: this is a PyTorch pickle"):
        read_safetensors(p)
    with pytest.raises(UnsafeFileError):
        read_lora(p)
    assert not marker.exists()


def test_pt_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned_marker"
    p = tmp_path / "evil.pt"
    torch.save({"params": {"unet": {}}, "payload": _MarkerPayload(marker)}, p)
    with pytest.raises(UnsafeFileError, match=r"evil\.pt: refused to load"):
        load_torch_file(p)
    with pytest.raises(UnsafeFileError):
        read_lora(p)
    assert not marker.exists()
    # and the same payload through the legacy (non-zip) pickle format
    q = tmp_path / "evil_legacy.pth"
    torch.save(_MarkerPayload(marker), q, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeFileError):
        read_lora(q)
    assert not marker.exists()


def test_weights_only_torch_file_loads(tmp_path: Path) -> None:
    p = tmp_path / "ok.pt"
    torch.save({"params": {"a": torch.ones(2)}}, p)
    obj = load_torch_file(p)
    assert torch.equal(obj["params"]["a"], torch.ones(2))


def test_truncated_torch_file(tmp_path: Path) -> None:
    p = tmp_path / "ok.pt"
    torch.save({"a": torch.ones(1000)}, p)
    q = tmp_path / "cut.pt"
    q.write_bytes(p.read_bytes()[:300])
    with pytest.raises(LoraFormatError, match=r"cut\.pt: cannot read"):
        load_torch_file(q)


def test_atomic_write_refuses_existing_and_keeps_it(tmp_path: Path) -> None:
    p = _good_file(tmp_path, "mine.safetensors")
    before = p.read_bytes()
    with pytest.raises(OutputExistsError, match=r"mine\.safetensors already exists"):
        atomic_write_safetensors({"a": torch.zeros(3)}, p)
    assert p.read_bytes() == before
    atomic_write_safetensors({"a": torch.zeros(3)}, p, {"k": "v"}, overwrite=True)
    tensors, meta = read_safetensors(p)
    assert list(tensors) == ["a"] and meta == {"k": "v"}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["mine.safetensors"]


def test_atomic_write_cleans_temp_file_on_error(tmp_path: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017 - safetensors rejects a non-tensor value
        atomic_write_safetensors({"a": "not a tensor"}, tmp_path / "out.safetensors")  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_handles_views_and_json_metadata(tmp_path: Path) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    p = atomic_write_safetensors(
        {"view_t": base.T, "slice": base[1:3], "whole": base, "again": base},
        tmp_path / "v.safetensors",
        {"n": 3, "s": "x"},
    )
    tensors, meta = read_safetensors(p)
    assert torch.equal(tensors["view_t"], base.T) and torch.equal(tensors["slice"], base[1:3])
    assert meta == {"n": "3", "s": "x"}


@pytest.mark.parametrize(
    "name",
    [
        "../evil",
        "..",
        "a/b",
        "a\\b",
        "/abs/path",
        "C:\\x",
        "C:x",
        "",
        "   ",
        "a|b",
        'a"b',
        "a?b",
        "a*b",
        "CON",
        "nul.safetensors",
        ".hidden",
        "trailing.",
        "x" * 250,
        "a\x00b",
    ],
)
def test_bad_output_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(BadOutputNameError):
        check_output_name(name, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_good_output_names(tmp_path: Path) -> None:
    assert check_output_name("my merge", tmp_path) == (tmp_path / "my merge.safetensors").resolve()
    assert check_output_name("a.b-c_d.safetensors", tmp_path) == (tmp_path / "a.b-c_d.safetensors").resolve()
    assert check_output_name("x.SAFETENSORS", tmp_path).name == "x.SAFETENSORS"
    assert check_output_name("ckpt", tmp_path, suffix=".ckpt").name == "ckpt.ckpt"


def test_bad_output_name_message_is_helpful(tmp_path: Path) -> None:
    with pytest.raises(BadOutputNameError, match="path separator"):
        check_output_name("../../etc/passwd", tmp_path)
    with pytest.raises(BadOutputNameError, match=r"contains '\.\.'"):
        check_output_name("..", tmp_path)


def test_all_errors_share_the_base_class() -> None:
    from lib_loraclr import errors

    names = [
        "LoraFormatError",
        "UnsafeFileError",
        "ArchitectureMismatchError",
        "UnmappedKeysError",
        "OutputExistsError",
        "BadOutputNameError",
        "NonFiniteWeightsError",
        "ShapeMismatchError",
    ]
    for n in names:
        assert issubclass(getattr(errors, n), LoraclrError)


def test_written_file_gets_normal_permissions(tmp_path: Path) -> None:
    import os

    p = atomic_write_safetensors({"a": torch.zeros(2)}, tmp_path / "perm.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)
