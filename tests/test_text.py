"""PromptEncoder follows the WebUI's SD1 prompt conventions (emphasis, BREAK, chunks, clip skip)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from lib_loraclr.models.tokenizer import clip_tokenizer
from lib_loraclr.text import PromptEncoder, TriggerNotFoundError, parse_prompt_attention

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    model = CLIPTextModel(cfg).eval()
    with torch.no_grad():  # a non-zero mean, as real CLIP's final layer norm has (emphasis rescales by it)
        model.text_model.final_layer_norm.bias.normal_(0.25, 0.5)
    return model


@pytest.fixture(scope="module")
def enc(text_model):
    return PromptEncoder(clip_tokenizer(), text_model)


def test_parse_prompt_attention_matches_webui_doctests():
    assert parse_prompt_attention("normal text") == [("normal text", 1.0)]
    assert parse_prompt_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_prompt_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_prompt_attention("\\(literal\\]") == [("(literal]", 1.0)]
    assert parse_prompt_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    got = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    want = [
        ("a ", 1.0),
        ("house", 1.573),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641),
        (".", 1.1),
    ]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_prompt_attention("[x]") == [("x", pytest.approx(1 / 1.1))]


def test_tokenize_and_chunks(enc):
    assert enc.tokenize("a (cat:1.5)") == [(320, 1.0), (2368, 1.5)]
    ids = enc.chunk_ids("a photo of a cat")
    assert len(ids) == 1 and len(ids[0]) == 77
    assert ids[0][:7] == [BOS, 320, 1125, 539, 320, 2368, EOS] and set(ids[0][7:]) == {EOS}
    assert enc.chunk_ids("") == [[BOS] + [EOS] * 76]
    brk = enc.chunk_ids("a BREAK cat")
    assert len(brk) == 2 and brk[0][:3] == [BOS, 320, EOS] and brk[1][:3] == [BOS, 2368, EOS]
    long = enc.chunk_ids(" ".join(["cat"] * 80))
    assert len(long) == 2 and long[0][1:76] == [2368] * 75 and long[1][1:6] == [2368] * 5
    assert long[1][6] == EOS and long[0][76] == EOS


def test_comma_backtrack(enc):
    # 70 words, a comma, then 10 more: the chunk fills at 75 tokens within 20 of the comma,
    # so the words after the comma move to the next chunk (A1111's comma_padding_backtrack = 20).
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    c = enc.chunk_ids(prompt)
    assert len(c) == 2
    assert c[0][70:72] == [2368, 267] and c[0][72] == EOS  # cut right after the comma
    assert c[1][1:11] == [1929] * 10
    no_back = PromptEncoder(enc.tokenizer, enc.text_model, comma_padding_backtrack=0)
    assert no_back.chunk_ids(prompt)[0][72:76] == [1929] * 4


def test_encode_matches_manual(enc, text_model):
    with torch.no_grad():
        z = enc.encode(["a photo of a cat"])
        ids = torch.tensor(enc.chunk_ids("a photo of a cat"))
        ref = text_model(input_ids=ids).last_hidden_state
    assert z.shape == (1, 77, 64)
    torch.testing.assert_close(z, ref, rtol=0, atol=0)


def test_batch_padded_to_same_chunk_count(enc, text_model):
    with torch.no_grad():
        z = enc.encode(["a cat", "a BREAK dog"])
        empty = text_model(input_ids=torch.tensor([[BOS] + [EOS] * 76])).last_hidden_state
        single = enc.encode(["a cat"])
    assert z.shape == (2, 154, 64)
    torch.testing.assert_close(z[0, 77:], empty[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z[0, :77], single[0], rtol=1e-5, atol=1e-6)


def test_emphasis_weights_and_mean_restore(enc, text_model):
    with torch.no_grad():
        z = enc.encode(["a (cat:1.5) [dog]"])
        ids = torch.tensor(enc.chunk_ids("a (cat:1.5) [dog]"))
        raw = text_model(input_ids=ids).last_hidden_state
    mult = torch.ones(77)
    mult[2], mult[3] = 1.5, 1 / 1.1
    scaled = raw * mult[None, :, None]
    ref = scaled * (raw.mean() / scaled.mean())
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-6)
    assert z.mean().item() == pytest.approx(raw.mean().item(), rel=1e-5)
    plain = PromptEncoder(enc.tokenizer, text_model, emphasis=False)
    assert plain.tokenize("(cat:1.5)")[0] == (263, 1.0)  # "(" taken literally


def test_clip_skip(enc, text_model):
    skip2 = PromptEncoder(enc.tokenizer, text_model, clip_skip=2)
    with torch.no_grad():
        z = skip2.encode(["a photo of a cat"])
        ids = torch.tensor(skip2.chunk_ids("a photo of a cat"))
        out = text_model(input_ids=ids, output_hidden_states=True)
        ref = text_model.text_model.final_layer_norm(out.hidden_states[-2])
        z1 = enc.encode(["a photo of a cat"])
    torch.testing.assert_close(z, ref, rtol=0, atol=0)
    assert (z - z1).abs().max() > 1e-3
    raw = PromptEncoder(enc.tokenizer, text_model, clip_skip=2, final_norm_on_skip=False)
    with torch.no_grad():
        torch.testing.assert_close(raw.encode(["a photo of a cat"]), out.hidden_states[-2], rtol=0, atol=0)
    with pytest.raises(ValueError):
        PromptEncoder(enc.tokenizer, text_model, clip_skip=0)


def test_hooks_fire(enc, text_model):
    calls = []
    h = text_model.text_model.encoder.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, i, o: calls.append(o.shape)
    )
    try:
        with torch.no_grad():
            enc.encode(["a", "b BREAK c"])
    finally:
        h.remove()
    assert calls == [(2, 77, 64), (2, 77, 64)]


def test_token_positions(enc):
    assert enc.token_positions("a photo of sks", "sks") == [4]
    assert enc.token_positions("sks and sks", "sks") == [1, 3]
    assert enc.token_positions("a (sks:1.2) dog", "sks") == [2]
    assert enc.token_positions("a <d8> cat", "<d8>") == [2, 3, 4, 5]
    assert enc.token_positions("a cat BREAK an ohwx", "ohwx") == [77 + 2]
    long = " ".join(["cat"] * 75) + " ohwx"
    assert enc.token_positions(long, "ohwx") == [77 + 1]
    assert enc.token_positions("a photo of a cat", "photo of") == [2, 3]
    with pytest.raises(TriggerNotFoundError, match="ohwx") as e:
        enc.token_positions("a photo of sks", "ohwx")
    assert "a photo of sks" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_eot_position(enc):
    assert enc.eot_position("a photo of a cat") == 6
    assert enc.eot_position("") == 1


def test_encode_rejects_plain_string(enc):
    with pytest.raises(TypeError):
        enc.encode("a cat")


def test_openclip_prompt_encoder():
    from lib_loraclr.models.openclip_text import OpenClipTextModel
    from lib_loraclr.text import OpenClipPromptEncoder

    torch.manual_seed(0)
    te = OpenClipTextModel(width=32, layers=2, heads=4, embed_dim=16).eval()
    seen = []
    h = te.token_embedding.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    sdxl = OpenClipPromptEncoder(clip_tokenizer(), te)  # penultimate, no ln_final (sgm)
    sd2 = OpenClipPromptEncoder(clip_tokenizer(), te, layer="penultimate", final_norm=True)  # ldm SD2
    last = OpenClipPromptEncoder(clip_tokenizer(), te, layer="last")
    try:
        with torch.no_grad():
            z, pooled = sdxl.encode_with_pooled(["a photo of a cat"])
            ids = seen[-1]
            assert ids[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS] and ids[0, 7:].eq(0).all()
            pen, lst, ref_pooled = te.forward_layers(ids)
            torch.testing.assert_close(z, pen, rtol=0, atol=0)
            torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
            torch.testing.assert_close(sd2.encode(["a photo of a cat"]), te.ln_final(pen), rtol=0, atol=0)
            torch.testing.assert_close(last.encode(["a photo of a cat"]), lst, rtol=0, atol=0)
    finally:
        h.remove()
    assert pooled.shape == (1, 16) and z.shape == (1, 77, 32)
    with pytest.raises(ValueError):
        OpenClipPromptEncoder(clip_tokenizer(), te, layer="hidden")
