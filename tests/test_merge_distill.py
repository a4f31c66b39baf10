"""The output-level refinement (``lib_loraclr/merge/distill.py``) on the tiny SD1 model: it lowers the loss it
minimises, leaves the model bit-identical, stops when asked, and ``distill_steps=0`` changes nothing."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.apply import patched
from lib_loraclr.merge import distill as D
from lib_loraclr.merge.pipeline import Concept, MergeConfig, MergeInputError, _concept_prompts, merge_loras
from lib_loraclr.models.sd import build_tiny_sd1
from tests.lora_factory import attention_keys, random_lora

SHAPE = (4, 8, 16)  # small (the default 16×16 costs 4× per attention call); not 8×8: 1×1 at the bottom


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


def _config(**kw) -> MergeConfig:
    kw.setdefault("sequential", False)
    kw.setdefault("distill_overrides", {"pool": 4, "batch": 2})
    return MergeConfig(
        method="lsq", sample_steps=2, sampler="euler", shape=SHAPE, neutral_prompts=("a photo",), **kw
    )


def _toy(model, concepts):
    """(merged = the mean of the two LoRAs, own deltas + the base, prompts + the neutral ones, config)."""
    cfg = _config()
    own = [{k: m.delta() for k, m in c.deltas.modules.items()} for c in concepts] + [{}]
    merged = {k: ((own[0][k] + own[1][k]) / 2).reshape(own[0][k].shape[0], -1) for k in own[0]}
    prompts = [_concept_prompts(c, cfg) for c in concepts] + [list(cfg.neutral_prompts)]
    return merged, own, prompts, cfg


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [
        p.requires_grad for p in model.parameters()
    ]


def _assert_untouched(model, snap) -> None:
    state, flags = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_pure_helpers() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g)
    up, down = D.lowrank_factors(a @ b, 3)
    assert up.shape == (6, 3) and down.shape == (3, 5)
    torch.testing.assert_close(up @ down, a @ b, atol=1e-5, rtol=1e-5)
    own = torch.randn(2, 1, 4, 4, generator=g)
    others = torch.randn(2, 3, 1, 4, 4, generator=g)
    assert torch.equal(D.contrast_hinge(own, own, others, 0.5), torch.zeros(2))  # at the own teacher: 0
    assert (D.contrast_hinge(others[:, 0], own, others, 0.5) > 0).all()  # at another teacher: pushed
    x0, noise = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    ac = torch.tensor([0.25, 0.5])
    xt = D.noised_latents(x0, noise, torch.tensor([0, 1]), ac)
    torch.testing.assert_close(xt[:, 0, 0, 0], torch.tensor([0.5, 0.5**0.5]))


def test_hooks_equal_patched_weights(model, concepts) -> None:
    """The student's hooks add exactly what ``patched`` would add to the weights (TE and UNet)."""
    delta = {k: m.delta() for k, m in concepts[0].deltas.modules.items()}
    student = D.Student({k: d.reshape(d.shape[0], -1) for k, d in delta.items()})
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        with patched(model, delta):
            want = model.apply_model(x, t, model.get_learned_conditioning(["a sks", "sks"]))
        with D.student_hooks(model, student):
            got = model.apply_model(x, t, model.get_learned_conditioning(["a sks", "sks"]))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rank", [0, 2])
def test_distill_lowers_its_loss_and_keeps_the_model(model, concepts, rank) -> None:
    merged, own, prompts, cfg = _toy(model, concepts)
    snap = _snapshot(model)
    params = D.DistillParams(steps=12, pool=4, batch=2, rank=rank, lr=0.05)
    out, info = D.distill_merged(model, merged, own, prompts, cfg, params)
    _assert_untouched(model, snap)
    assert set(out) == set(merged) and all(out[k].shape == merged[k].shape for k in merged)
    assert info["loss_after"] < info["loss_before"], info
    assert info["keys"] == len(merged) and not info["skipped_keys"]


def test_pipeline_distill_keeps_bits_and_reports(model, concepts) -> None:
    snap = _snapshot(model)
    res = merge_loras(model, concepts, _config(distill_steps=2))
    _assert_untouched(model, snap)
    d = res.report["distill"]
    assert d["steps"] == 2 and d["loss_after"] <= d["loss_before"] * 1.5


def test_should_stop_interrupts_between_steps(model, concepts) -> None:
    class Stop(Exception):
        pass

    seen: list[str] = []

    def progress(stage: str, done: int, total: int) -> None:
        seen.append(stage)
        if stage.startswith("distill: step 2/"):
            raise Stop  # what run_job's tick does when should_stop() turns true (MergeInterrupted)

    snap = _snapshot(model)
    with pytest.raises(Stop):
        merge_loras(model, concepts, _config(distill_steps=5), progress)
    _assert_untouched(model, snap)
    assert any(s.startswith("distill: teacher outputs") for s in seen)
    assert seen[-1].startswith("distill: step 2/")


def test_zero_steps_is_todays_merge_bit_for_bit(model, concepts) -> None:
    plain = merge_loras(model, concepts, _config(distill_overrides={}))
    off = merge_loras(model, concepts, _config(distill_steps=0, distill_overrides={"lr": 1.0, "rank": 2}))
    assert set(plain.deltas.modules) == set(off.deltas.modules)
    for k in plain.deltas.modules:
        assert torch.equal(plain.deltas[k].delta(), off.deltas[k].delta()), k
    assert "distill" not in off.report and "distill" not in plain.report


def test_bad_options_are_refused(model, concepts) -> None:
    with pytest.raises(MergeInputError):
        merge_loras(model, concepts, _config(distill_steps=-1))
    with pytest.raises(MergeInputError):
        merge_loras(model, concepts, _config(distill_steps=1, distill_overrides={"nope": 1}))
    with pytest.raises(MergeInputError):
        merge_loras(model, concepts, _config(distill_steps=1, distill_overrides={"latents": "x"}))


def test_low_rank_teachers_and_in_place_training_give_the_same_bits(model, concepts) -> None:
    """Teachers given as their LoRAs (densified one at a time) and a student that trains the merged ΔW in
    place (no copy) give exactly the result of dense teachers and a copied student; in place, the caller's
    tensors are the refined ones."""
    merged, own, prompts, cfg = _toy(model, concepts)
    params = D.DistillParams(steps=3, pool=4, batch=2)
    want, _ = D.distill_merged(model, merged, own, prompts, cfg, params)
    assert not any(torch.equal(want[k], merged[k]) for k in merged)  # the copy left the input alone
    lazy = [c.deltas for c in concepts] + [{}]
    work = {k: v.clone() for k, v in merged.items()}
    got, _ = D.distill_merged(model, work, lazy, prompts, cfg, params, in_place=True)
    for k in merged:
        assert torch.equal(got[k], want[k]), k
        assert got[k].data_ptr() == work[k].data_ptr() and torch.equal(work[k], want[k]), k


def test_item_runs_cut_by_canvas_and_chunk() -> None:
    """Items are grouped by canvas and cut into calls of at most ``chunk_pixels // (H·W)`` items (one at
    least), every picked item exactly once, in order."""

    def prompt_data(shape, n, group=0):
        x = torch.zeros(n, *shape)
        return D._PromptData("p", group, x, torch.zeros(n), x, x[:, None][:, :0])

    pool = [prompt_data((4, 8, 8), 5), prompt_data((4, 4, 8), 3), prompt_data((4, 8, 8), 4, group=1)]
    picks = [torch.tensor([4, 0, 2]), torch.arange(3), torch.tensor([1, 3])]
    runs = list(D.item_runs(pool, picks, chunk_pixels=2 * 64))  # 2 items of 8×8, 4 of 4×8
    assert [[(k, idx.tolist()) for k, idx in r] for r in runs] == [
        [(0, [4, 0])],
        [(0, [2]), (2, [1])],
        [(2, [3])],
        [(1, [0, 1, 2])],
    ]
    one = list(D.item_runs(pool, picks, chunk_pixels=1))  # below one item: one item per call
    assert len(one) == 8 and all(len(r) == 1 and len(r[0][1]) == 1 for r in one)


def test_chunked_steps_accumulate_the_one_call_gradient(model, concepts) -> None:
    """A step's batch cut into UNet calls of at most 3 items (gradients accumulated) gives the loss and the
    gradient of one call over the whole batch: the loss to float rounding, the gradient within 5 % (the
    tiny random model's saturated attention amplifies float32 rounding in the backward pass: reversing the
    prompts' order alone moves it by ~1e-4, one item per call by ~3 %; a wrong weighting would move it by
    ~50 % or more)."""
    merged, own, prompts, cfg = _toy(model, concepts)
    params = D.DistillParams(steps=1, pool=4, batch=2)
    pool = D.build_pool(model, own, prompts, cfg, params, lambda _: None)
    weights = {0: 1.0, 1: 1.0, 2: 1.0}
    gen = torch.Generator().manual_seed(5)
    picks = [torch.randperm(4, generator=gen)[:2] for _ in pool]
    sizes: list[int] = []

    def grad(chunk_pixels: int) -> tuple[float, torch.Tensor]:
        student = D.Student(merged)
        sizes.clear()
        hook = model.model.diffusion_model.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
        try:
            with D.frozen(model):
                p = D.DistillParams(steps=1, pool=4, batch=2, chunk_pixels=chunk_pixels)
                loss = D._batch_loss(model, student, pool, picks, weights, p, backward=True)
        finally:
            hook.remove()
        return loss, torch.cat([q.grad.flatten() for q in student.parameters()])

    loss_one, g_one = grad(10**6)
    assert sizes == [2 * len(pool)]
    loss_cut, g_cut = grad(3 * SHAPE[1] * SHAPE[2])
    assert max(sizes) == 3 and sum(sizes) == 2 * len(pool)
    assert loss_cut == pytest.approx(loss_one, rel=1e-5)
    assert float((g_cut - g_one).norm() / g_one.norm()) < 0.05
    assert not any(m._forward_hooks for m in model.modules())
