"""The merge pipeline on the tiny SD1-layout model: every stage runs, the base stays bit-identical,
saved files load back, and the report carries the fidelity numbers."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.apply import patched
from lib_loraclr.errors import ArchitectureMismatchError
from lib_loraclr.merge.pipeline import Concept, MergeConfig, MergeInputError, merge_loras
from lib_loraclr.merge.report import format_report
from lib_loraclr.models.sd import build_tiny_sd1
from lib_loraclr.readers import read_lora
from lib_loraclr.text import TriggerNotFoundError
from lib_loraclr.writers import write_checkpoint, write_kohya_lora
from tests.lora_factory import attention_keys, random_lora


@pytest.fixture(scope="module")
def model():
    return build_tiny_sd1(seed=0)


@pytest.fixture(scope="module")
def concepts(model):
    keys = attention_keys(model)
    return [
        Concept(random_lora(model, keys, seed=1), "sks", name="a"),
        Concept(random_lora(model, keys, seed=2), "ohwx", name="b"),
    ]


def _fast(**kw) -> MergeConfig:
    kw.setdefault(
        "sequential", False
    )  # the one-pass feature collection; tests/test_merge_sequential.py: the other
    return MergeConfig(sample_steps=2, sampler="euler", **kw)


@pytest.mark.parametrize("method", ["lsq", "loraclr", "linear"])
def test_merge_runs_all_stages_and_keeps_base_bits(model, concepts, method) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = merge_loras(model, concepts, _fast(method=method))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    keys = set(concepts[0].deltas.modules)
    assert set(res.deltas.modules) == keys
    groups = {v["group"] for v in res.report["per_layer"].values()}
    assert groups == {"te", "kv", "unet"}
    if method == "linear":
        k = next(iter(keys))
        expected = concepts[0].deltas[k].delta() + concepts[1].deltas[k].delta()
        torch.testing.assert_close(res.deltas[k].delta(), expected)
    else:
        for g in ("te", "kv", "unet"):
            per = res.report["groups"][g]["concepts"]
            for name in ("a", "b"):
                err = per[name]["rel_err"]
                assert err is not None and 0.0 <= err < 1.0, (g, name, err)
        text = format_report(res.report)
        assert "fidelity" in text and "kv" in text


def test_single_concept_lsq_reproduces_its_lora(model, concepts) -> None:
    """One concept alone: the least-squares merge must reproduce that LoRA on its own inputs."""
    res = merge_loras(model, concepts[:1], _fast(method="lsq", preserve_base=False, ridge=1e-6))
    for g in ("te", "kv", "unet"):
        assert res.report["groups"][g]["concepts"]["a"]["rel_err"] < 1e-3, g


def test_saved_lora_and_checkpoint_load_back(model, concepts, tmp_path) -> None:
    res = merge_loras(model, concepts, _fast(method="lsq"))
    errs = write_kohya_lora(
        res.deltas, tmp_path / "merged.safetensors", arch="sd1", rank=None, dtype=torch.float32
    )
    back = read_lora(tmp_path / "merged.safetensors")
    assert set(back.modules) == set(res.deltas.modules)
    for k, m in back.modules.items():
        ref = res.deltas[k].delta()
        rel = float((m.delta() - ref).norm() / ref.norm())
        assert rel <= errs[k] + 1e-4, (k, rel, errs[k])
    # the saved LoRA applied to the base reproduces the merged weights within the reported SVD error
    write_checkpoint(
        model.state_dict(), res.deltas, tmp_path / "merged_ckpt.safetensors", dtype=torch.float32
    )
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "merged_ckpt.safetensors")
    with patched(model, res.deltas):
        live = model.state_dict()
        for k in list(res.deltas.modules)[:10]:
            assert torch.allclose(sd[k + ".weight"], live[k + ".weight"], atol=1e-6)


def test_bad_requests_have_clear_errors(model, concepts) -> None:
    with pytest.raises(MergeInputError, match="nothing to merge"):
        merge_loras(model, [], _fast())
    with pytest.raises(TriggerNotFoundError):
        merge_loras(model, [Concept(concepts[0].deltas, "sks", prompts=["a photo of a dog"])], _fast())
    sdxl = Concept(concepts[0].deltas, "sks")
    sdxl.deltas = type(concepts[0].deltas)(modules=concepts[0].deltas.modules, arch="sdxl")
    with pytest.raises(ArchitectureMismatchError, match="different base architectures"):
        merge_loras(model, [sdxl, concepts[1]], _fast())
    with pytest.raises(MergeInputError, match="unknown merge method"):
        merge_loras(model, concepts, _fast(method="average"))


def test_merge_on_tiny_sdxl_layout_and_save(tmp_path) -> None:
    """SDXL layout: both text encoders (OpenCLIP fused q/k/v rows included), dict conditioning."""
    from lib_loraclr.models.sd import build_tiny_sdxl

    model = build_tiny_sdxl(seed=0)
    keys = attention_keys(model)
    assert any(k.endswith("in_proj:q") for k in keys) and any(".embedders.0." in k for k in keys)
    cs = [Concept(random_lora(model, keys, seed=s, arch="sdxl"), t) for s, t in ((1, "sks"), (2, "ohwx"))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = merge_loras(model, cs, _fast(method="loraclr"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert set(res.deltas.modules) == set(keys)
    for g in ("te", "kv", "unet"):
        for name in ("sks", "ohwx"):
            assert res.report["groups"][g]["concepts"][name]["rel_err"] < 1.0
    errs = write_kohya_lora(res.deltas, tmp_path / "xl.safetensors", arch="sdxl", dtype=torch.float32)
    back = read_lora(tmp_path / "xl.safetensors")
    assert back.arch == "sdxl" and set(back.modules) == set(keys)
    assert max(errs.values()) < 1e-5
    # as a checkpoint: every tensor equals the live model with the merge patched in (fused q/k/v rows too)
    write_checkpoint(model.state_dict(), res.deltas, tmp_path / "xl_ckpt.safetensors", dtype=torch.float32)
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "xl_ckpt.safetensors")
    with patched(model, res.deltas):
        live = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(sd) <= set(live) and len(sd) > 0.9 * len(live)
    changed = [k for k in sd if not torch.equal(sd[k], before[k])]
    assert any("in_proj_weight" in k for k in changed) and len(changed) >= len(keys) // 2
    for k in sd:
        torch.testing.assert_close(sd[k], live[k], rtol=0, atol=1e-6)


def test_mean_prior_single_concept_and_all_prompts(model, concepts) -> None:
    """prior="mean" solves for Δ − Δ̄: with one concept Δ̄ is its own ΔW, so the merge is that LoRA exactly;
    sample_prompts="all" samples every template (with ``shape_for``'s canvas) and still fits each concept."""
    res = merge_loras(model, concepts[:1], _fast(method="lsq", prior="mean"))
    for k, m in res.deltas.modules.items():
        torch.testing.assert_close(m.delta(), concepts[0].deltas[k].delta(), rtol=1e-4, atol=1e-6)
    shapes: list[tuple[int, int, int]] = []

    c, h, w = model.latent_shape

    def shape_for(prompt: str) -> tuple[int, int, int]:
        shapes.append((c, h, w if " and " not in prompt else 2 * w))
        return shapes[-1]

    cfg = _fast(
        method="lsq",
        prior="mean",
        sample_prompts="all",
        shape_for=shape_for,
        templates=("photo of a {}", "a {} and a dog"),
    )
    res = merge_loras(model, concepts, cfg)
    assert (c, h, 2 * w) in shapes and (c, h, w) in shapes
    for name in ("a", "b"):
        assert res.report["groups"]["unet"]["concepts"][name]["rel_err"] < 1.0
    assert res.report["config"]["shape_for"] == "custom"


def test_prior_by_preset_and_layer_group() -> None:
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1"
    kv = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    rec, off = MergeConfig(), MergeConfig(preset="official")
    assert (rec.prior_for(te), rec.prior_for(kv)) == ("zero", "mean")  # "mean-unet"
    assert (off.prior_for(te), off.prior_for(kv)) == ("zero", "zero")
    assert MergeConfig(prior="mean").prior_for(te) == "mean"


def test_feature_options_are_validated(model, concepts) -> None:
    for bad in ({"prior": "median"}, {"sample_prompts": "some"}, {"sample_images": 0}):
        with pytest.raises(MergeInputError):
            merge_loras(model, concepts, _fast(method="lsq", **bad))
