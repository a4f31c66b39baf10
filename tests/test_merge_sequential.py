"""Sequential merging: paired (student, teacher) statistics, drift-corrected targets, depth-ordered solve."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.merge.pipeline import Concept, MergeConfig, merge_loras
from lib_loraclr.merge.sequential import unet_stage
from lib_loraclr.merge.stats import PairedStats
from lib_loraclr.models.sd import build_tiny_sd1
from tests.lora_factory import attention_keys, random_lora


def test_effective_delta_is_the_least_squares_fit_of_the_teacher() -> None:
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n = 6, 5, 40
    xt = torch.randn(n, d_in, generator=g)  # teacher inputs
    xs = xt + 0.3 * torch.randn(n, d_in, generator=g)  # drifted student inputs at the same positions
    w0 = torch.randn(d_out, d_in, generator=g)
    dw = 0.5 * torch.randn(d_out, d_in, generator=g)
    ps = PairedStats(d_in)
    ps.add(xs[:15], xt[:15])
    ps.add(xs[15:], xt[15:])
    eff = ps.effective_delta(w0, dw, ridge=0.0)
    # argmin_Δ ‖X̃(W0+Δ)ᵀ − X(W0+ΔW)ᵀ‖ in closed form (lstsq), float64
    target = xt.double() @ (w0 + dw).double().T
    w_star = torch.linalg.lstsq(xs.double(), target).solution.T
    torch.testing.assert_close(eff.double(), w_star - w0.double(), rtol=1e-4, atol=1e-4)
    assert 0.25 < ps.drift < 0.35
    # no drift: the target is the LoRA itself; a base teacher (ΔW = None) asks for no change
    same = PairedStats(d_in)
    same.add(xt, xt)
    torch.testing.assert_close(same.effective_delta(w0, dw), dw, rtol=1e-5, atol=1e-5)
    assert same.drift == 0.0
    assert float(same.effective_delta(w0, None).abs().max()) < 1e-5
    with pytest.raises(Exception, match="aligned"):
        ps.add(xs[:3], xt[:4])


def test_unet_stages_follow_depth() -> None:
    keys = [
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1.to_q",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q",
        "model.diffusion_model.input_blocks.11.1.transformer_blocks.0.attn1.to_q",
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn1.to_q",
    ]
    assert [k.split(".")[2] + k.split(".")[3] for k in sorted(keys, key=unet_stage)] == [
        "input_blocks2",
        "input_blocks11",
        "middle_block1",
        "output_blocks3",
    ]


@pytest.fixture(scope="module")
def small():
    """The tiny SD1 model and two random LoRAs on a few layers (TE layer 0, two UNet blocks): seconds."""
    model = build_tiny_sd1(seed=0)
    keys = [
        k
        for k in attention_keys(model)
        if ".encoder.layers.0." in k or ".input_blocks.1." in k or ".output_blocks.11." in k
    ]
    assert any(".attn2.to_k" in k for k in keys) and any(".attn1.to_q" in k for k in keys)
    return model, [
        Concept(random_lora(model, keys, seed=1), "sks", name="a"),
        Concept(random_lora(model, keys, seed=2), "ohwx", name="b"),
    ]


def _fast(**kw) -> MergeConfig:
    return MergeConfig(sample_steps=2, sampler="euler", sequential=True, **kw)


def test_sequential_one_concept_reproduces_it_without_drift(small) -> None:
    """One concept: each layer fits its LoRA on the student's inputs, so the student never drifts from the
    teacher and every layer's error stays ~0 (K/V on every context position: the UNet attends to the padding
    too; with ``kv_rows="prompt"`` the padding's K/V differ and the next layers see drift)."""
    model, concepts = small
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = merge_loras(
        model,
        concepts[:1],
        _fast(method="lsq", preserve_base=False, ridge=1e-8, sequential_ridge=1e-8, kv_rows="all"),
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert set(res.deltas.modules) == set(concepts[0].deltas.modules)
    for key, info in res.report["per_layer"].items():
        assert info["input_drift"][0] < 2e-3, (key, info["input_drift"])
        assert info["fidelity"]["rel_err"][0] < 2e-3, (key, info["fidelity"]["rel_err"])
    assert res.report["config"]["sequential"] is True


def test_sequential_two_concepts_runs_every_stage_in_depth_order(small) -> None:
    model, concepts = small
    stages: list[str] = []
    res = merge_loras(model, concepts, _fast(method="lsq"), progress=lambda s, d, t: stages.append(s))
    assert set(res.deltas.modules) == set(concepts[0].deltas.modules)
    te = [i for i, s in enumerate(stages) if s.startswith("text encoder (sequential)")]
    kv = [i for i, s in enumerate(stages) if s.startswith("cross-attention K/V (sequential)")]
    unet = [i for i, s in enumerate(stages) if s.startswith("UNet (sequential): stage")]
    assert te and kv and unet and max(te) < min(kv) < min(unet)
    assert any("stage 2/2" in stages[i] for i in unet)  # input_blocks.1, then output_blocks.11
    drift = [v["input_drift"] for v in res.report["per_layer"].values()]
    assert all(len(d) == 3 for d in drift)  # two concepts + the neutral base rows
    assert max(max(d) for d in drift) > 1e-3  # two concepts in one model: inputs do drift
    for g in ("te", "kv", "unet"):
        for name in ("a", "b"):
            err = res.report["groups"][g]["concepts"][name]["rel_err"]
            assert err is not None and 0.0 <= err < 1.0, (g, name, err)
    # the official preset never solves sequentially unless asked
    assert MergeConfig(preset="official").effective_sequential() is False
    assert MergeConfig(sequential=True, preset="official").effective_sequential() is True


def test_a_pass_that_feeds_one_stage_stops_after_it_with_the_same_rows(small) -> None:
    """``_collect(stop_after=…)`` records exactly the rows of a full pass and then stops the pass: the layers
    after the awaited module never run (what makes sequential solving cost one pass per stage, not two)."""
    from lib_loraclr.merge.pipeline import StopForward, _collect, _hook_module
    from lib_loraclr.merge.sequential import _count_runs, _RowBuffer, _until_recorded

    model, concepts = small
    g, key = "layer0:x", next(k for k in concepts[0].deltas.modules if ".encoder.layers.0." in k)
    later = {"last": next(n for n, _ in model.named_modules() if n.endswith("final_layer_norm"))}
    full, cut = {g: _RowBuffer()}, {g: _RowBuffer()}
    with torch.no_grad():
        with _collect(model, full, {g: key}), _count_runs(model, later) as ran_full:
            model.get_learned_conditioning(["photo of a sks"])
        fires = len(full[g].blocks)
        with _collect(model, cut, {g: key}, stop_after={g: fires}), _count_runs(model, later) as ran_cut:
            assert _until_recorded(lambda: model.get_learned_conditioning(["photo of a sks"])) is None
    assert fires >= 1 and ran_full["last"] >= 1 and ran_cut["last"] == 0
    assert torch.equal(full[g].rows(), cut[g].rows())
    assert issubclass(StopForward, Exception) and _hook_module(model, key) is not None


def test_lowrank_output_writes_the_same_file_as_the_dense_merge(small, tmp_path) -> None:
    """``lowrank_output`` (what `run_job` asks for LoRA output) reduces each layer with the writer's own SVD
    as soon as no pass needs its exact ΔW: the written file is the same, tensor for tensor, and the
    reported SVD errors are the writer's."""
    from safetensors.torch import load_file

    from lib_loraclr.writers import svd_tolerance, write_kohya_lora

    model, concepts = small
    tol = svd_tolerance(torch.float16)
    dense = merge_loras(model, concepts, _fast(method="lsq"))
    low = merge_loras(model, concepts, _fast(method="lsq", lowrank_output=(4, tol)))
    assert list(low.deltas.modules) == list(dense.deltas.modules)
    assert all(m.dense is None and m.rank <= 4 for m in low.deltas.modules.values())
    assert "lowrank_output" not in low.report["config"]
    e_dense = write_kohya_lora(dense.deltas, tmp_path / "d.safetensors", arch="sd1", rank=4)
    e_low = write_kohya_lora(low.deltas, tmp_path / "l.safetensors", arch="sd1", rank=4)
    assert set(e_low.values()) == {0.0} and low.svd_errors == e_dense
    a, b = load_file(tmp_path / "d.safetensors"), load_file(tmp_path / "l.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_merge_never_holds_a_dense_delta_per_layer_and_concept(small, monkeypatch) -> None:
    """The concepts' ΔW stay low-rank (dense only inside one layer's forward or solve) and reach the model
    through per-layer forward hooks, never `apply.patched` (a copy of every targeted weight); the text
    encoder's merged ΔW is reduced to the output rank before the UNet stages. Sampled in every hooked
    forward and every layer solve. (The old pipeline held every concept's dense ΔW on every layer, N·L.)"""
    import weakref

    import lib_loraclr.apply as apply
    import lib_loraclr.merge.pipeline as pipeline
    from lib_loraclr.deltas import LoraModule

    model, concepts = small
    keys = list(concepts[0].deltas.modules)
    own: list[weakref.ref] = []  # dense ΔW built from a concept's factors
    te_merged: list[weakref.ref] = []  # the solver's dense ΔW of text-encoder layers
    peak = {"own": 0, "te_in_unet_stage": 0}
    delta = LoraModule.delta

    def tracked_delta(self, dtype=torch.float32):
        out = delta(self, dtype)
        own.append(weakref.ref(out))
        return out

    def alive(refs: list[weakref.ref]) -> int:
        return sum(r() is not None for r in refs)

    def pre(self, module, args):
        peak["own"] = max(peak["own"], alive(own))
        return pre0(self, module, args)

    def solve(method, w0, stats, **kw):
        peak["own"] = max(peak["own"], alive(own))
        d, info = solve0(method, w0, stats, **kw)
        key = stack[-1]
        if not key.startswith("model.diffusion_model."):
            te_merged.append(weakref.ref(d))
        elif ".attn2.to_k" not in key and ".attn2.to_v" not in key:  # a UNet stage (after every teacher run)
            peak["te_in_unet_stage"] = max(peak["te_in_unet_stage"], alive(te_merged))
        return d, info

    def refuse(*a, **k):
        raise AssertionError("apply.patched copies every targeted weight; the merge must not use it")

    stack: list[str] = []  # the key being solved (`_w0` is read first)
    pre0, solve0 = apply.DeltaHooks._pre, pipeline.merge_layer
    monkeypatch.setattr(LoraModule, "delta", tracked_delta)
    monkeypatch.setattr(apply.DeltaHooks, "_pre", pre)
    monkeypatch.setattr(apply, "patched", refuse)
    w0_0 = pipeline._w0
    monkeypatch.setattr(pipeline, "_w0", lambda m, k: (stack.append(k), w0_0(m, k))[1])
    monkeypatch.setattr(pipeline, "merge_layer", solve)
    res = merge_loras(model, concepts, _fast(method="lsq", lowrank_output=(None, 3e-4)))
    assert len(stack) == len(keys) and len(res.deltas) == len(keys)
    assert 0 < peak["own"] <= 2 * len(concepts) + 1, peak  # one layer's worth at a time
    assert peak["te_in_unet_stage"] == 0, peak
    assert alive(te_merged) == 0
