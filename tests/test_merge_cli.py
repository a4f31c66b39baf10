"""`python -m lib_loraclr merge` end to end on kohya files and a tiny SD1-layout checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from lib_loraclr.__main__ import main as cli
from lib_loraclr.models.sd import build_tiny_sd1, save_tiny_checkpoint
from lib_loraclr.readers import read_lora
from lib_loraclr.writers import write_kohya_lora
from tests.lora_factory import attention_keys, random_lora


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_cli")
    model = build_tiny_sd1(seed=0)
    save_tiny_checkpoint(model, d / "base.safetensors")
    keys = attention_keys(model)
    for i, name in enumerate(("cat", "dog")):
        write_kohya_lora(
            random_lora(model, keys, seed=i + 1),
            d / f"{name}.safetensors",
            arch="sd1",
            metadata={"loraclr_trigger": '["sks"]'},
            dtype=torch.float32,
        )
    return d


def _args(d, out: str, *extra: str) -> list[str]:
    return [
        "merge",
        "--base",
        str(d / "base.safetensors"),
        "--concept",
        str(d / "cat.safetensors"),
        "sks",
        "--weight",
        "0.9",
        "--concept",
        str(d / "dog.safetensors"),
        "ohwx",
        "--te-weight",
        "0.8",
        "--out",
        str(d / out),
        "--steps",
        "2",
        "--no-progress",
        *extra,
    ]


def test_merge_cli_writes_lora_and_report(files, capsys) -> None:
    rc = cli(
        _args(
            files,
            "merged.safetensors",
            "--method",
            "lsq",
            "--rank",
            "8",
            "--report",
            str(files / "report.json"),
        )
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "fidelity" in out and "saved" in out
    back = read_lora(files / "merged.safetensors")
    assert back.arch == "sd1" and len(back) == len(read_lora(files / "cat.safetensors"))
    assert set(back.ranks().values()) <= {8}
    rep = json.loads((files / "report.json").read_text())
    assert rep["method"] == "lsq" and 0 <= rep["svd_error"] < 1
    assert [c["te_weight"] for c in rep["concepts"]] == [0.9, 0.8]


def test_merge_cli_checkpoint_and_refusals(files, capsys) -> None:
    assert cli(_args(files, "merged_ckpt.safetensors", "--method", "linear", "--format", "checkpoint")) == 0
    from lib_loraclr.models.sd import load_tiny_checkpoint

    assert load_tiny_checkpoint(files / "merged_ckpt.safetensors") is not None
    before = (files / "merged_ckpt.safetensors").stat().st_mtime_ns
    # existing output: refused, file untouched
    assert cli(_args(files, "merged_ckpt.safetensors", "--method", "linear", "--format", "checkpoint")) == 1
    assert "already exists" in capsys.readouterr().err
    assert (files / "merged_ckpt.safetensors").stat().st_mtime_ns == before
    # a prompt without the trigger words: clear error, no output
    args = [
        "merge",
        "--base",
        str(files / "base.safetensors"),
        "--concept",
        str(files / "cat.safetensors"),
        "sks",
        "--prompt",
        "a photo of a dog",
        "--out",
        str(files / "y.safetensors"),
        "--no-progress",
    ]
    assert cli(args) == 1
    assert "sks" in capsys.readouterr().err
    assert not (files / "y.safetensors").exists()
