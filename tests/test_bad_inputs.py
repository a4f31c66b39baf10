"""Bad input never ends in a traceback (issue 12): a corpus of malformed inputs, generated here (no
committed binaries), through ``python -m lib_loraclr merge`` / ``inspect``, the REST service behind
``POST /loraclr/v1/merge`` and ``/loraclr/v1/inspect`` (on the stand-in WebUI) and CLoRA's script args.

Every case asserts the exact error class, that the message names the culprit (file, key or option), that
the CLI prints one ``error: …`` line without a stack and exits 1 (argparse errors: exit 2), and that no
output or temporary file is left. Cases use the bundled tiny world (``lib_loraclr/world/assets``) and
tiny synthetic files, and fail before any heavy work.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_loraclr import __main__ as entry
from lib_loraclr.merge import cli as merge_cli
from lib_loraclr.safeio import read_safetensors_metadata

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "lib_loraclr" / "world" / "assets"
BASE = ASSETS / "base.safetensors"
SKS = ASSETS / "loras" / "sks.safetensors"
OHWX = ASSETS / "loras" / "ohwx.safetensors"
STUB = ROOT / "tests" / "webui_stub"
K_FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # a module of the world LoRAs (rank 8, 64 → 256)
CONFIG_KEY = "loraclr_tiny_config"


# ------------------------------------------------------------------------------------------ generators
class Payload:
    """Pickles to ``os.system("touch MARKER")``: proof that a pickle ran code if the marker appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


_CACHE: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a bundled file, copied (read once per session)."""
    if str(path) not in _CACHE:
        _CACHE[str(path)] = (load_file(str(path)), read_safetensors_metadata(path))
    t, m = _CACHE[str(path)]
    return {k: v.clone() for k, v in t.items()}, dict(m)


def lora_variant(d: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the world's ``sks`` LoRA with ``edit`` applied to its tensors."""
    t, m = _tensors(SKS)
    edit(t)
    p = d / name
    save_file(t, str(p), metadata=m)
    return p


def base_variant(d: Path, name: str, edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> Path:
    """A copy of the world's base checkpoint with ``edit`` applied to its tensors and metadata."""
    t, m = _tensors(BASE)
    edit(t, m)
    p = d / name
    save_file(t, str(p), metadata=m)
    return p


def _write(p: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``p`` and return ``p``."""
    if isinstance(data, str):
        p.write_text(data)
    else:
        p.write_bytes(data)
    return p


def raw_safetensors(d: Path, name: str, header: object, data: bytes = b"") -> Path:
    """A file with a hand-made safetensors header (any JSON) and data."""
    h = json.dumps(header).encode()
    p = d / name
    p.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return p


def pickle_file(d: Path, name: str, marker: Path, torch_zip: bool = False) -> Path:
    p = d / name
    if torch_zip:
        torch.save({"lora_unet_x.lora_down.weight": Payload(marker)}, str(p))
    else:
        p.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=2))
    return p


def set_config(m: dict[str, str], **changes: object) -> None:
    cfg = json.loads(m[CONFIG_KEY])
    for path, v in changes.items():
        node = cfg
        *head, leaf = path.split("__")
        for h in head:
            node = node[h]
        node[leaf] = v
    m[CONFIG_KEY] = json.dumps(cfg)


def _put(t: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    t[key] = value


def _poke(t: dict[str, torch.Tensor], key: str, value: float) -> None:
    t[key] = t[key].clone()
    t[key].view(-1)[3] = value


def _sdxl_lora(t: dict[str, torch.Tensor]) -> None:
    for k in list(t):
        t[k.replace("lora_te_", "lora_te1_")] = t.pop(k)
    t["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 1280)
    t["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(5120, 4)


@contextlib.contextmanager
def as_nobody() -> Iterator[None]:
    """Run the block with the effective user ``nobody`` when the tests run as root (root reads any
    file, so a missing permission can only be shown as another user); a no-op otherwise."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def listing(d: Path) -> set[str]:
    """Every path under ``d`` (relative), to show that nothing was written."""
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def temp_files(d: Path) -> list[str]:
    return [str(p) for p in d.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".loraclr-probe-")]


# ------------------------------------------------------------------------------------------ the CLI corpus
@dataclass
class Case:
    """One bad input: ``build(dir, marker) -> (argv, culprit)``; ``error`` is the exact class name
    (``"argparse"``: an argument error, exit 2); ``public``: run in a folder user ``nobody`` can see."""

    id: str
    error: str
    build: Callable[[Path, Path], tuple[list[str], str]]
    nobody: bool = False


def merge_argv(
    d: Path,
    *,
    base: Path | str = BASE,
    concepts: tuple = ((SKS, "sks"), (OHWX, "ohwx")),
    out: Path | str | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    argv = ["merge", "--base", str(base)]
    for f, trig in concepts:
        argv += ["--concept", str(f), trig]
    # linear: if a check were missing, the merge would finish in a second (and the case fail), not run long
    return [
        *argv,
        "--out",
        str(out or d / "out.safetensors"),
        "--method",
        "linear",
        "--steps",
        "1",
        "--no-progress",
        *extra,
    ]


def bad_lora(name: str, make: Callable[[Path, Path], Path], culprit: str | None = None) -> Callable:
    """A case builder: the first concept is the bad LoRA ``make(dir, marker)``; culprit = its file name."""

    def build(d: Path, marker: Path) -> tuple[list[str], str]:
        p = make(d, marker)
        return merge_argv(d, concepts=((p, "sks"), (OHWX, "ohwx"))), culprit or p.name

    return build


def bad_base(make: Callable[[Path, Path], Path], culprit: str | None = None) -> Callable:
    def build(d: Path, marker: Path) -> tuple[list[str], str]:
        p = make(d, marker)
        return merge_argv(d, base=p), culprit or p.name

    return build


def with_args(*extra: str, culprit: str, concepts: tuple | None = None) -> Callable:
    def build(d: Path, marker: Path) -> tuple[list[str], str]:
        kw = {} if concepts is None else {"concepts": concepts}
        return merge_argv(d, extra=extra, **kw), culprit

    return build


def _argv_weight(flag: str, value: str) -> Callable:
    def build(d: Path, marker: Path) -> tuple[list[str], str]:
        argv = merge_argv(d)
        i = argv.index("--concept") + 3
        return [*argv[:i], flag, value, *argv[i:]], flag

    return build


def _fifo(d: Path, marker: Path) -> Path:
    p = d / "pipe.safetensors"
    os.mkfifo(p)
    return p


def _unreadable(d: Path, marker: Path) -> Path:
    p = lora_variant(d, "locked.safetensors", lambda t: None)
    p.chmod(0)
    return p


def _loop(d: Path, marker: Path) -> Path:
    p = d / "loop.safetensors"
    p.symlink_to(p)
    return p


def _folder(d: Path, marker: Path) -> Path:
    p = d / "folder.safetensors"
    p.mkdir()
    return p


def _rank0(t: dict[str, torch.Tensor]) -> None:
    t[K_FC1 + ".lora_down.weight"] = torch.zeros(0, 64, dtype=t[K_FC1 + ".lora_down.weight"].dtype)
    t[K_FC1 + ".lora_up.weight"] = torch.zeros(256, 0, dtype=t[K_FC1 + ".lora_up.weight"].dtype)


def _out_exists(d: Path, marker: Path) -> tuple[list[str], str]:
    out = d / "taken.safetensors"
    out.write_bytes(b"user data")
    return merge_argv(d, out=out), "taken.safetensors"


def _out_folder(d: Path, marker: Path) -> tuple[list[str], str]:
    (d / "dir.safetensors").mkdir()
    return merge_argv(d, out=d / "dir.safetensors"), "dir.safetensors"


def _out_readonly(d: Path, marker: Path) -> tuple[list[str], str]:
    ro = d / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    return merge_argv(d, out=ro / "out.safetensors"), "readonly"


def _out_under_file(d: Path, marker: Path) -> tuple[list[str], str]:
    _write(d / "afile", "x")
    return merge_argv(d, out=d / "afile" / "sub" / "out.safetensors"), "afile"


def _out_is_input(d: Path, marker: Path) -> tuple[list[str], str]:
    lora = lora_variant(d, "mine.safetensors", lambda t: None)
    return merge_argv(
        d, concepts=((lora, "sks"), (OHWX, "ohwx")), out=lora, extra=("--overwrite",)
    ), "mine.safetensors"


def _out_is_base(d: Path, marker: Path) -> tuple[list[str], str]:
    base = d / "base.safetensors"
    shutil.copy(BASE, base)
    return merge_argv(d, base=base, out=base, extra=("--overwrite",)), "base.safetensors"


def _report_folder(d: Path, marker: Path) -> tuple[list[str], str]:
    (d / "rep").mkdir()
    return merge_argv(d, extra=("--report", str(d / "rep"))), "rep"


def _report_is_out(d: Path, marker: Path) -> tuple[list[str], str]:
    return merge_argv(d, extra=("--report", str(d / "out.safetensors"))), "--report"


CLI_CASES: list[Case] = [
    # ---- LoRA files: framing, pickles, types
    Case(
        "lora_empty", "LoraFormatError", bad_lora("empty", lambda d, m: _write(d / "empty.safetensors", b""))
    ),
    Case(
        "lora_truncated",
        "LoraFormatError",
        bad_lora(
            "cut", lambda d, m: _write(d / "cut.safetensors", SKS.read_bytes()[: SKS.stat().st_size // 2])
        ),
    ),
    Case(
        "lora_header_not_json",
        "LoraFormatError",
        bad_lora("hdr", lambda d, m: _write(d / "hdr.safetensors", struct.pack("<Q", 12) + b"{not json!!}")),
    ),
    Case(
        "lora_header_length_absurd",
        "LoraFormatError",
        bad_lora("len", lambda d, m: _write(d / "len.safetensors", struct.pack("<Q", 2**60) + b"{}")),
    ),
    Case(
        "lora_header_size_lie",
        "LoraFormatError",
        bad_lora(
            "lie",
            lambda d, m: raw_safetensors(
                d,
                "lie.safetensors",
                {
                    f"{K_FC1}.lora_down.weight": {
                        "dtype": "F32",
                        "shape": [100000, 100000],
                        "data_offsets": [0, 4],
                    }
                },
                b"\0" * 4,
            ),
            culprit="lora_down",
        ),
    ),
    Case(
        "lora_header_bad_dtype",
        "LoraFormatError",
        bad_lora(
            "dt",
            lambda d, m: raw_safetensors(
                d, "dt.safetensors", {"x": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
            ),
        ),
    ),
    Case(
        "lora_metadata_not_object",
        "LoraFormatError",
        bad_lora("md", lambda d, m: raw_safetensors(d, "md.safetensors", {"__metadata__": [1, 2]})),
    ),
    Case(
        "lora_random_bytes",
        "LoraFormatError",
        bad_lora("rnd", lambda d, m: _write(d / "rnd.safetensors", bytes(range(256)) * 8)),
    ),
    Case(
        "lora_text_file",
        "LoraFormatError",
        bad_lora("txt", lambda d, m: _write(d / "notes.txt", "trigger: sks\n")),
    ),
    Case(
        "pickle_payload_as_safetensors",
        "UnsafeFileError",
        bad_lora("pk", lambda d, m: pickle_file(d, "evil.safetensors", m)),
    ),
    Case(
        "pickle_payload_torch_zip",
        "UnsafeFileError",
        bad_lora("pz", lambda d, m: pickle_file(d, "evil.pt", m, torch_zip=True)),
    ),
    Case(
        "pickle_payload_legacy_pth",
        "UnsafeFileError",
        bad_lora("pl", lambda d, m: pickle_file(d, "evil.pth", m)),
    ),
    Case(
        "lora_no_lora_keys",
        "LoraFormatError",
        bad_lora(
            "nk",
            lambda d, m: lora_variant(
                d, "nokeys.safetensors", lambda t: [t.clear(), _put(t, "foo.bar", torch.zeros(2))]
            ),
            culprit="foo.bar",
        ),
    ),
    Case(
        "lora_is_checkpoint",
        "LoraFormatError",
        bad_lora(
            "ck",
            lambda d, m: Path(shutil.copy(BASE, d / "model.safetensors")),
            culprit="full model checkpoint",
        ),
    ),
    Case(
        "lora_oft_unsupported",
        "LoraFormatError",
        bad_lora(
            "oft",
            lambda d, m: lora_variant(
                d, "oft.safetensors", lambda t: _put(t, "lora_unet_x.oft_blocks", torch.zeros(2, 2, 2))
            ),
            culprit="OFT",
        ),
    ),
    Case(
        "lora_missing_up",
        "LoraFormatError",
        bad_lora(
            "mu",
            lambda d, m: lora_variant(d, "noup.safetensors", lambda t: t.pop(K_FC1 + ".lora_up.weight")),
            culprit=K_FC1,
        ),
    ),
    # ---- LoRA values: NaN / Inf / huge, rank, alpha, shapes, architecture
    Case(
        "lora_nan",
        "NonFiniteWeightsError",
        bad_lora(
            "nan",
            lambda d, m: lora_variant(
                d, "nan.safetensors", lambda t: _poke(t, K_FC1 + ".lora_up.weight", math.nan)
            ),
            culprit=K_FC1 + ".lora_up",
        ),
    ),
    Case(
        "lora_inf",
        "NonFiniteWeightsError",
        bad_lora(
            "inf",
            lambda d, m: lora_variant(
                d, "inf.safetensors", lambda t: _poke(t, K_FC1 + ".lora_down.weight", math.inf)
            ),
            culprit=K_FC1,
        ),
    ),
    Case(
        "lora_huge_values",
        "ValueRangeError",
        bad_lora(
            "big",
            lambda d, m: lora_variant(
                d, "big.safetensors", lambda t: _poke(t, K_FC1 + ".lora_down.weight", 5e4)
            ),
            culprit=K_FC1,
        ),
    ),
    Case(
        "lora_nan_alpha",
        "NonFiniteWeightsError",
        bad_lora(
            "na",
            lambda d, m: lora_variant(
                d, "nanalpha.safetensors", lambda t: _put(t, K_FC1 + ".alpha", torch.tensor(math.nan))
            ),
            culprit=K_FC1,
        ),
    ),
    Case(
        "lora_huge_alpha",
        "ValueRangeError",
        bad_lora(
            "ha",
            lambda d, m: lora_variant(
                d, "bigalpha.safetensors", lambda t: _put(t, K_FC1 + ".alpha", torch.tensor(1e8))
            ),
            culprit=K_FC1 + ".alpha",
        ),
    ),
    Case(
        "lora_rank_zero",
        "ValueRangeError",
        bad_lora("r0", lambda d, m: lora_variant(d, "rank0.safetensors", _rank0), culprit=K_FC1),
    ),
    Case(
        "lora_rank_mismatch",
        "ShapeMismatchError",
        bad_lora(
            "rm",
            lambda d, m: lora_variant(
                d, "rankmix.safetensors", lambda t: _put(t, K_FC1 + ".lora_up.weight", torch.zeros(256, 4))
            ),
            culprit=K_FC1,
        ),
    ),
    Case(
        "lora_shape_vs_base",
        "ArchitectureMismatchError",
        bad_lora(
            "sb",
            lambda d, m: lora_variant(
                d,
                "wide.safetensors",
                lambda t: [
                    _put(t, K_FC1 + ".lora_down.weight", torch.zeros(8, 96)),
                    _put(t, K_FC1 + ".lora_up.weight", torch.zeros(256, 8)),
                ],
            ),
            culprit="fc1",
        ),
    ),
    Case(
        "lora_wrong_architecture",
        "ArchitectureMismatchError",
        bad_lora("xl", lambda d, m: lora_variant(d, "sdxl.safetensors", _sdxl_lora), culprit="sdxl"),
    ),
    # ---- LoRA paths
    Case("lora_missing_file", "InputFileError", bad_lora("mf", lambda d, m: d / "ghost.safetensors")),
    Case("lora_is_folder", "InputFileError", bad_lora("fd", _folder)),
    Case("lora_fifo", "InputFileError", bad_lora("ff", _fifo)),
    Case(
        "lora_device", "InputFileError", bad_lora("dv", lambda d, m: Path("/dev/zero"), culprit="/dev/zero")
    ),
    Case("lora_symlink_loop", "InputFileError", bad_lora("sl", _loop)),
    Case("lora_unreadable", "InputFileError", bad_lora("ur", _unreadable), nobody=True),
    # ---- base checkpoint
    Case(
        "base_config_bad_json",
        "BaseModelError",
        bad_base(
            lambda d, m: base_variant(
                d, "badjson.safetensors", lambda t, md: md.update({CONFIG_KEY: '{"kind": "sd1", "unet": {'})
            ),
            culprit=CONFIG_KEY,
        ),
    ),
    Case(
        "base_config_not_object",
        "BaseModelError",
        bad_base(
            lambda d, m: base_variant(
                d, "cfglist.safetensors", lambda t, md: md.update({CONFIG_KEY: "[1, 2]"})
            ),
            culprit=CONFIG_KEY,
        ),
    ),
    Case(
        "base_config_unknown_kind",
        "BaseModelError",
        bad_base(
            lambda d, m: base_variant(d, "kind.safetensors", lambda t, md: set_config(md, kind="sd3")),
            culprit="sd3",
        ),
    ),
    Case(
        "base_config_unknown_field",
        "BaseModelError",
        bad_base(
            lambda d, m: base_variant(d, "field.safetensors", lambda t, md: set_config(md, unet__bogus=1)),
            culprit="bogus",
        ),
    ),
    Case(
        "base_config_absurd_channels",
        "BaseModelError",
        bad_base(
            lambda d, m: base_variant(
                d, "huge.safetensors", lambda t, md: set_config(md, unet__model_channels=10**9)
            ),
            culprit="model_channels",
        ),
    ),
    Case(
        "base_config_absurd_depth",
        "BaseModelError",
        bad_base(
            lambda d, m: base_variant(
                d, "deep.safetensors", lambda t, md: set_config(md, text__layers=10**6)
            ),
            culprit="layers",
        ),
    ),
    Case(
        "base_config_over_ceiling",
        "BaseModelError",
        bad_base(
            lambda d, m: base_variant(
                d,
                "ceiling.safetensors",
                lambda t, md: set_config(md, unet__model_channels=12000, unet__context_dim=12000),
            ),
            culprit="ceiling.safetensors",
        ),
    ),
    Case(
        "base_missing_tensor",
        "BaseModelError",
        bad_base(
            lambda d, m: base_variant(
                d, "missing.safetensors", lambda t, md: t.pop("model.diffusion_model.out.2.weight")
            ),
            culprit="model.diffusion_model.out.2.weight",
        ),
    ),
    Case(
        "base_shape_mismatch",
        "BaseModelError",
        bad_base(
            lambda d, m: base_variant(
                d,
                "shape.safetensors",
                lambda t, md: _put(t, "model.diffusion_model.out.2.weight", torch.zeros(1, 32, 3, 1)),
            ),
            culprit="model.diffusion_model.out.2.weight",
        ),
    ),
    Case(
        "base_extra_tensor",
        "BaseModelError",
        bad_base(
            lambda d, m: base_variant(
                d,
                "extra.safetensors",
                lambda t, md: _put(t, "model.diffusion_model.stray.weight", torch.zeros(2)),
            ),
            culprit="stray",
        ),
    ),
    Case(
        "base_nan_weights",
        "NonFiniteWeightsError",
        bad_base(
            lambda d, m: base_variant(
                d,
                "nanbase.safetensors",
                lambda t, md: _poke(t, "model.diffusion_model.out.2.weight", math.nan),
            ),
            culprit="model.diffusion_model.out.2.weight",
        ),
    ),
    Case(
        "base_is_lora",
        "BaseModelError",
        bad_base(lambda d, m: Path(shutil.copy(SKS, d / "alora.safetensors"))),
    ),
    Case("base_pickle_ckpt", "BaseModelError", bad_base(lambda d, m: pickle_file(d, "model.ckpt", m))),
    Case(
        "base_pickle_renamed",
        "UnsafeFileError",
        bad_base(lambda d, m: pickle_file(d, "model.safetensors", m)),
    ),
    Case(
        "base_truncated",
        "LoraFormatError",
        bad_base(lambda d, m: _write(d / "cutbase.safetensors", BASE.read_bytes()[:100_000])),
    ),
    Case("base_is_folder", "InputFileError", bad_base(_folder)),
    Case("base_missing", "InputFileError", bad_base(lambda d, m: d / "nobase.safetensors")),
    # ---- arguments (argparse types and per-concept numbers)
    Case("rank_zero", "argparse", with_args("--rank", "0", culprit="--rank")),
    Case("rank_negative", "argparse", with_args("--rank", "-1", culprit="--rank")),
    Case("rank_not_a_number", "argparse", with_args("--rank", "eight", culprit="--rank")),
    Case("rank_huge", "argparse", with_args("--rank", "100000", culprit="--rank")),
    Case("steps_zero", "argparse", with_args("--steps", "0", culprit="--steps")),
    Case("seed_negative", "argparse", with_args("--seed", "-5", culprit="--seed")),
    Case("method_unknown", "argparse", with_args("--method", "average", culprit="--method")),
    Case("weight_nan", "NonFiniteWeightsError", _argv_weight("--weight", "nan")),
    Case("weight_inf", "NonFiniteWeightsError", _argv_weight("--te-weight", "-inf")),
    Case("weight_huge", "ValueRangeError", _argv_weight("--unet-weight", "1e9")),
    Case("weight_text", "ValueRangeError", _argv_weight("--weight", "strong")),
    Case(
        "trigger_empty", "ValueRangeError", with_args(culprit="trigger", concepts=((SKS, ""), (OHWX, "ohwx")))
    ),
    Case(
        "trigger_blank",
        "ValueRangeError",
        with_args(culprit="trigger", concepts=((SKS, "   "), (OHWX, "ohwx"))),
    ),
    Case(
        "trigger_control_char",
        "ValueRangeError",
        with_args(culprit="control", concepts=((SKS, "sks\x00"), (OHWX, "ohwx"))),
    ),
    Case(
        "trigger_not_in_prompt",
        "TriggerNotFoundError",
        with_args("--prompt", "a photo of a dog", culprit="'ohwx'"),
    ),
    Case(
        "concept_without_trigger",
        "LoraclrError",
        lambda d, m: (
            ["merge", "--base", str(BASE), "--out", str(d / "o.safetensors"), "--concept", str(SKS)],
            "--concept",
        ),
    ),
    Case(
        "weight_before_concept",
        "LoraclrError",
        lambda d, m: (["merge", "--weight", "1", "--base", str(BASE)], "--weight"),
    ),
    Case(
        "no_concept",
        "LoraclrError",
        lambda d, m: (
            ["merge", "--base", str(BASE), "--out", str(d / "o.safetensors"), "--no-progress"],
            "--concept",
        ),
    ),
    # ---- outputs
    Case("out_exists", "OutputExistsError", _out_exists),
    Case("out_is_folder", "BadOutputNameError", _out_folder),
    Case("out_dotdot", "BadOutputNameError", lambda d, m: (merge_argv(d, out=str(d) + "/.."), "'..'")),
    Case(
        "out_reserved_char",
        "BadOutputNameError",
        lambda d, m: (merge_argv(d, out=d / "a|b.safetensors"), "a|b"),
    ),
    Case("out_under_a_file", "OutputNotWritableError", _out_under_file),
    Case("out_is_input_lora", "BadOutputNameError", _out_is_input),
    Case("out_is_base", "BadOutputNameError", _out_is_base),
    Case("out_folder_readonly", "OutputNotWritableError", _out_readonly, nobody=True),
    Case("report_is_folder", "BadOutputNameError", _report_folder),
    Case("report_is_out", "BadOutputNameError", _report_is_out),
]


@pytest.fixture(scope="module")
def public_dir() -> Iterator[Path]:
    """A folder user ``nobody`` can enter (pytest's own tmp folders are private to root)."""
    d = Path(tempfile.mkdtemp(prefix="loraclr-bad-"))
    d.chmod(0o755)
    yield d
    for p in d.rglob("*"):
        with contextlib.suppress(OSError):
            p.chmod(0o755) if p.is_dir() and not p.is_symlink() else None
    shutil.rmtree(d, ignore_errors=True)


def _case_dir(case: Case, tmp_path: Path, public_dir: Path) -> Path:
    if not case.nobody:
        return tmp_path
    d = public_dir / case.id
    d.mkdir()
    d.chmod(0o777)
    return d


def _call(fn: Callable[[], object]) -> BaseException | None:
    try:
        fn()
    except BaseException as e:  # SystemExit of argparse included
        return e
    return None


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_merge_bad_input(
    case: Case, tmp_path: Path, public_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    d = _case_dir(case, tmp_path, public_dir)
    marker = d.parent / f"{case.id}.PAYLOAD_RAN"
    argv, culprit = case.build(d, marker)
    before = listing(d)
    capsys.readouterr()

    def ctx() -> contextlib.AbstractContextManager:
        return as_nobody() if case.nobody else contextlib.nullcontext()

    # 1. the exact error class, raised by the subcommand itself
    with ctx():
        err = _call(lambda: merge_cli.main(argv[1:]))
    captured = capsys.readouterr()
    if case.error == "argparse":
        assert isinstance(err, SystemExit) and err.code == 2, err
        assert culprit in captured.err and "Traceback" not in captured.err, captured.err
    else:
        assert err is not None and type(err).__name__ == case.error, repr(err)
        assert culprit in str(err), str(err)
        assert "\n" not in str(err), str(err)  # one line
        # 2. the CLI: that one line on stderr, no stack, exit 1
        with ctx():
            rc = entry.main(argv)
        captured = capsys.readouterr()
        assert rc == 1
        assert captured.err.strip() == f"error: {err}", captured.err
        assert "Traceback" not in captured.err + captured.out
    # 3. nothing written, no temp file, no pickle code ran
    assert listing(d) == before
    assert temp_files(d) == []
    assert not marker.exists()


def test_debug_flag_shows_the_stack(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = lora_variant(tmp_path, "rank0.safetensors", _rank0)
    argv = merge_argv(tmp_path, concepts=((p, "sks"), (OHWX, "ohwx")))
    assert entry.main([*argv, "--debug"]) == 1
    err = capsys.readouterr().err
    assert (
        "Traceback" in err
        and "ValueRangeError" in err
        and err.rstrip().splitlines()[-1].startswith("error: ")
    )


def test_pickle_payloads_are_live() -> None:
    """Control: the corpus' pickle payload really runs code when unpickled (so its marker proves a load)."""
    with tempfile.TemporaryDirectory() as t:
        marker = Path(t) / "ran"
        data = pickle.dumps(Payload(marker), protocol=2)
        subprocess.run(
            [sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
            input=data,
            check=True,
            timeout=60,
        )
        assert marker.exists()


# ------------------------------------------------------------------------------------------ inspect
INSPECT_CASES = [
    ("folder", "InputFileError", _folder),
    ("fifo", "InputFileError", _fifo),
    ("pickle", "UnsafeFileError", lambda d, m: pickle_file(d, "evil.safetensors", m)),
    ("rank_zero", "ValueRangeError", lambda d, m: lora_variant(d, "rank0.safetensors", _rank0)),
    (
        "huge_alpha",
        "ValueRangeError",
        lambda d, m: lora_variant(
            d, "bigalpha.safetensors", lambda t: _put(t, K_FC1 + ".alpha", torch.tensor(1e8))
        ),
    ),
    (
        "size_lie",
        "LoraFormatError",
        lambda d, m: raw_safetensors(
            d,
            "lie.safetensors",
            {"x.lora_down.weight": {"dtype": "F16", "shape": [2**20, 2**20], "data_offsets": [0, 2]}},
            b"\0\0",
        ),
    ),
]


@pytest.mark.parametrize(("name", "error", "make"), INSPECT_CASES, ids=[c[0] for c in INSPECT_CASES])
def test_cli_inspect_bad_input(
    name: str, error: str, make: Callable, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path.parent / f"inspect_{name}.PAYLOAD_RAN"
    p = make(tmp_path, marker)
    before = listing(tmp_path)
    capsys.readouterr()
    assert entry.main(["inspect", "--json", str(p)]) == 1
    out = capsys.readouterr()
    got = json.loads(out.out)[0]
    assert got["error_type"] == error and p.name in got["error"], got
    assert "Traceback" not in out.err + out.out
    assert listing(tmp_path) == before and not marker.exists()


# ------------------------------------------------------------------------------------------ SIGINT
def test_sigint_during_a_merge_leaves_nothing(tmp_path: Path) -> None:
    out, report = tmp_path / "merged.safetensors", tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lib_loraclr",
            "merge",
            "--base",
            str(BASE),
            "--concept",
            str(SKS),
            "sks",
            "--concept",
            str(OHWX),
            "ohwx",
            "--out",
            str(out),
            "--report",
            str(report),
            "--steps",
            "4",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # a shell without job control starts background jobs with SIGINT ignored, and Python then keeps
        # ignoring it (no KeyboardInterrupt): give the child the default disposition, as a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    buf = bytearray()
    reader = threading.Thread(
        target=lambda: [buf.extend(c) for c in iter(lambda: proc.stderr.read1(256), b"")], daemon=True
    )
    reader.start()
    deadline = time.monotonic() + 90
    # wait until the UNet stage runs (its first sampling step imports k-diffusion: a signal inside a
    # module import is not what this case tests)
    while b"run 2/" not in buf and b"UNet features" not in buf and proc.poll() is None:
        assert time.monotonic() < deadline, bytes(buf).decode(errors="replace")
        time.sleep(0.05)
    assert proc.poll() is None, bytes(buf).decode(errors="replace")  # it is working, not finished
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=300)
    reader.join(timeout=10)
    err = bytes(buf).decode(errors="replace")
    assert rc == 130, err
    assert "interrupted; nothing was written" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no report, no temp file


# ------------------------------------------------------------------------------------------ REST
@pytest.fixture(scope="module")
def webui():
    """The stand-in WebUI with the extension loaded as the WebUI loads it (see tests/test_webui_glue.py)."""
    if str(STUB) not in sys.path:
        sys.path.insert(0, str(STUB))
    from modules import extra_networks, script_callbacks, scripts, shared

    script_callbacks.clear_callbacks()
    extra_networks.initialize()
    module, classes = scripts.load_scripts_from(str(ROOT), str(ROOT / "scripts" / "loraclr_script.py"))
    script_callbacks.before_ui_callback()
    return SimpleNamespace(shared=shared, script=classes[0](), module=module)


def make_service(webui, lora_dir: Path, ckpt: Path | None):
    from loraclr_glue.api import MergeService

    sh = SimpleNamespace(
        cmd_opts=SimpleNamespace(lora_dir=str(lora_dir), ckpt_dir=str(lora_dir)),
        state=webui.shared.state,
        sd_model=SimpleNamespace(sd_checkpoint_info=SimpleNamespace(filename=str(ckpt) if ckpt else None)),
    )
    return MergeService(shared=sh, runner=lambda fn: fn())


def _body(**over: object) -> dict:
    body: dict = {
        "loras": ["sks", "ohwx"],
        "method": "linear",
        "output": {"name": "merged"},
        "advanced": {"sample_steps": 1},
    }
    body.update(over)
    return body


@dataclass
class RestCase:
    """``setup(lora_dir, case_dir, marker) -> (body, base)``; ``route``: merge | inspect."""

    id: str
    status: int
    error: str
    culprit: str
    setup: Callable[[Path, Path, Path], tuple[object, Path | None]]
    route: str = "merge"
    nobody: bool = False


def _with_lora(make: Callable[[Path, Path], Path], route: str = "merge") -> Callable:
    def setup(loras: Path, d: Path, marker: Path) -> tuple[object, Path]:
        p = make(loras, marker)
        stem = p.stem
        body = _body(loras=[stem, "ohwx"]) if route == "merge" else {"name": stem}
        return body, BASE

    return setup


def _with_base(make: Callable[[Path, Path], Path]) -> Callable:
    def setup(loras: Path, d: Path, marker: Path) -> tuple[object, Path]:
        return _body(), make(d, marker)

    return setup


def _plain(body: object) -> Callable:
    return lambda loras, d, marker: (body, BASE)


def _readonly_folder(loras: Path, d: Path, marker: Path) -> tuple[object, Path]:
    loras.chmod(0o555)
    return _body(), BASE


REST_CASES: list[RestCase] = [
    RestCase(
        "lora_name_traversal",
        400,
        "MergeRequestError",
        "../../etc/passwd",
        _plain(_body(loras=["../../etc/passwd", "sks"])),
    ),
    RestCase(
        "lora_name_absolute",
        400,
        "MergeRequestError",
        "/etc/passwd",
        _plain(_body(loras=["/etc/passwd", "sks"])),
    ),
    RestCase(
        "out_traversal", 400, "BadOutputNameError", "../evil", _plain(_body(output={"name": "../evil"}))
    ),
    RestCase(
        "out_absolute", 400, "BadOutputNameError", "/tmp/evil", _plain(_body(output={"name": "/tmp/evil"}))
    ),
    RestCase("out_reserved_name", 400, "BadOutputNameError", "CON", _plain(_body(output={"name": "CON"}))),
    RestCase("out_exists", 400, "MergeRequestError", "already exists", _plain(_body(output={"name": "sks"}))),
    RestCase(
        "out_is_input",
        400,
        "BadOutputNameError",
        "also an input",
        _plain(_body(output={"name": "sks", "overwrite": True})),
    ),
    RestCase("out_folder_readonly", 400, "OutputNotWritableError", "loras", _readonly_folder, nobody=True),
    RestCase("rank_zero", 400, "MergeRequestError", "rank", _plain(_body(output={"name": "m", "rank": 0}))),
    RestCase(
        "rank_negative", 400, "MergeRequestError", "rank", _plain(_body(output={"name": "m", "rank": -1}))
    ),
    RestCase(
        "weight_nan",
        400,
        "MergeRequestError",
        "te_weight",
        _plain(_body(loras=[{"name": "sks", "te_weight": math.nan}, "ohwx"])),
    ),
    RestCase(
        "weight_huge",
        400,
        "MergeRequestError",
        "unet_weight",
        _plain(_body(loras=[{"name": "sks", "unet_weight": 1e9}, "ohwx"])),
    ),
    RestCase(
        "trigger_not_text",
        400,
        "MergeRequestError",
        "trigger",
        _plain(_body(loras=[{"name": "sks", "trigger": 5}, "ohwx"])),
    ),
    RestCase(
        "trigger_control_char",
        400,
        "MergeRequestError",
        "control",
        _plain(_body(loras=[{"name": "sks", "trigger": "sks\x07"}, "ohwx"])),
    ),
    RestCase(
        "trigger_not_in_prompt",
        400,
        "TriggerNotFoundError",
        "'sks'",
        _plain(_body(loras=[{"name": "sks", "prompts": ["a photo of a dog"]}, "ohwx"])),
    ),
    RestCase(
        "advanced_steps_huge",
        400,
        "MergeRequestError",
        "sample_steps",
        _plain(_body(advanced={"sample_steps": 10**9})),
    ),
    RestCase(
        "advanced_unknown_key",
        400,
        "MergeRequestError",
        "shape_for",
        _plain(_body(advanced={"shape_for": 1})),
    ),
    RestCase(
        "advanced_bad_sampler",
        400,
        "MergeRequestError",
        "bogus",
        _plain(_body(advanced={"sampler": "bogus"})),
    ),
    RestCase(
        "advanced_device_not_here",
        400,
        "MergeRequestError",
        "cuda:9",
        _plain(_body(advanced={"device": "cuda:9"})),
    ),
    RestCase(
        "advanced_bad_shape",
        400,
        "MergeRequestError",
        "shape",
        _plain(_body(advanced={"shape": [4, 10**6, 8]})),
    ),
    RestCase(
        "lora_truncated",
        400,
        "LoraFormatError",
        "cut.safetensors",
        _with_lora(lambda d, m: _write(d / "cut.safetensors", SKS.read_bytes()[:5000])),
    ),
    RestCase(
        "lora_pickle_payload",
        400,
        "UnsafeFileError",
        "evil.safetensors",
        _with_lora(lambda d, m: pickle_file(d, "evil.safetensors", m)),
    ),
    RestCase(
        "lora_rank_zero",
        400,
        "ValueRangeError",
        K_FC1,
        _with_lora(lambda d, m: lora_variant(d, "rank0.safetensors", _rank0)),
    ),
    RestCase(
        "lora_nan",
        400,
        "NonFiniteWeightsError",
        K_FC1,
        _with_lora(
            lambda d, m: lora_variant(
                d, "nan.safetensors", lambda t: _poke(t, K_FC1 + ".lora_up.weight", math.nan)
            )
        ),
    ),
    RestCase(
        "lora_huge_alpha",
        400,
        "ValueRangeError",
        K_FC1,
        _with_lora(
            lambda d, m: lora_variant(
                d, "bigalpha.safetensors", lambda t: _put(t, K_FC1 + ".alpha", torch.tensor(1e8))
            )
        ),
    ),
    RestCase(
        "lora_wrong_architecture",
        400,
        "ArchitectureMismatchError",
        "sdxl",
        _with_lora(lambda d, m: lora_variant(d, "sdxl.safetensors", _sdxl_lora)),
    ),
    RestCase(
        "base_bad_json",
        400,
        "BaseModelError",
        CONFIG_KEY,
        _with_base(
            lambda d, m: base_variant(
                d, "badjson.safetensors", lambda t, md: md.update({CONFIG_KEY: "{oops"})
            )
        ),
    ),
    RestCase(
        "base_absurd_size",
        400,
        "BaseModelError",
        "model_channels",
        _with_base(
            lambda d, m: base_variant(
                d, "huge.safetensors", lambda t, md: set_config(md, unet__model_channels=10**9)
            )
        ),
    ),
    RestCase(
        "base_nan",
        400,
        "NonFiniteWeightsError",
        "out.2.weight",
        _with_base(
            lambda d, m: base_variant(
                d,
                "nanbase.safetensors",
                lambda t, md: _poke(t, "model.diffusion_model.out.2.weight", math.nan),
            )
        ),
    ),
    RestCase("base_is_folder", 400, "InputFileError", "folder", _with_base(_folder)),
    RestCase(
        "inspect_traversal",
        404,
        "LoraNotFoundError",
        "../../etc/passwd",
        _plain({"name": "../../etc/passwd"}),
        route="inspect",
    ),
    RestCase(
        "inspect_truncated",
        400,
        "LoraFormatError",
        "cut.safetensors",
        _with_lora(lambda d, m: _write(d / "cut.safetensors", SKS.read_bytes()[:5000]), route="inspect"),
        route="inspect",
    ),
    RestCase(
        "inspect_pickle",
        400,
        "UnsafeFileError",
        "evil.safetensors",
        _with_lora(lambda d, m: pickle_file(d, "evil.safetensors", m), route="inspect"),
        route="inspect",
    ),
    RestCase(
        "inspect_rank_zero",
        400,
        "ValueRangeError",
        K_FC1,
        _with_lora(lambda d, m: lora_variant(d, "rank0.safetensors", _rank0), route="inspect"),
        route="inspect",
    ),
    RestCase("inspect_names_not_list", 400, "", "names", _plain({"names": "sks"}), route="inspect"),
]


@pytest.mark.parametrize("case", REST_CASES, ids=[c.id for c in REST_CASES])
def test_rest_bad_input(case: RestCase, webui, tmp_path: Path, public_dir: Path) -> None:
    from loraclr_glue.api import ServiceError

    d = tmp_path
    if case.nobody:
        d = public_dir / f"rest_{case.id}"
        d.mkdir()
        d.chmod(0o755)
    loras = d / "loras"
    loras.mkdir()
    for src in (SKS, OHWX):
        shutil.copy(src, loras / src.name)
    marker = d.parent / f"rest_{case.id}.PAYLOAD_RAN"
    body, base = case.setup(loras, d, marker)
    svc = make_service(webui, loras, base)
    before = listing(d)
    with as_nobody() if case.nobody else contextlib.nullcontext(), pytest.raises(ServiceError) as ei:
        if case.route == "merge":
            svc.merge(body, locked=False)
        else:
            svc.inspect(body)
    e = ei.value
    assert (e.status, e.kind) == (case.status, case.error), (e.status, e.kind, e.message)
    assert case.culprit in e.message and "Traceback" not in e.message, e.message
    assert listing(d) == before and temp_files(d) == [] and not marker.exists()


# ------------------------------------------------------------------------------------------ CLoRA args
@pytest.fixture(scope="module")
def clora_env(webui, tmp_path_factory):
    """A tiny SD1 model with the tokenizer hook A1111 has, and LoRA files for it (good and bad)."""
    from lora_factory import attention_keys, random_lora

    from lib_loraclr.models.sd import build_tiny_sd1
    from lib_loraclr.writers import write_kohya_lora

    model = build_tiny_sd1(0)
    enc = model.prompt_encoder
    model.cond_stage_model.tokenize_line = lambda text: (enc.chunks(text), len(enc.tokenize(text)))
    d = tmp_path_factory.mktemp("clora_loras")
    keys = attention_keys(model, other=False)
    for i, name in enumerate(["catlora", "doglora"]):
        write_kohya_lora(
            random_lora(model, keys, seed=i + 1),
            d / f"{name}.safetensors",
            arch="sd1",
            metadata={"loraclr_trigger": json.dumps([["sks", "ohwx"][i]])},
        )
    write_kohya_lora(random_lora(model, keys, seed=9), d / "notrigger.safetensors", arch="sd1")
    good, meta = (
        load_file(str(d / "catlora.safetensors")),
        read_safetensors_metadata(d / "catlora.safetensors"),
    )
    k = next(k for k in good if k.endswith(".lora_down.weight"))
    bad = {
        **good,
        k: good[k][:0],
        k.replace("lora_down", "lora_up"): good[k.replace("lora_down", "lora_up")][:, :0],
    }
    save_file(bad, str(d / "rankzero.safetensors"), metadata=meta)
    _write(d / "cutlora.safetensors", (d / "catlora.safetensors").read_bytes()[:3000])
    webui.shared.cmd_opts.lora_dir = str(d)
    return SimpleNamespace(model=model, dir=d, rank0_key=k.split(".")[0])


CLORA_CASES = [
    (
        "row_weight_huge",
        [True, {"loras": [["catlora", 1e9, "cat", "sks"]]}],
        "a cat",
        "CloraArgsError",
        "weight",
    ),
    # (a NaN cell is a blank cell of the UI table, weight 1; NaN typed as text is refused)
    (
        "row_weight_nan",
        [True, {"loras": [{"lora": "catlora", "weight": "nan", "words": "cat"}]}],
        "a cat",
        "CloraArgsError",
        "weight",
    ),
    (
        "row_unet_weight_inf",
        [True, {"loras": [{"lora": "catlora", "words": "cat", "unet_weight": math.inf}]}],
        "a cat",
        "CloraArgsError",
        "unet_weight",
    ),
    ("tag_weight_huge", [False, {}], "a cat<clora:catlora:1e9>", "CloraArgsError", "catlora"),
    ("unknown_key", [True, {"threshhold": 0.2}], "a cat<clora:catlora>", "CloraArgsError", "threshhold"),
    (
        "mask_threshold_out_of_range",
        [True, {"mask_threshold": 2}],
        "a cat<clora:catlora>",
        "CloraArgsError",
        "mask_threshold",
    ),
    ("step_size_huge", [True, {"step_size": 1e12}], "a cat<clora:catlora>", "CloraArgsError", "step_size"),
    (
        "update_steps_huge",
        [True, {"update_steps": 10**9}],
        "a cat<clora:catlora>",
        "CloraArgsError",
        "update_steps",
    ),
    (
        "refinement_iters_negative",
        [True, {"refinement_iters": -1}],
        "a cat<clora:catlora>",
        "CloraArgsError",
        "refinement_iters",
    ),
    ("args_not_a_dict", [True, "loras=catlora"], "a cat<clora:catlora>", "CloraArgsError", "dict"),
    ("too_many_args", [True, {}, {}], "a cat<clora:catlora>", "CloraArgsError", "[enabled, {options}]"),
    ("row_without_words", [True, {"loras": [["catlora", 1, "", "sks"]]}], "a cat", "CloraArgsError", "words"),
    (
        "words_not_in_prompt",
        [True, {"loras": [["catlora", 1, "horse", "sks"]]}],
        "a cat",
        "PromptSyntaxError",
        "horse",
    ),
    ("lora_name_traversal", [False, {}], "a cat<clora:../../../etc/passwd>", "CloraUserError", "passwd"),
    ("lora_unknown", [False, {}], "a cat<clora:nosuchlora>", "CloraUserError", "nosuchlora"),
    ("trigger_empty_no_metadata", [False, {}], "a cat<clora:notrigger>", "CloraUserError", "notrigger"),
    ("lora_truncated", [False, {}], "a cat<clora:cutlora:trigger=sks>", "LoraFormatError", "cutlora"),
    ("lora_rank_zero", [False, {}], "a cat<clora:rankzero:trigger=sks>", "ValueRangeError", "rank 0"),
]


_PLAIN: dict[str, torch.Tensor] = {}


def _plain_image(webui, model, prompt: str) -> torch.Tensor:
    from modules import processing

    if prompt not in _PLAIN:
        p = processing.StableDiffusionProcessing(
            sd_model=model,
            prompt=prompt,
            steps=1,
            scripts=processing.ScriptRunner([(webui.script, [False, {}])]),
        )
        _PLAIN[prompt] = processing.process_images(p).images[0].clone()
    return _PLAIN[prompt]


@pytest.mark.parametrize(
    ("name", "args", "prompt", "error", "culprit"), CLORA_CASES, ids=[c[0] for c in CLORA_CASES]
)
def test_clora_bad_args(name, args, prompt, error, culprit, webui, clora_env, capsys) -> None:
    import re

    from loraclr_glue import clora_run
    from modules import processing

    from lib_loraclr import clora_args as ca
    from lib_loraclr.clora import count_hooks

    model = clora_env.model
    plain_prompt = re.sub(r"<clora:[^>]*>", "", prompt)
    before_plain = _plain_image(webui, model, plain_prompt)
    before = listing(clora_env.dir)

    # 1. at the door: the exact class, the culprit named
    def door() -> None:
        run = clora_run.CloraRun(args=ca.from_script_args(args), lora_folder=clora_env.dir)
        run.prepare([prompt])

    err = _call(door)
    assert err is not None and type(err).__name__ == error, repr(err)
    assert culprit in str(err), str(err)
    # the API's door (scripts/loraclr_glue/api_guard.py): the same error, answered as HTTP 422 before queueing
    body = {"prompt": prompt, "alwayson_scripts": {"CLoRA": {"args": list(args)}}}
    assert clora_run.check_request(body, clora_env.dir) == (error, str(err))
    # 2. through the script (as /sdapi/v1/txt2img's alwayson_scripts runs it): reported in the infotext and the
    # console, no stack, no hook left, and the image is the plain one (CLoRA off), bit for bit
    capsys.readouterr()
    p = processing.StableDiffusionProcessing(
        sd_model=model, prompt=prompt, steps=1, scripts=processing.ScriptRunner([(webui.script, list(args))])
    )
    res = processing.process_images(p)
    out = capsys.readouterr().out
    assert culprit in res.extra_generation_params["CLoRA error"] or culprit in out
    assert "Traceback" not in out
    assert count_hooks(model) == 0 and clora_run.active_count() == 0
    assert torch.equal(res.images[0], before_plain)
    # 3. the next plain generation is bit-identical to one before; nothing written beside the LoRAs
    after = processing.process_images(
        processing.StableDiffusionProcessing(
            sd_model=model,
            prompt=plain_prompt,
            steps=1,
            scripts=processing.ScriptRunner([(webui.script, [False, {}])]),
        )
    )
    assert torch.equal(after.images[0], before_plain)
    assert listing(clora_env.dir) == before


def test_corpus_size() -> None:
    n = len(CLI_CASES) + len(INSPECT_CASES) + len(REST_CASES) + len(CLORA_CASES) + 1  # + SIGINT
    assert n >= 45
