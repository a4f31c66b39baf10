"""The measuring world's committed assets: layout, judges, LoRAs, and the smoke benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lib_loraclr.world import data as wdata
from lib_loraclr.world.assets import BASE_FILE, LORA_DIR, load_base, load_lora
from lib_loraclr.world.concepts import load_concepts
from lib_loraclr.world.judges import NOT_A_DIGIT, load_judges, make_negatives

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base():
    return load_base()


@pytest.fixture(scope="module")
def judges():
    return load_judges()


def test_assets_fit_the_size_budget():
    total = sum(
        p.stat().st_size for p in (ROOT / "lib_loraclr" / "world" / "assets").rglob("*") if p.is_file()
    )
    assert total <= 25 * 1024 * 1024


def test_base_checkpoint_has_the_sd1_layout_and_loads_like_a_checkpoint(base):
    from lib_loraclr.arch import detect_checkpoint_arch

    with safe_open(str(BASE_FILE), framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        emb = f.get_tensor("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
    assert all(
        k.startswith(("model.diffusion_model.", "cond_stage_model.transformer.text_model.")) for k in keys
    )
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in keys
    assert emb.dtype == torch.float16 and tuple(emb.shape) == (49408, 64)
    assert detect_checkpoint_arch(shapes) == "sd1"
    # load_base re-expands the fp16 embedding into the fp32 parameter, bit-equal to the stored values
    assert (
        base.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight.dtype == torch.float32
    )
    assert torch.equal(
        base.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight, emb.float()
    )
    # transformers < 4.31 (A1111 1.10: 4.30.2) keeps CLIP's position_ids as a saved buffer
    assert {k for k in base.state_dict() if not k.endswith("position_ids")} == set(keys)


def test_word_tokenizer_equals_clip_tokenizer():
    from lib_loraclr.models.tokenizer import clip_tokenizer
    from lib_loraclr.world.vocab import TRIGGERS, WordTokenizer

    tok, wt = clip_tokenizer(), WordTokenizer()
    prompts = ["", "a 3", "a handwritten 7", "a sks and a 7", "a 1, a ohwx and a 9", "4 then 5 then 6"]
    prompts += [f"a {t} next to a 0" for t in TRIGGERS]
    for p in prompts:
        assert wt.ids(p) == tok(p, padding="max_length", max_length=77, truncation=True).input_ids
    for t in TRIGGERS:  # every trigger is one rare token
        ids = tok(t).input_ids[1:-1]
        assert len(ids) == 1 and ids[0] > 40000


def test_scene_data_and_split():
    d = wdata.load_digit_data()
    assert len(set(d.train_idx) & set(d.test_idx)) == 0 and len(d.train_idx) + len(d.test_idx) == 1797
    assert float(d.images.min()) == -1.0 and float(d.images.max()) == 1.0
    x, caps = wdata.SceneSampler(d, seed=3).batch(16)
    assert x.shape[0] == 16 and x.shape[-1] in (8, 16, 24)
    assert all(str(h) not in c for c in caps for h in wdata.HELD_OUT)
    slots = wdata.split_slots(x)
    assert torch.equal(wdata.compose(list(slots[0])), x[0])


def test_classifier_judge_is_accurate_and_rejects_non_digits(judges):
    clf, _, _ = judges
    d = wdata.load_digit_data()
    te = torch.from_numpy(d.test_idx)
    acc = float((clf.predict(d.images[te]) == d.labels[te]).float().mean())
    assert acc >= 0.95
    neg = make_negatives(d.images[te], 400, torch.Generator().manual_seed(5))
    assert float((clf.predict(neg) == NOT_A_DIGIT).float().mean()) >= 0.85


def test_identity_judge_identifies_held_out_real_images(judges):
    from lib_loraclr.world.evaluate import make_identity_judge

    _, mean, comps = judges
    concepts = load_concepts()
    assert len(concepts) >= 12
    ij = make_identity_judge(mean, comps, concepts)
    names = list(concepts)
    hits = total = 0
    for i, c in enumerate(concepts.values()):
        pred = ij.identify(c.images("test"), names)
        hits += int((pred == i).sum())
        total += len(pred)
    assert hits / total >= 0.9


def test_concept_loras_are_kohya_files_with_triggers(base):
    from lib_loraclr.readers import check_compatible

    for name, c in load_concepts().items():
        ds = load_lora(name)
        assert ds.arch == "sd1" and not ds.unmapped
        assert ds.trigger_words()[0] == c.trigger
        assert any(".attn2.to_k" in k for k in ds.modules) and ds.te_keys()
        assert check_compatible(ds, base) == []
    with safe_open(str(LORA_DIR / "sks.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_tag_frequency"]) and meta["loraclr_trigger"] == "sks"


def test_smoke_benchmark(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import quality

    res = quality.main(["--smoke", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in res["rows"]}
    # a single LoRA draws its concept far more often than the base, which never saw it
    assert rows["single"]["fidelity"] >= rows["base"]["fidelity"] + 0.4
    assert rows["base"]["base"] >= 0.75  # known digits without triggers
    assert rows["single"]["compose"] > rows["base"]["compose"]
    assert (tmp_path / "results.json").is_file()
    assert (tmp_path / "grid_single_N2_cfg3.png").is_file()


def test_lora_trainer_continues_from_a_trained_lora(base):
    """`bench/world_train.py loras --init`: a concept's factors start as the committed LoRA's (same ΔW at
    the trainer's scale), so training continues from it."""
    sys.path.insert(0, str(ROOT / "bench"))
    import world_train as wt

    from lib_loraclr.world.model import build_world_model

    model = build_world_model(0)
    lora = load_lora("sks")
    ml = wt.MultiLora(model, 2, 8, 4.0, torch.device("cpu"))
    ml.load(1, lora)
    f = ml.factors(1)
    key = next(k for k in lora.modules if ".attn2.to_k" in k)
    m = lora.modules[key]
    got = (4.0 / 8) * f[key + ".lora_up.weight"] @ f[key + ".lora_down.weight"]
    want = m.scale * m.up.float() @ m.down.float()
    assert torch.allclose(got, want.reshape(got.shape), atol=1e-6)
    assert float(ml.factors(0)[key + ".lora_up.weight"].abs().max()) == 0.0  # concept 0 untouched (fresh)
    ml.remove()
