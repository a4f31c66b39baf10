"""The offline CLIP tokenizer equals the standard openai/clip-vit-large-patch14 one."""

from __future__ import annotations

import json

import pytest

from lib_loraclr.models import tokenizer as tk


def test_standard_ids():
    tok = tk.clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("sks", add_special_tokens=False)["input_ids"] == [48136]
    assert tok("ohwx", add_special_tokens=False)["input_ids"] == [47993]
    assert len(tok("<d8>", add_special_tokens=False)["input_ids"]) == 4
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 49407
    assert tok("A  Photo\tOF a CAT")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_cached_per_process():
    assert tk.clip_tokenizer() is tk.clip_tokenizer()


def test_bpe_vocab_path_exists():
    p = tk.bpe_vocab_path()
    assert p.name == "bpe_simple_vocab_16e6.txt.gz" and p.is_file()


def test_written_files(tmp_path):
    out = tk.write_clip_tokenizer_files(tmp_path / "tok")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "i n" and len(merges) == 1 + 48894
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 77 and cfg["do_lower_case"] is True
    assert not list(out.glob("*.tmp")), "temporary files left behind"


def test_missing_open_clip_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tk.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(tk.TokenizerFilesError, match="open_clip_torch"):
        tk.bpe_vocab_path()


def test_seed_clip_tokenizer_fills_the_cache_without_open_clip(tmp_path, monkeypatch):
    """Without open_clip_torch (Forge Neo) the tokenizer cache is filled from another copy of the same
    files (Forge's); with open_clip, a complete cache or no source, nothing is copied."""
    from transformers import CLIPTokenizer

    from lib_loraclr.models import tokenizer

    source = tokenizer.write_clip_tokenizer_files(
        tmp_path / "forge_tokenizer"
    )  # stands in for Forge's folder
    dest = tmp_path / "cache" / "clip_tokenizer"
    monkeypatch.setattr(tokenizer, "has_open_clip", lambda: True)
    assert tokenizer.seed_clip_tokenizer(source, dest) is None and not dest.exists()
    monkeypatch.setattr(tokenizer, "has_open_clip", lambda: False)
    assert tokenizer.seed_clip_tokenizer(tmp_path / "nowhere", dest) is None and not dest.exists()
    assert tokenizer.seed_clip_tokenizer(None, dest) is None
    assert tokenizer.seed_clip_tokenizer(source, dest) == dest
    assert tokenizer.seed_clip_tokenizer(source, dest) is None  # complete now
    tok = CLIPTokenizer.from_pretrained(str(dest), local_files_only=True)
    text = "a photo of sks cat, (ohwx dog:1.2)"
    assert len(tok) == 49408 and tok(text).input_ids == tokenizer.clip_tokenizer()(text).input_ids
