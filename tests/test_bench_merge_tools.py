"""Bench helpers of the merge measurements: the GPU default computed on the CPU (`quality.MergeMethod`
``as_on_gpu``), the per-slot tally of two-concept scenes and the refinement's weight shift."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import quality as q
import refine_shift as rs

from lib_loraclr.world.evaluate import SlotReading


def test_the_gpu_default_method_merges_with_the_gpu_refinement(monkeypatch) -> None:
    import lib_loraclr.merge.pipeline as P

    seen = []

    def fake_merge(model, concepts, cfg):
        seen.append(cfg)
        return SimpleNamespace(deltas=None, report={})

    monkeypatch.setattr(P, "merge_loras", fake_merge)
    world = SimpleNamespace(
        model=None,
        loras={"sks": None, "ohwx": None},
        concepts={"sks": SimpleNamespace(trigger="sks"), "ohwx": SimpleNamespace(trigger="ohwx")},
    )
    for name in ("loraclr_gpu", "loraclr_gpu_layout", "loraclr"):
        q.METHODS[name]().setup(world, ["sks", "ohwx"])
    assert [c.distill_steps for c in seen] == [P.GPU_REFINEMENT_STEPS, P.GPU_REFINEMENT_STEPS, None]


def test_slot_tally_names_what_each_words_slot_showed() -> None:
    judge = SimpleNamespace(matches=lambda w, s: s.digit == (2 if w == "sks" else int(w)))  # sks = a 2
    reads = [
        [SlotReading(2, None), SlotReading(7, None)],
        [SlotReading(10, None), SlotReading(7, None)],
        [SlotReading(3, None), SlotReading(1, None)],
    ]
    tally = q.slot_tally(judge, [["sks", "7"], ["sks", "7"], ["sks", "7"]], reads)
    assert tally == {"7": {"ok": 2, "1": 1}, "sks": {"ok": 1, "not a digit": 1, "3": 1}}


def test_refine_shift_per_group_and_block() -> None:
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1"
    kv = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k"
    un = "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn1.to_q"
    assert [rs.block_of(k) for k in (te, kv, un)] == ["te", "middle", "output_blocks.5"]
    solved = {te: torch.ones(2, 2), kv: torch.full((2, 2), 2.0), un: torch.ones(2, 2)}
    refined = {te: torch.ones(2, 2), kv: torch.full((2, 2), 3.0), un: torch.full((2, 2), 1.5)}
    own = [{te: torch.ones(2, 2), kv: torch.ones(2, 2)}, {te: torch.ones(2, 2), kv: torch.ones(2, 2)}]
    out = rs.shifts(solved, refined, own)
    assert out[("te", "all")] == (0.0, 1.0)
    assert out[("kv", "middle")] == (0.5, 2.0)
    assert out[("unet", "output_blocks.5")] == (0.5, float("inf"))  # no concept has its own ΔW there
