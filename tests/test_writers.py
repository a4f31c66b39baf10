"""Writers: optimal truncated SVD, exact round trips, loader-ready files, full checkpoints, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lib_loraclr.deltas import DeltaSet, LoraModule
from lib_loraclr.errors import NonFiniteWeightsError, OutputExistsError, ShapeMismatchError, UnmappedKeysError
from lib_loraclr.metadata import recipe_metadata
from lib_loraclr.readers import read_lora
from lib_loraclr.safeio import read_safetensors
from lib_loraclr.writers import to_low_rank, write_checkpoint, write_kohya_lora

UNET = "model.diffusion_model."
C_ATTN = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
C_CONV = UNET + "input_blocks.4.0.in_layers.2"
C_PROJ = UNET + "middle_block.1.proj_in"
C_TE = "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1"


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (16, 8, 3, 3), (12, 20, 1, 1)])
@pytest.mark.parametrize("rank", [1, 3, 7])
def test_svd_rank_r_is_optimal(shape: tuple[int, ...], rank: int) -> None:
    d = torch.randn(*shape, generator=_g(rank))
    up, down, err = to_low_rank(d, rank=rank)
    d2 = d.flatten(1).double().numpy()
    s = np.linalg.svd(d2, compute_uv=False)
    optimal = np.sqrt((s[rank:] ** 2).sum() / (s**2).sum())
    approx = (up.flatten(1) @ down.flatten(1)).double().numpy()
    actual = np.linalg.norm(d2 - approx) / np.linalg.norm(d2)
    assert err == pytest.approx(optimal, rel=1e-4)
    assert actual == pytest.approx(optimal, rel=1e-4, abs=1e-6)
    if len(shape) == 4:
        assert up.shape == (shape[0], rank, 1, 1) and down.shape == (rank, *shape[1:])
    else:
        assert up.shape == (shape[0], rank) and down.shape == (rank, shape[1])


def test_energy_threshold_picks_fewest_values() -> None:
    u, _ = torch.linalg.qr(torch.randn(30, 30, generator=_g(1)))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=_g(2)))
    s = torch.tensor([10.0, 5.0, 1.0] + [0.01] * 17)
    d = u[:, :20] @ torch.diag(s) @ v.T
    total = float((s**2).sum())
    for energy, expect in [(0.5, 1), (0.99, 2), (0.9999, 3)]:
        up, down, err = to_low_rank(d, energy=energy)
        assert down.shape[0] == expect
        assert err == pytest.approx(float((s[expect:] ** 2).sum() / total) ** 0.5, rel=1e-3)
    up, down, _ = to_low_rank(d, rank=2, energy=0.9999)
    assert down.shape[0] == 2
    up, down, err = to_low_rank(torch.zeros(5, 4), rank=2)
    assert err == 0.0 and torch.count_nonzero(up @ down) == 0


def _full_rank_deltaset() -> DeltaSet:
    g = _g(3)
    mods = {
        C_ATTN: LoraModule(key=C_ATTN, dense=torch.randn(32, 48, generator=g), kind="loha"),
        C_CONV: LoraModule(key=C_CONV, dense=torch.randn(16, 8, 3, 3, generator=g), kind="lokr"),
        C_PROJ: LoraModule(key=C_PROJ, dense=torch.randn(24, 24, 1, 1, generator=g), kind="full"),
        C_TE: LoraModule(key=C_TE, dense=torch.randn(40, 20, generator=g), kind="full"),
    }
    return DeltaSet(modules=mods, arch="sd1", fmt="lycoris")


def test_read_write_read_full_rank_round_trip_fp32(tmp_path: Path) -> None:
    ds = _full_rank_deltaset()
    errs = write_kohya_lora(ds, tmp_path / "rt.safetensors", arch="sd1", dtype=torch.float32)
    assert max(errs.values()) < 1e-6
    back = read_lora(tmp_path / "rt.safetensors")
    assert set(back.modules) == set(ds.modules) and back.arch == "sd1" and back.unmapped == []
    for k, m in ds.modules.items():
        a, b = m.delta(), back[k].delta()
        assert a.shape == b.shape
        assert float((a - b).norm() / a.norm()) < 1e-5, k
    # a second round trip of a low-rank file is bit-exact (factors are written as they are)
    write_kohya_lora(back, tmp_path / "rt2.safetensors", arch="sd1", dtype=torch.float32)
    again = read_lora(tmp_path / "rt2.safetensors")
    for k in ds.modules:
        assert torch.equal(back[k].down, again[k].down) and torch.equal(back[k].up, again[k].up)


def test_low_rank_modules_are_written_exactly_with_scale_folded(tmp_path: Path) -> None:
    g = _g(4)
    m = LoraModule(
        key=C_ATTN,
        down=torch.randn(4, 48, generator=g),
        up=torch.randn(32, 4, generator=g),
        alpha=2.0,
        multiplier=0.5,
    )
    c = LoraModule(
        key=C_CONV, down=torch.randn(4, 8, 3, 3, generator=g), up=torch.randn(16, 4, 1, 1, generator=g)
    )
    ds = DeltaSet(modules={C_ATTN: m, C_CONV: c}, arch="sd1")
    errs = write_kohya_lora(ds, tmp_path / "x.safetensors", arch="sd1", rank=8, dtype=torch.float32)
    assert errs == {C_ATTN: 0.0, C_CONV: 0.0}
    back = read_lora(tmp_path / "x.safetensors")
    torch.testing.assert_close(back[C_ATTN].delta(), m.delta(), rtol=1e-6, atol=1e-6)
    assert torch.equal(back[C_CONV].down, c.down) and torch.equal(back[C_CONV].up, c.up)
    assert back[C_ATTN].alpha == 4.0 and back[C_ATTN].scale == 1.0


def test_rank_reduction_of_factors_is_optimal(tmp_path: Path) -> None:
    g = _g(5)
    m = LoraModule(
        key=C_ATTN, down=torch.randn(8, 48, generator=g), up=torch.randn(32, 8, generator=g), alpha=4.0
    )
    ds = DeltaSet(modules={C_ATTN: m}, arch="sd1")
    errs = write_kohya_lora(ds, tmp_path / "r3.safetensors", arch="sd1", rank=3, dtype=torch.float32)
    d = m.delta().double().numpy()
    s = np.linalg.svd(d, compute_uv=False)
    optimal = np.sqrt((s[3:] ** 2).sum() / (s**2).sum())
    assert errs[C_ATTN] == pytest.approx(optimal, rel=1e-4)
    back = read_lora(tmp_path / "r3.safetensors")[C_ATTN]
    assert back.rank == 3
    actual = np.linalg.norm(d - back.delta().double().numpy()) / np.linalg.norm(d)
    assert actual == pytest.approx(optimal, rel=1e-4)


def test_written_file_has_only_lora_tensors_and_metadata(tmp_path: Path) -> None:
    ds = _full_rank_deltaset()
    meta = recipe_metadata(
        sources=[{"name": "a.safetensors", "weight": 1.0}, "b.safetensors"],
        method="loraclr",
        parameters={"steps": 50},
        trigger=["sks", "ohwx"],
    )
    p = tmp_path / "merged.safetensors"
    write_kohya_lora(ds, p, arch="sd1", rank=4, metadata=meta)
    with safe_open(str(p), "pt") as f:
        keys = list(f.keys())
        m = f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert len(keys) == 3 * len(ds)
    names = {k.split(".")[0] for k in keys}
    assert names == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_unet_down_blocks_1_resnets_0_conv1",
        "lora_unet_mid_block_attentions_0_proj_in",
        "lora_te_text_model_encoder_layers_3_mlp_fc1",
    }
    for k, t in tensors.items():
        assert t.is_contiguous()
        if k.endswith(".alpha"):
            assert t.dim() == 0 and float(t) == 4.0
        else:
            assert t.dtype == torch.float16
    assert m["ss_network_module"] == "networks.lora" and m["ss_network_dim"] == "4"
    assert m["ss_network_alpha"] == "4" and m["ss_base_model_version"] == "sd_v1" and m["ss_v2"] == "False"
    assert m["ss_output_name"] == "merged" and m["modelspec.title"] == "merged"
    assert m["modelspec.sai_model_spec"] == "1.0.0"
    assert m["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(m["loraclr_trigger"]) == ["sks", "ohwx"]
    assert json.loads(m["loraclr_sources"])[0]["name"] == "a.safetensors" and m["loraclr_method"] == "loraclr"
    assert json.loads(m["loraclr_parameters"]) == {"steps": 50}
    assert read_lora(p).trigger_words() == ["sks", "ohwx"]


def test_sdxl_names_and_metadata(tmp_path: Path) -> None:
    keys = {
        UNET + "input_blocks.4.1.transformer_blocks.1.attn2.to_k": (64, 2048),
        UNET + "output_blocks.2.2.conv": (64, 64, 3, 3),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj": (64, 64),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj:k": (64, 64),
    }
    g = _g(6)
    ds = {k: torch.randn(*s, generator=g) * 0.01 for k, s in keys.items()}
    p = tmp_path / "xl.safetensors"
    write_kohya_lora(ds, p, arch="sdxl", rank=2)
    tensors, m = read_safetensors(p)
    assert {k.split(".")[0] for k in tensors} == {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
        "lora_unet_output_blocks_2_2_conv",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj",
    }
    assert m["ss_base_model_version"] == "sdxl_base_v1-0"
    assert m["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    back = read_lora(p)
    assert back.arch == "sdxl" and set(back.modules) == set(keys)


def test_output_exists_is_refused_before_any_work(tmp_path: Path) -> None:
    p = tmp_path / "exists.safetensors"
    p.write_bytes(b"user data")
    with pytest.raises(OutputExistsError, match=r"exists\.safetensors already exists"):
        write_kohya_lora(_full_rank_deltaset(), p, arch="sd1", rank=2)
    assert p.read_bytes() == b"user data"
    with pytest.raises(OutputExistsError):
        write_checkpoint({C_ATTN + ".weight": torch.zeros(32, 48)}, {C_ATTN: torch.ones(32, 48)}, p)
    assert p.read_bytes() == b"user data"
    write_kohya_lora(_full_rank_deltaset(), p, arch="sd1", rank=2, overwrite=True)
    assert len(read_lora(p)) == 4


def test_non_finite_delta_writes_nothing(tmp_path: Path) -> None:
    d = torch.randn(8, 8)
    d[2, 2] = float("nan")
    with pytest.raises((NonFiniteWeightsError, torch.linalg.LinAlgError)):
        write_kohya_lora({C_ATTN: d}, tmp_path / "nan.safetensors", arch="sd1", rank=2)
    assert list(tmp_path.iterdir()) == []


def test_write_checkpoint_adds_delta_in_original_layout(tmp_path: Path) -> None:
    g = _g(7)
    base = {
        C_ATTN + ".weight": torch.randn(32, 48, generator=g),
        C_ATTN.replace("to_k", "to_v") + ".weight": torch.randn(32, 48, generator=g),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.randn(
            48, 16, generator=g
        ),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias": torch.randn(48, generator=g),
        "cond_stage_model.model.positional_ids": torch.arange(5),
    }
    lm = LoraModule(
        key=C_ATTN, down=torch.randn(2, 48, generator=g), up=torch.randn(32, 2, generator=g), alpha=1.0
    )
    kdelta = torch.randn(16, 16, generator=g)
    ds = DeltaSet(
        modules={
            C_ATTN: lm,
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj:k": LoraModule(
                key="k", dense=kdelta
            ),
        },
        arch="sd2",
    )
    p = write_checkpoint(base, ds, tmp_path / "ck.safetensors", dtype=torch.float32)
    out, meta = read_safetensors(p)
    assert set(out) == set(base)
    torch.testing.assert_close(out[C_ATTN + ".weight"], base[C_ATTN + ".weight"] + lm.delta())
    assert torch.equal(
        out[C_ATTN.replace("to_k", "to_v") + ".weight"], base[C_ATTN.replace("to_k", "to_v") + ".weight"]
    )
    w = out["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    b = base["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(w[:16], b[:16]) and torch.equal(w[32:], b[32:])
    torch.testing.assert_close(w[16:32], b[16:32] + kdelta)
    assert out["cond_stage_model.model.positional_ids"].dtype == torch.int64
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512" and meta["format"] == "pt"
    assert base[C_ATTN + ".weight"].dtype == torch.float32  # base untouched
    p16 = write_checkpoint(base, ds, tmp_path / "ck16.safetensors")
    out16, _ = read_safetensors(p16)
    assert out16[C_ATTN + ".weight"].dtype == torch.float16


def test_write_checkpoint_refuses_missing_and_mismatched(tmp_path: Path) -> None:
    base = {C_ATTN + ".weight": torch.zeros(32, 48)}
    with pytest.raises(UnmappedKeysError, match="no weight in the base checkpoint"):
        write_checkpoint(base, {C_TE: torch.ones(40, 20)}, tmp_path / "a.safetensors")
    with pytest.raises(
        ShapeMismatchError, match=r"\(32, 40\) but the checkpoint's weight has shape \(32, 48\)"
    ):
        write_checkpoint(base, {C_ATTN: torch.ones(32, 40)}, tmp_path / "b.safetensors")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# the whole "read → check → write" path on bad input: a typed error with a useful message, and no output


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        import builtins

        return (builtins.open, (str(self.marker), "w"))


def _make_bad_input(kind: str, src: Path) -> Path:
    from safetensors.torch import save_file

    g = _g(11)
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    good = {
        f"{k}.lora_down.weight": torch.randn(4, 768, generator=g),
        f"{k}.lora_up.weight": torch.randn(320, 4, generator=g),
        f"{k}.alpha": torch.tensor(4.0),
    }
    p = src / f"{kind}.safetensors"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind in ("truncated", "corrupt"):
        save_file(good, str(p))
        data = p.read_bytes()
        p.write_bytes(data[:-50] if kind == "truncated" else data[:8] + b"#" * 20 + data[28:])
    elif kind == "pickle_disguised":
        torch.save(good, p)
    elif kind == "pt_with_code":
        p = src / "concept.pt"
        torch.save({"params": {"unet": {}}, "x": _Payload(src / "marker")}, p)
    elif kind == "nan":
        good[f"{k}.lora_up.weight"][0, 0] = float("nan")
        save_file(good, str(p))
    elif kind == "rank_mismatch":
        good[f"{k}.lora_up.weight"] = torch.randn(320, 3)
        save_file(good, str(p))
    elif kind == "shape_mismatch":
        good[f"{k}.lora_down.weight"] = torch.randn(4, 700)
        good[f"{k}.lora_up.weight"] = torch.randn(320, 4)
        good["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(4, 768)
        good["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(3072, 4)
        save_file(good, str(p))
    elif kind == "sdxl_for_sd1":
        x = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
        save_file(
            {f"{x}.lora_down.weight": torch.randn(4, 1280), f"{x}.lora_up.weight": torch.randn(5120, 4)},
            str(p),
        )
    elif kind == "unknown_family":
        save_file(
            {
                "lora_transformer_x.lora_down.weight": torch.randn(4, 8),
                "lora_transformer_x.lora_up.weight": torch.randn(8, 4),
            },
            str(p),
        )
    else:
        save_file(good, str(p))
    return p


SD1_SHAPES = {
    C_ATTN + ".weight": (320, 768),
    C_TE + ".weight": (3072, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
}


def _convert(src: Path, name: str, out_dir: Path) -> None:
    """What the UI does: read, check against the loaded SD1 model, validate the name, write."""
    from lib_loraclr.readers import check_compatible
    from lib_loraclr.safeio import check_output_name

    ds = read_lora(src)
    check_compatible(ds, SD1_SHAPES, arch="sd1", strict=False)
    out = check_output_name(name, out_dir)
    write_kohya_lora(ds, out, arch="sd1", rank=2)


@pytest.mark.parametrize(
    ("kind", "name", "error", "message"),
    [
        ("empty", "out", "LoraFormatError", "empty.safetensors: the file is empty"),
        ("truncated", "out", "LoraFormatError", "truncated.safetensors: the file is truncated"),
        ("corrupt", "out", "LoraFormatError", "corrupt.safetensors: corrupt safetensors header"),
        (
            "pickle_disguised",
            "out",
            "UnsafeFileError",
            "pickle_disguised.safetensors: this is a PyTorch pickle",
        ),
        ("pt_with_code", "out", "UnsafeFileError", "concept.pt: refused to load"),
        (
            "nan",
            "out",
            "NonFiniteWeightsError",
            "nan.safetensors: tensor lora_unet_down_blocks_0_attentions_0_",
        ),
        ("rank_mismatch", "out", "ShapeMismatchError", "rank mismatch"),
        (
            "shape_mismatch",
            "out",
            "ShapeMismatchError",
            r"delta has shape \(320, 700\) but the model's weight",
        ),
        ("sdxl_for_sd1", "out", "ArchitectureMismatchError", "is a SDXL LoRA but the model is SD1.x"),
        ("unknown_family", "out", "LoraFormatError", "none of its 2 tensors is a LoRA weight we recognise"),
        ("good", "../escape", "BadOutputNameError", "path separator"),
        ("good", "exists", "OutputExistsError", "exists.safetensors already exists"),
    ],
)
def test_bad_input_gives_clear_error_and_no_output(
    tmp_path: Path, kind: str, name: str, error: str, message: str
) -> None:
    from lib_loraclr import errors

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    p = _make_bad_input(kind, src)
    if name == "exists":
        (out / "exists.safetensors").write_bytes(b"precious")
    with pytest.raises(getattr(errors, error), match=message):
        _convert(p, name, out)
    expected = ["exists.safetensors"] if name == "exists" else []
    assert sorted(x.name for x in out.iterdir()) == expected
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out", "src"]
    assert not (src / "marker").exists()
    if name == "exists":
        assert (out / "exists.safetensors").read_bytes() == b"precious"


def test_max_error_keeps_the_fewest_values_within_it() -> None:
    u, _ = torch.linalg.qr(torch.randn(30, 30, generator=_g(11)))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=_g(12)))
    s = torch.tensor([10.0, 5.0, 1.0] + [0.01] * 17)
    d = u[:, :20] @ torch.diag(s) @ v.T
    total = float((s**2).sum())
    tails = [float((s[r:] ** 2).sum() / total) ** 0.5 for r in range(21)]  # 0.453, 0.0885, 0.00367, …
    for tol, expect in [(0.5, 1), (0.1, 2), (0.01, 3), (0.0036, 4), (1e-4, 20)]:
        _, down, err = to_low_rank(d, max_error=tol)
        assert down.shape[0] == expect, tol
        assert err == pytest.approx(tails[expect], rel=1e-3, abs=1e-6) and err <= tol + 1e-7
        assert tails[expect - 1] > tol
    assert to_low_rank(d, rank=2, max_error=1e-6)[1].shape[0] == 2  # rank caps
    assert to_low_rank(torch.zeros(5, 4), max_error=1e-3)[1].shape[0] == 1
    with pytest.raises(ValueError, match="max_error"):
        to_low_rank(d, max_error=-1.0)


def test_a_sum_of_low_rank_deltas_is_saved_at_its_rank(tmp_path: Path) -> None:
    """A linear merge of a rank-4 and a rank-3 LoRA is a rank-7 ΔW: saved at rank 7 by default, and with
    ``rank=16`` (a cap), not at the layer's full rank 32; ``max_error=0`` keeps every value (the old size)."""
    g = _g(13)
    d = torch.randn(32, 4, generator=g) @ torch.randn(4, 48, generator=g)
    d = d + torch.randn(32, 3, generator=g) @ torch.randn(3, 48, generator=g)
    sizes = {}
    for label, kw in [
        ("default", {}),
        ("cap16", {"rank": 16}),
        ("cap5", {"rank": 5}),
        ("all", {"max_error": 0.0}),
    ]:
        p = tmp_path / f"{label}.safetensors"
        errs = write_kohya_lora({C_ATTN: d}, p, arch="sd1", **kw)
        sizes[label] = (read_lora(p)[C_ATTN].rank, p.stat().st_size, errs[C_ATTN])
    assert sizes["default"][0] == 7 and sizes["cap16"][0] == 7 and sizes["cap5"][0] == 5
    assert sizes["all"][0] == 32 and sizes["all"][1] > 4 * (sizes["default"][1] - 1000)
    assert sizes["default"][2] < 1e-5 and sizes["cap5"][2] > 0.05  # rank 7 is exact up to float noise
    m = read_safetensors(tmp_path / "default.safetensors")[1]
    assert m["ss_network_dim"] == "7" and m["ss_network_alpha"] == "7"
