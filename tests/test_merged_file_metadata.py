"""Merged LoRA files tell the WebUI their trigger words, and are no larger than they need to be.

A1111's card code is re-implemented here from its source (``extensions-builtin/Lora``: ``network.py`` /
``modules/sd_models.read_metadata_from_safetensors`` read the header and parse string values that start
with ``{`` as JSON; ``ui_edit_user_metadata.build_tags`` sums ``ss_tag_frequency`` over dataset dirs,
splits the tags into words of ≥ 3 characters when their average length is ≥ 16, sorts by count; the card
editor shows the first 24 tags and makes a random prompt from them; ``ui_extra_networks_lora`` adds the
sidecar ``NAME.json``'s ``activation text`` to the card's prompt; ``extra_networks.get_user_metadata``
reads that sidecar as the file name with ``.json``).

The merges run on the bundled measuring world (two concepts, ``--method linear``, a few seconds).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import struct
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lib_loraclr.deltas import DeltaSet, LoraModule
from lib_loraclr.merge import cli
from lib_loraclr.metadata import recipe_metadata
from lib_loraclr.readers import read_lora
from lib_loraclr.writers import sidecar_path, svd_tolerance, write_kohya_lora, write_webui_sidecar

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "lib_loraclr" / "world" / "assets"
CONCEPTS = (("sks", "sks"), ("ohwx", "ohwx"))  # (LoRA file stem, trigger)


# ------------------------------------------------------------------ A1111's card code, re-implemented


def a1111_read_metadata(path: Path) -> dict[str, Any]:
    """``sd_models.read_metadata_from_safetensors``: the header's ``__metadata__``; a string value that starts
    with ``{`` is parsed as JSON when it can be."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        start = f.read(2)
        assert n > 2 and start in (b'{"', b"{'")
        header = json.loads(start + f.read(n - 2))
    res: dict[str, Any] = {}
    for k, v in header.get("__metadata__", {}).items():
        res[k] = v
        if isinstance(v, str) and v[0:1] == "{":
            with contextlib.suppress(ValueError):  # A1111 keeps the string
                res[k] = json.loads(v)
    return res


_RE_WORD = re.compile(r"[-_\w']+")


def a1111_build_tags(metadata: dict[str, Any]) -> list[tuple[str, int]]:
    """``ui_edit_user_metadata.build_tags``."""
    tags: dict[str, int] = {}
    freq = metadata.get("ss_tag_frequency", {})
    if freq is not None and hasattr(freq, "items"):
        for tags_dict in freq.values():
            for tag, count in tags_dict.items():
                tag = tag.strip()
                tags[tag] = tags.get(tag, 0) + int(count)
    if tags and sum(len(t) for t in tags) / len(tags) >= 16:  # is_non_comma_tagset
        words: dict[str, int] = {}
        for text, count in tags.items():
            for word in _RE_WORD.findall(text):
                if len(word) >= 3:
                    words[word] = words.get(word, 0) + count
        tags = words
    ordered = sorted(tags.keys(), key=tags.get, reverse=True)
    return [(t, tags[t]) for t in ordered]


def a1111_random_prompt(tags: list[tuple[str, int]], rng: random.Random) -> list[str]:
    """``generate_random_prompt_from_tags`` (as a list; A1111 joins it with ", " after sorting)."""
    max_count = None
    res = []
    for tag, count in tags:
        if not max_count:
            max_count = count
        if count > rng.random() * max_count:
            res.append(tag)
    return sorted(res)


def a1111_card(path: Path) -> dict[str, Any]:
    """What the Lora card and its editor show: shown tags (first 24), activation text, the card's prompt."""
    meta = a1111_read_metadata(path)
    user: dict[str, Any] = {}
    side = Path(
        str(path)[: -len(path.suffix)] + ".json"
    )  # get_user_metadata: splitext(filename)[0] + ".json"
    if side.exists():
        user = json.loads(side.read_text(encoding="utf8"))
    alias = meta.get("ss_output_name", path.stem)
    activation = user.get("activation text")
    prompt = f"<lora:{alias}:1>" + (f" {activation}" if activation else "")
    tags = a1111_build_tags(meta)
    return {
        "tags": tags,
        "shown": [t for t, _ in tags[:24]],
        "activation": activation or "",
        "prompt": prompt,
        "sd_version": user.get("sd version"),
    }


def _tag_words(trigger: str) -> list[str]:
    return [w.strip() for w in trigger.split(",") if w.strip()]


# ------------------------------------------------------------------ the world merges


def _merge(out: Path, *extra: str) -> Any:
    """Run `python -m lib_loraclr merge` (in process) on the world: the two concepts, linear; the MergeResult."""
    argv = [
        "--base",
        str(ASSETS / "base.safetensors"),
        "--out",
        str(out),
        "--method",
        "linear",
        "--no-progress",
    ]
    for stem, trig in CONCEPTS:
        argv += ["--concept", str(ASSETS / "loras" / f"{stem}.safetensors"), trig]
    argv += list(extra)
    rest, specs = cli._split_concepts(argv)
    args = cli.build_parser().parse_args(rest)
    return cli.run(args, specs)


@pytest.fixture(scope="module")
def world_linear(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("merged")
    res = _merge(d / "pair.safetensors", "--sidecar")
    # the same merge saved the old way (every singular value kept): what the file size was before
    write_kohya_lora(res.deltas, d / "pair_full.safetensors", arch="sd1", max_error=0.0)
    return SimpleNamespace(dir=d, res=res, path=d / "pair.safetensors", full=d / "pair_full.safetensors")


def test_a1111_finds_every_concepts_trigger_in_the_merged_file(world_linear) -> None:
    card = a1111_card(world_linear.path)
    triggers = [w for _, t in CONCEPTS for w in _tag_words(t)]
    # every trigger is a tag, listed before the sources' own tags, and shown on the card
    assert [t for t, _ in card["tags"][: len(triggers)]] == triggers
    assert set(triggers) <= set(card["shown"])
    counts = dict(card["tags"])
    assert counts == {"sks": 201, "ohwx": 201, "a": 200}  # the sources' "a" (100 each) kept, summed by A1111
    # a trigger has the highest count, so every random prompt holds every trigger
    rng = random.Random(0)
    for _ in range(50):
        assert set(triggers) <= set(a1111_random_prompt(card["tags"], rng))
    # the card's prompt carries every trigger (activation text from the sidecar)
    assert card["activation"] == "sks, ohwx" and card["prompt"] == "<lora:pair:1> sks, ohwx"
    assert card["sd_version"] == "SD1"
    meta = a1111_read_metadata(world_linear.path)
    assert meta["modelspec.trigger_phrase"] == "sks, ohwx"
    assert read_lora(world_linear.path).trigger_words() == ["sks", "ohwx"]
    assert world_linear.res.report["sidecar"] == {
        "file": str(sidecar_path(world_linear.path)),
        "written": True,
    }


def test_linear_merge_is_saved_at_the_smallest_rank_within_the_tolerance(world_linear) -> None:
    res, path = world_linear.res, world_linear.path
    tol = svd_tolerance(torch.float16)
    assert res.report["svd_tolerance"] == tol == 3e-4
    assert res.report["svd_error_max"] <= tol
    back = read_lora(path)
    src_rank = sum(next(iter(read_lora(ASSETS / "loras" / f"{s}.safetensors"))).rank for s, _ in CONCEPTS)
    assert src_rank == 16
    ranks = {k: m.rank for k, m in back.modules.items()}
    assert max(ranks.values()) == 16 and min(ranks.values()) >= 15  # ≤ the sum of the sources' ranks
    for k in back.modules:  # minimal: one value fewer would exceed the tolerance
        s = torch.linalg.svdvals(res.deltas[k].delta_2d().double())
        tail = (s**2).flip(0).cumsum(0).flip(0) / (s**2).sum()  # tail[r] = relative error² at rank r
        r = ranks[k]
        if r < s.numel():
            assert float(tail[r]) ** 0.5 <= tol, k
        assert float(tail[r - 1]) ** 0.5 > tol, k
    full = read_lora(world_linear.full)
    assert {m.rank for m in full} == {32, 64}  # before: the layers' full ranks
    size, before = path.stat().st_size, world_linear.full.stat().st_size
    sources = sum((ASSETS / "loras" / f"{s}.safetensors").stat().st_size for s, _ in CONCEPTS)
    assert size <= sources + 4096  # no larger than the two source LoRAs together (+ metadata)
    assert before / size > 3.0  # measured 1,309,168 → 405,736 bytes
    # the same delta within the tolerance (plus the fp16 cast, ~3e-4)
    for k, m in back.modules.items():
        ref = res.deltas[k].delta()
        assert float((m.delta() - ref).norm() / ref.norm()) < 1e-3, k


def test_explicit_rank_caps_and_still_trims(world_linear) -> None:
    p = world_linear.dir / "pair_r32.safetensors"
    errs = write_kohya_lora(world_linear.res.deltas, p, arch="sd1", rank=32)
    assert {m.rank for m in read_lora(p)} <= {15, 16} and max(errs.values()) <= 3e-4
    p8 = world_linear.dir / "pair_r8.safetensors"
    write_kohya_lora(world_linear.res.deltas, p8, arch="sd1", rank=8)
    assert {m.rank for m in read_lora(p8)} == {8}


def test_merge_report_names_modules_kohya_ignores(tmp_path: Path) -> None:
    """A merged file that carries conv_in / time_embed deltas says which loaders ignore them."""
    base_lora = read_lora(ASSETS / "loras" / "sks.safetensors")
    g = torch.Generator().manual_seed(3)
    mods = dict(base_lora.modules)
    extra = {
        "model.diffusion_model.input_blocks.0.0": (32, 1, 3, 3),
        "model.diffusion_model.time_embed.0": (128, 32),
    }
    for k, shape in extra.items():
        down = torch.randn(4, *shape[1:], generator=g) * 0.05
        up = torch.randn(shape[0], 4, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.05
        mods[k] = LoraModule(key=k, down=down, up=up, alpha=4.0)
    locon = tmp_path / "sks_locon.safetensors"
    write_kohya_lora(DeltaSet(modules=mods, arch="sd1"), locon, arch="sd1", metadata=base_lora.metadata)
    d = tmp_path / "loras"
    d.mkdir()
    shutil.copy(ASSETS / "loras" / "ohwx.safetensors", d / "ohwx.safetensors")
    argv = [
        "--base",
        str(ASSETS / "base.safetensors"),
        "--out",
        str(tmp_path / "m.safetensors"),
        "--method",
        "linear",
        "--no-progress",
        "--concept",
        str(locon),
        "sks",
        "--concept",
        str(d / "ohwx.safetensors"),
        "ohwx",
    ]
    rest, specs = cli._split_concepts(argv)
    res = cli.run(cli.build_parser().parse_args(rest), specs)
    assert res.report["loader_gaps"] == {"kohya sd-scripts": sorted(extra), "diffusers": sorted(extra)}
    from lib_loraclr.merge.report import format_report

    text = format_report(res.report)
    assert "note: kohya sd-scripts ignores 2 modules" in text and "input_blocks.0.0 (conv_in)" in text
    assert "time_embed.0 (time_embedding.linear_1)" in text
    assert "sidecar" not in res.report and not (tmp_path / "m.json").exists()  # only with --sidecar


# ------------------------------------------------------------------ trigger metadata, unit level


def _file_with(tmp_path: Path, name: str, triggers: list[str], sources: list[dict[str, str]]) -> Path:
    p = tmp_path / f"{name}.safetensors"
    meta = recipe_metadata(
        sources=[f"c{i}" for i in range(len(triggers))],
        method="loraclr",
        trigger=triggers,
        tag_sources=sources,
    )
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    write_kohya_lora({key: torch.ones(8, 8)}, p, arch="sd1", rank=1, metadata=meta)
    return p


def test_triggers_outrank_many_frequent_source_tags(tmp_path: Path) -> None:
    freq = {f"10_set{i}": {f"tag{i}_{j}": 1000 - j for j in range(40)} for i in range(2)}
    sources = [{"ss_tag_frequency": json.dumps({k: v})} for k, v in freq.items()] + [{}]
    triggers = ["sks dog, red collar", "ohwx", "zq"]
    p = _file_with(tmp_path, "three", triggers, sources)
    card = a1111_card(p)
    wanted = [w for t in triggers for w in _tag_words(t)]
    assert card["shown"][: len(wanted)] == wanted  # all four trigger tags first, "zq" (2 chars) kept
    assert len(card["tags"]) == 4 + 2 * 20  # 20 source tags per concept at most
    assert dict(card["tags"])["tag0_0"] == 1000 and dict(card["tags"])["sks dog"] == 1001


def test_sentence_like_source_tags_are_dropped_so_short_triggers_survive(tmp_path: Path) -> None:
    long = {"1_x": {"a photograph of a small dog sitting on the grass": 50, "another long caption here": 40}}
    p = _file_with(tmp_path, "long", ["zq", "ohwx"], [{"ss_tag_frequency": json.dumps(long)}, {}])
    card = a1111_card(p)
    assert card["shown"] == ["zq", "ohwx"]  # with the captions A1111 would split words and drop "zq"
    meta = a1111_read_metadata(p)
    assert meta["ss_tag_frequency"] == {"1_c0": {"zq": 1}, "1_c1": {"ohwx": 1}}


# ------------------------------------------------------------------ the sidecar NAME.json


def test_sidecar_is_written_and_a_users_sidecar_is_kept(tmp_path: Path) -> None:
    lora = tmp_path / "merged.safetensors"
    side = write_webui_sidecar(lora, ["sks cat", "ohwx, dog"], "sdxl", description="two concepts")
    assert side == tmp_path / "merged.json"
    assert json.loads(side.read_text(encoding="utf8")) == {
        "description": "two concepts",
        "sd version": "SDXL",
        "activation text": "sks cat, ohwx, dog",
        "preferred weight": 0.0,
        "negative text": "",
        "notes": "",
    }
    user = {"activation text": "my words", "notes": "mine", "preferred weight": 0.7, "description": "my card"}
    side.write_text(json.dumps(user), encoding="utf8")
    before = side.read_bytes()
    assert write_webui_sidecar(lora, ["sks"], "sd1") is None and side.read_bytes() == before
    # asked to overwrite: the activation text and sd version change, the user's other fields stay
    assert write_webui_sidecar(lora, ["sks", "ohwx"], "sd1", description="new", overwrite=True) == side
    got = json.loads(side.read_text(encoding="utf8"))
    assert got["activation text"] == "sks, ohwx" and got["sd version"] == "SD1"
    assert got["notes"] == "mine" and got["preferred weight"] == 0.7 and got["description"] == "my card"
    side.write_text("not json", encoding="utf8")
    write_webui_sidecar(lora, ["sks"], "sd1", overwrite=True)
    assert json.loads(side.read_text(encoding="utf8"))["activation text"] == "sks"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.json"]  # no temporary files left


def test_cli_refuses_a_report_path_that_is_the_sidecar(tmp_path: Path) -> None:
    from lib_loraclr.errors import LoraclrError

    out = tmp_path / "m.safetensors"
    argv = [
        "--base",
        str(ASSETS / "base.safetensors"),
        "--out",
        str(out),
        "--sidecar",
        "--report",
        str(tmp_path / "m.json"),
        "--concept",
        str(ASSETS / "loras" / "sks.safetensors"),
        "sks",
    ]
    with pytest.raises(LoraclrError, match="sidecar"):
        cli.main(argv)
    assert list(tmp_path.iterdir()) == []


def test_webui_merge_job_writes_the_sidecar_and_keeps_a_users(tmp_path: Path) -> None:
    """The merge tab / REST path: the sidecar next to the merged LoRA in the WebUI's LoRA folder."""
    scripts_dir = str(ROOT / "scripts")
    if scripts_dir not in sys.path:
        sys.path.insert(0, scripts_dir)
    from loraclr_glue.lora_files import run_merge

    from lib_loraclr.merge.request import validate_request

    folder = tmp_path / "Lora"
    folder.mkdir()
    for stem, _ in CONCEPTS:
        shutil.copy(ASSETS / "loras" / f"{stem}.safetensors", folder / f"{stem}.safetensors")
    (folder / "pair.json").write_text('{"activation text": "mine", "notes": "keep"}', encoding="utf8")
    body = {
        "loras": [{"name": s, "trigger": t} for s, t in CONCEPTS],
        "method": "linear",
        "output": {"name": "pair", "rank": 32},
    }
    out = run_merge(
        validate_request(body),
        lora_folder=folder,
        checkpoint_folder=None,
        base_checkpoint=ASSETS / "base.safetensors",
    )
    assert out["report"]["sidecar"] == {"file": str(folder / "pair.json"), "written": False}
    assert json.loads((folder / "pair.json").read_text(encoding="utf8")) == {
        "activation text": "mine",
        "notes": "keep",
    }
    assert {m.rank for m in read_lora(folder / "pair.safetensors")} <= {15, 16}  # rank 32 asked: a cap
    assert out["report"]["svd_tolerance"] == 3e-4 and out["report"]["loader_gaps"] == {}
    body["output"] = {"name": "pair2", "rank": 32}
    out = run_merge(
        validate_request(body),
        lora_folder=folder,
        checkpoint_folder=None,
        base_checkpoint=ASSETS / "base.safetensors",
    )
    assert out["report"]["sidecar"]["written"] is True
    card = a1111_card(folder / "pair2.safetensors")
    assert card["activation"] == "sks, ohwx" and card["prompt"] == "<lora:pair2:1> sks, ohwx"
    assert card["shown"][:2] == ["sks", "ohwx"]
