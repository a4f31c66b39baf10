"""The standard CLIP BPE tokenizer, generated offline from open_clip_torch's vocabulary file.

The generated ``vocab.json`` / ``merges.txt`` hold exactly the tokens, ids and merges of
``openai/clip-vit-large-patch14`` (49,408 entries): 256 byte-unicode characters, the same 256 with
``</w>``, the 48,894 merges joined, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
_N_MERGES = 49152 - 256 - 2
_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


class TokenizerFilesError(RuntimeError):
    """The CLIP vocabulary file could not be found or the tokenizer files could not be written."""


def bpe_vocab_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` shipped in the open_clip_torch wheel (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise TokenizerFilesError(
        "bpe_simple_vocab_16e6.txt.gz not found: install open_clip_torch "
        "(pip install --no-deps open_clip_torch); only its vocabulary file is used"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable unicode character table (256 entries, fixed order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _special(content: str) -> dict[str, object]:
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True}


def _file_texts() -> dict[str, str]:
    with gzip.open(bpe_vocab_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : _N_MERGES + 1]
    if len(merges) != _N_MERGES:
        raise TokenizerFilesError(f"{bpe_vocab_path()}: expected {_N_MERGES} merges, found {len(merges)}")
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise TokenizerFilesError(f"generated vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    config = {
        "unk_token": {**_special("<|endoftext|>"), "__type": "AddedToken"},
        "bos_token": {**_special("<|startoftext|>"), "__type": "AddedToken"},
        "eos_token": {**_special("<|endoftext|>"), "__type": "AddedToken"},
        "pad_token": "<|endoftext|>",
        "add_prefix_space": False,
        "errors": "replace",
        "do_lower_case": True,
        "name_or_path": "openai/clip-vit-base-patch32",
        "model_max_length": 77,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
    }
    special = {
        "bos_token": _special("<|startoftext|>"),
        "eos_token": _special("<|endoftext|>"),
        "unk_token": _special("<|endoftext|>"),
        "pad_token": "<|endoftext|>",
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special),
    }


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_clip_tokenizer_files(dest: Path) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json into ``dest``.

    Each file is written atomically (temp file + rename); an existing identical set is rewritten with
    the same content. Returns ``dest``, loadable with ``CLIPTokenizer.from_pretrained(dest)``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in _file_texts().items():
        _write_atomic(dest / name, text)
    return dest


def tokenizer_cache_dir() -> Path:
    """``$LORACLR_CACHE/clip_tokenizer`` or ``~/.cache/lib_loraclr/clip_tokenizer``."""
    root = os.environ.get("LORACLR_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "lib_loraclr"
    return base / "clip_tokenizer"


def has_open_clip() -> bool:
    return importlib.util.find_spec("open_clip") is not None


def seed_clip_tokenizer(source: Path | None, dest: Path | None = None) -> Path | None:
    """Fill the tokenizer cache (``dest``, default `tokenizer_cache_dir`) from a folder holding the same
    CLIP tokenizer's files (``source``: e.g. the SD1 tokenizer Forge ships) when open_clip_torch, whose
    vocabulary the files are generated from, is missing and the cache is incomplete. The files hold the same
    vocabulary (49,408 entries) and merges. Returns ``dest`` when it copied, else None."""
    dest = Path(dest) if dest is not None else tokenizer_cache_dir()
    if has_open_clip() or all((dest / name).is_file() for name in _FILES):
        return None
    if source is None or not all((Path(source) / name).is_file() for name in _FILES):
        return None
    dest.mkdir(parents=True, exist_ok=True)
    for name in _FILES:
        _write_atomic(dest / name, (Path(source) / name).read_text(encoding="utf-8"))
    return dest


@functools.lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer (slow `CLIPTokenizer`, like the WebUI's), cached per process.

    Files are generated once into `tokenizer_cache_dir()`.
    """
    path = tokenizer_cache_dir()
    if not all((path / name).is_file() for name in _FILES):
        write_clip_tokenizer_files(path)
    tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    if len(tok) != VOCAB_SIZE:  # a damaged cache: regenerate once
        write_clip_tokenizer_files(path)
        tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    return tok
