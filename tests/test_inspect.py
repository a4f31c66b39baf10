"""``python -m lib_loraclr inspect``: the table, ``--json`` and the exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_loraclr.__main__ import SUBCOMMANDS
from lib_loraclr.__main__ import main as cli_main
from lib_loraclr.inspect import format_summary, inspect_file

ROOT = Path(__file__).resolve().parent.parent


def _kohya_file(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(3):
        n = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn{1 + i % 2}_to_{'qkv'[i]}"
        sd[f"{n}.lora_down.weight"] = torch.randn(8, 320, generator=g)
        sd[f"{n}.lora_up.weight"] = torch.randn(320, 8, generator=g)
        sd[f"{n}.alpha"] = torch.tensor(4.0)
    for i in range(2):
        n = f"lora_te_text_model_encoder_layers_{i}_mlp_fc1"
        sd[f"{n}.lora_down.weight"] = torch.randn(4, 768, generator=g)
        sd[f"{n}.lora_up.weight"] = torch.randn(3072, 4, generator=g)
    sd["lora_unet_conv_in.hada_w1_a"] = torch.randn(320, 2)
    sd["lora_unet_conv_in.hada_w1_b"] = torch.randn(2, 36)
    sd["lora_unet_conv_in.hada_w2_a"] = torch.randn(320, 2)
    sd["lora_unet_conv_in.hada_w2_b"] = torch.randn(2, 36)
    sd["bogus_tensor"] = torch.zeros(1)
    meta = {
        "ss_tag_frequency": json.dumps({"10_sks dog": {"sks": 12, "dog": 12, "grass": 2}}),
        "ss_base_model_version": "sd_v1",
        "ss_network_dim": "8",
    }
    p = tmp_path / "dog.safetensors"
    save_file(sd, str(p), metadata=meta)
    return p


def test_inspect_summary(tmp_path: Path) -> None:
    s = inspect_file(_kohya_file(tmp_path))
    assert s["arch"] == "sd1" and s["format"] == "lycoris"
    assert s["modules"] == 6 and s["parts"] == {"te": 2, "unet": 4}
    assert s["ranks"] == {"4": 2, "8": 3, "dense": 1}
    assert s["alphas"] == {"4": 3, "none": 2}
    assert s["kinds"] == {"loha": 1, "lora": 5}
    assert s["unmapped"] == ["bogus_tensor"]
    assert s["trigger_words"][:2] == ["sks", "dog"] and s["tag_count"] == 3
    assert s["metadata"]["ss_network_dim"] == "8"
    assert s["metadata"]["ss_tag_frequency"].startswith("<")  # long fields are shortened
    table = format_summary(s)
    for text in [
        "SD1.x",
        "TE: 2, UNet: 4",
        "4 (2 modules), 8 (3 modules), dense (1 module)",
        "sks, dog",
        "unmapped keys",
        "bogus_tensor",
        "ss_base_model_version",
    ]:
        assert text in table, text


def test_cli_table_json_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _kohya_file(tmp_path)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"")
    assert cli_main(["inspect", str(good)]) == 0
    out = capsys.readouterr().out
    assert "dog.safetensors" in out and "SD1.x" in out
    assert cli_main(["inspect", "--json", str(good), str(bad)]) == 1
    cap = capsys.readouterr()
    data = json.loads(cap.out)
    assert data[0]["arch"] == "sd1" and data[0]["modules"] == 6
    assert data[1]["error_type"] == "LoraFormatError" and "empty" in data[1]["error"]
    assert "1 of 2 file(s) could not be read" in cap.err


def test_dispatcher(capsys: pytest.CaptureFixture[str]) -> None:
    assert {"inspect", "merge", "demo"} <= set(SUBCOMMANDS)
    assert cli_main([]) == 2
    assert cli_main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out
    assert cli_main(["nope"]) == 2
    assert "unknown subcommand" in capsys.readouterr().err


def test_python_dash_m_runs(tmp_path: Path) -> None:
    p = _kohya_file(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "lib_loraclr", "inspect", "--no-metadata", str(p)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "architecture" in r.stdout and "ss_network_dim" not in r.stdout
