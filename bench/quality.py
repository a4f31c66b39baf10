"""Quality benchmark in the measuring world: do merged concepts survive, compose, and stay apart?

    python bench/quality.py --n 2,4 --methods base,single,linear,lsq,loraclr --samples 96 --seeds 0,1 \\
        --cfg 1.5,3 --out out/quality
    python bench/quality.py --smoke --out out/quality_smoke       # CI-sized (one seed, few samples)

Per method and number of merged concepts N (the first N of ``--concepts``, or a seeded random subset with
``--subset-seed``), at each CFG and sampling seed (``seed`` = the noise seed; prompts are fixed by
``--prompt-seed``), over ``--samples`` images per cell:

- ``fidelity``: "a {trigger}" shows that concept (classifier on the slot + identity judge); the mean over
  the N concepts, and ``fidelity_ratio`` = merged fidelity / the single LoRA's own fidelity;
- ``leakage``: in those single-concept images, how often another merged concept j appears instead;
- ``multi``: "a {ti} and a {tj}" (i ≠ j, all pairs round-robin) shows both, each once (order-free);
- ``compose``: "a {ti} and a 7" / "a 7 and a {ti}" with a random known digit shows both;
- ``base``: known digits without triggers (singles and pairs) are drawn correctly.

Methods (``METHODS``; add more with `register_method`): ``base`` (no LoRA), ``single`` (each request with
its own concept's LoRA only; multi-concept prompts are not applicable), ``linear`` (sum of the LoRAs,
multiplier 1), and merges through `lib_loraclr.merge.pipeline.merge_loras`: ``lsq``, ``loraclr``
(recommended preset), ``loraclr_official``, ``svd``, and ``lsq_np`` / ``loraclr_np`` (recommended, without
the neutral-prompt base-preservation rows). Output: a table on stdout, ``results.json`` and one PNG
grid per method and N in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_loraclr.world import data as wdata
from lib_loraclr.world.assets import BASE_FILE, LORA_DIR, load_base
from lib_loraclr.world.concepts import Concept, load_concepts
from lib_loraclr.world.evaluate import SceneJudge, make_identity_judge
from lib_loraclr.world.judges import load_judges

Request = list[str]  # slot words left to right: ["sks", "7"]


@dataclass
class World:
    """The loaded world: model (`SD1Model`), concepts, LoRAs (name → DeltaSet), scene judge."""

    model: torch.nn.Module
    concepts: dict[str, Concept]
    loras: dict[str, object]
    judge: SceneJudge
    steps: int = 20
    sampler: str = "dpmpp_2m"
    batch: int = 96

    def sample(self, prompts: list[str], width: int, cfg: float, seed: int, denoiser=None) -> torch.Tensor:
        """Images ``[n, 1, 8, 8·width]``; image i of the whole list uses noise seed ``seed + i``."""
        from lib_loraclr.models.sampling import sample

        out = []
        for s in range(0, len(prompts), self.batch):
            kw = {"denoiser": denoiser} if denoiser is not None else {}
            out.append(
                sample(
                    self.model,
                    prompts[s : s + self.batch],
                    cfg_scale=cfg,
                    seed=seed + s,
                    steps=self.steps,
                    sampler=self.sampler,
                    shape=(1, 8, 8 * width),
                    **kw,
                )
            )
        return torch.cat(out) if out else torch.zeros(0, 1, 8, 8 * width)


class Method:
    """A way to generate with a set of concepts. Subclasses override `setup` and `context`."""

    name = "method"
    multi_concept = True  # can it be asked for two concepts in one prompt?

    def setup(self, world: World, names: Sequence[str]) -> None:
        self.names = list(names)

    def context(self, world: World, concepts_in_request: Sequence[str]) -> AbstractContextManager:
        return nullcontext()

    def generate(self, world: World, requests: Sequence[Request], cfg: float, seed: int) -> torch.Tensor:
        """Images for requests of one width; requests are grouped by the set of concepts they use."""
        width = len(requests[0])
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(tuple(sorted({w for w in r if w in world.concepts})), []).append(i)
        out = torch.zeros(len(requests), 1, 8, 8 * width)
        for key, idx in groups.items():
            with self.context(world, key):
                imgs = world.sample(
                    [wdata.canonical_prompt(requests[i]) for i in idx], width, cfg, seed + idx[0]
                )
            out[idx] = imgs
        return out


class BaseMethod(Method):
    name = "base"


class SingleMethod(Method):
    """Each request with the LoRA of the one concept it names (none: base)."""

    name = "single"
    multi_concept = False

    def context(self, world, concepts_in_request):
        from lib_loraclr.apply import patched

        if not concepts_in_request:
            return nullcontext()
        if len(concepts_in_request) > 1:
            raise ValueError("a single LoRA cannot be asked for two concepts")
        return patched(world.model, world.loras[concepts_in_request[0]])


class LinearMethod(Method):
    """Sum of the N LoRAs (multiplier 1 each), patched into the weights."""

    name = "linear"

    def context(self, world, concepts_in_request):
        from lib_loraclr.apply import patched

        return patched(world.model, [(world.loras[n], 1.0) for n in self.names])


class MergeMethod(Method):
    """A merge from `lib_loraclr.merge.pipeline.merge_loras`, with prompts in the world's vocabulary."""

    def __init__(
        self,
        method: str,
        preset: str = "recommended",
        name: str | None = None,
        preserve_base: bool | None = None,
        overrides: dict | None = None,
        as_on_gpu: bool = False,
    ) -> None:
        self.method, self.preset, self.preserve_base = method, preset, preserve_base
        self.overrides = dict(
            overrides or {}
        )  # further MergeConfig fields (bench/merge_diagnose.py variants)
        # the defaults a merge on a GPU gets (computed here on the CPU): the refinement steps of
        # `GPU_REFINEMENT_STEPS` unless ``overrides`` set them
        self.as_on_gpu = as_on_gpu
        self.name = name or method
        self.report: dict = {}
        self.seconds = 0.0

    def setup(self, world, names):
        from lib_loraclr.merge.pipeline import Concept as MergeConcept
        from lib_loraclr.merge.pipeline import MergeConfig, merge_loras

        super().setup(world, names)
        overrides = dict(self.overrides)
        if self.as_on_gpu:
            cfg = MergeConfig(method=self.method, preset=self.preset, **overrides)
            overrides["distill_steps"] = cfg.effective_distill_steps("cuda")
        cfg = MergeConfig(
            method=self.method,
            preset=self.preset,
            templates=("a {}", "{}", "a {} and a 3"),
            neutral_prompts=("a 0", "a 4 and a 7", "a 1, a 6 and a 9", ""),
            shape=(1, 8, 8),
            shape_for=wdata.canvas_for,
            preserve_base=self.preserve_base,
            **overrides,
        )
        concepts = [
            MergeConcept(deltas=world.loras[n], trigger=world.concepts[n].trigger, name=n) for n in names
        ]
        t0 = time.time()
        res = merge_loras(world.model, concepts, cfg)
        self.seconds = time.time() - t0
        self.deltas, self.report = res.deltas, res.report

    def context(self, world, concepts_in_request):
        from lib_loraclr.apply import patched

        return patched(world.model, self.deltas)


DISTILL_STEPS = 100  # of the ``loraclr_distill`` method
CROPS = 0.5  # region-crop weight of the ``*_crops`` methods (`RegionalDenoiser` ``crops``)

METHODS: dict[str, Callable[[], Method]] = {
    "base": BaseMethod,
    "single": SingleMethod,
    "linear": LinearMethod,
    "lsq": lambda: MergeMethod("lsq"),
    "loraclr": lambda: MergeMethod("loraclr", "recommended", "loraclr"),
    "loraclr_official": lambda: MergeMethod("loraclr", "official", "loraclr_official"),
    # the recommended merge as it runs where a GPU is present (refinement on: `GPU_REFINEMENT_STEPS`)
    "loraclr_gpu": lambda: MergeMethod("loraclr", "recommended", "loraclr_gpu", as_on_gpu=True),
    "svd": lambda: MergeMethod("svd"),
    # without the neutral-prompt "base" concept (preserve_base=False), which the recommended preset adds
    "lsq_np": lambda: MergeMethod("lsq", "recommended", "lsq_np", preserve_base=False),
    "loraclr_np": lambda: MergeMethod("loraclr", "recommended", "loraclr_np", preserve_base=False),
    # recommended + the output-level refinement (lib_loraclr/merge/distill.py; docs/DESIGN.md "Merge recipe")
    "loraclr_distill": lambda: MergeMethod(
        "loraclr", "recommended", "loraclr_distill", overrides={"distill_steps": DISTILL_STEPS}
    ),
    # shorter refinements (how the gain scales with the steps, i.e. with its cost)
    **{
        f"loraclr_distill{k}": (
            lambda k=k: MergeMethod(
                "loraclr", "recommended", f"loraclr_distill{k}", overrides={"distill_steps": k}
            )
        )
        for k in (10, 25, 50)
    },
    # the refined merge as a saved rank-8 LoRA (the writer's SVD cut, as the WebUI saves it), trained dense
    # then cut, or trained at rank 8 (what is trained is what is saved)
    "loraclr_distill25_save8": lambda: MergeMethod(
        "loraclr",
        "recommended",
        "loraclr_distill25_save8",
        overrides={"distill_steps": 25, "lowrank_output": (8, 3e-4)},
    ),
    "loraclr_distill25_r8": lambda: MergeMethod(
        "loraclr",
        "recommended",
        "loraclr_distill25_r8",
        overrides={"distill_steps": 25, "lowrank_output": (8, 3e-4), "distill_overrides": {"rank": 8}},
    ),
    **{
        f"loraclr_save{r}": (
            lambda r=r: MergeMethod(
                "loraclr", "recommended", f"loraclr_save{r}", overrides={"lowrank_output": (r, 3e-4)}
            )
        )
        for r in (8, 32)
    },
}


def register_method(name: str, factory: Callable[[], Method]) -> None:
    """Add a method (e.g. CLoRA) to the benchmark's choices."""
    METHODS[name] = factory


# ------------------------------------------------------------------------------------------ requests
@dataclass
class Cells:
    """The requests of one N (fixed by the prompt seed, shared by every method)."""

    fidelity: list[Request] = field(default_factory=list)
    multi: list[Request] = field(default_factory=list)
    compose: list[Request] = field(default_factory=list)
    base: list[Request] = field(default_factory=list)


def make_cells(names: Sequence[str], samples: int, prompt_seed: int) -> Cells:
    rng = random.Random(prompt_seed)
    c = Cells()
    c.fidelity = [[names[i % len(names)]] for i in range(samples)]
    pairs = [(a, b) for a in names for b in names if a != b]
    rng.shuffle(pairs)
    c.multi = [list(pairs[i % len(pairs)]) for i in range(samples)] if pairs else []
    for i in range(samples):
        d = str(rng.choice(wdata.KNOWN))
        n = names[i % len(names)]
        c.compose.append([n, d] if i % 2 == 0 else [d, n])
    for i in range(samples):
        k = 1 if i % 2 == 0 else 2
        c.base.append([str(rng.choice(wdata.KNOWN)) for _ in range(k)])
    return c


def _run_cell(world: World, method: Method, requests: list[Request], cfg: float, seed: int):
    """(images by width, readings, requests in the same order)."""
    by_w: dict[int, list[Request]] = {}
    for r in requests:
        by_w.setdefault(len(r), []).append(r)
    imgs, reads, reqs = {}, [], []
    for w, rs in sorted(by_w.items()):
        x = method.generate(world, rs, cfg, seed)
        imgs[w] = x
        reads.extend(world.judge.read(x))
        reqs.extend(rs)
    return imgs, reads, reqs


def evaluate(world: World, method: Method, names: Sequence[str], cells: Cells, cfg: float, seed: int) -> dict:
    """All metrics of one (method, N, CFG, seed) cell; raw images of each metric under ``"_images"``."""
    res: dict = {"_images": {}}
    judge = world.judge
    imgs, reads, reqs = _run_cell(world, method, cells.fidelity, cfg, seed)
    res["_images"]["fidelity"] = imgs[1]
    per = {n: [] for n in names}
    leak = {n: {m: 0 for m in names if m != n} for n in names}
    for r, rd in zip(reqs, reads):
        per[r[0]].append(judge.success(r, rd))
        for m in leak[r[0]]:
            leak[r[0]][m] += int(judge.present(m, rd))
    res["fidelity_per_concept"] = {n: sum(v) / len(v) if v else None for n, v in per.items()}
    res["fidelity"] = statistics.fmean([v for v in res["fidelity_per_concept"].values() if v is not None])
    cnt = {n: len(v) for n, v in per.items()}
    res["leakage_matrix"] = {n: {m: leak[n][m] / max(1, cnt[n]) for m in leak[n]} for n in names}
    anyleak = {n: 0 for n in names}
    for r, rd in zip(reqs, reads):
        anyleak[r[0]] += int(any(judge.present(m, rd) for m in names if m != r[0]))
    res["leakage"] = statistics.fmean([anyleak[n] / max(1, cnt[n]) for n in names]) if len(names) > 1 else 0.0
    for key in ("multi", "compose", "base"):
        rq = getattr(cells, key)
        if not rq or (key == "multi" and not method.multi_concept):
            res[key] = None
            continue
        imgs, reads, reqs = _run_cell(
            world, method, rq, cfg, seed + 7919 * (1 + ["multi", "compose", "base"].index(key))
        )
        res["_images"][key] = imgs[max(imgs)]
        res[key] = sum(judge.success(r, rd) for r, rd in zip(reqs, reads)) / len(reqs)
        if key == "multi":
            res["multi_slots"] = slot_tally(judge, reqs, reads)
    return res


def slot_tally(judge, requests: Sequence[Request], reads) -> dict[str, dict[str, int]]:
    """Per requested word, what its own slot showed in multi-concept scenes: ``"ok"``, ``"not a digit"`` or
    the digit drawn instead (``"7"``; a concept's digit in another style counts as its digit)."""
    from collections import Counter

    from lib_loraclr.world.judges import NOT_A_DIGIT

    tally: dict[str, Counter[str]] = {}
    for r, rd in zip(requests, reads):
        for w, slot in zip(r, rd):
            ok = judge.matches(w, slot)
            what = "ok" if ok else ("not a digit" if slot.digit == NOT_A_DIGIT else str(slot.digit))
            tally.setdefault(w, Counter())[what] += 1
    return {w: dict(t.most_common()) for w, t in sorted(tally.items())}


def save_grid(images: dict[str, torch.Tensor], path: Path, per_row: int = 16) -> None:
    """One row block per metric: up to ``per_row`` images each, scaled ×4, grey separators."""
    from PIL import Image

    rows = []
    for x in images.values():
        x = x[:per_row].clamp(-1, 1)
        if x.shape[0] == 0:
            continue
        pad = torch.full((x.shape[0], 1, 8, 24 - x.shape[-1] + 2), 0.0)
        rows.append(torch.cat([torch.cat([x, pad], -1)[i] for i in range(x.shape[0])], -1))
    if not rows:
        return
    w = max(r.shape[-1] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, w - r.shape[-1], 0, 2), value=0.0) for r in rows]
    img = ((torch.cat(rows, 1)[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    pil = Image.fromarray(img, mode="L").resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST)
    tmp = path.with_name(f".{path.name}.tmp")
    pil.save(tmp, format="PNG")
    os.replace(tmp, path)


def load_world(
    base: Path | str = BASE_FILE,
    lora_dir: Path | str = LORA_DIR,
    names: Sequence[str] | None = None,
    steps: int = 20,
    sampler: str = "dpmpp_2m",
) -> World:
    from lib_loraclr.world.assets import load_lora

    concepts = load_concepts()
    model = load_base(base)
    clf, mean, comps = load_judges()
    judge = SceneJudge(clf, make_identity_judge(mean, comps, concepts), concepts)
    loras = {n: load_lora(n, lora_dir) for n in (names or concepts)}
    return World(model, concepts, loras, judge, steps, sampler)


# ------------------------------------------------------------------------------------------ CLoRA
class CloraMethod(Method):
    """CLoRA (`lib_loraclr.clora`) composing the single LoRAs at sampling time, no merge.

    Per request (slot words, e.g. ``["sks", "7"]``): branch 0 = the prompt with every concept replaced by
    the digit it draws (`Concept.digit`: the held-out class, or the identity's digit) and no LoRA
    ("a 2 and a 7"); branch k = the prompt with the k-th concept slot's trigger back in place ("a sks and a
    7") and that concept's LoRA (UNet and text encoder) — `build_clora_denoiser`'s ``mode="replace"``.

    - multi-concept requests: one branch per concept; latent update + masked fusion;
    - single-concept and compose requests: ONE concept branch + base; the contrastive loss needs ≥ 2
      concepts, so these run masks-only (concept mask from the trigger's attention; the rest of the
      image from the base branch);
    - requests without a concept: plain sampling (`Method.generate`: the very images of ``base``).

    Batching: requests with the same pattern (which concept in which slot; plain digits may differ per
    image) share token groups and branch → LoRA routing, so they run as ONE batch (per-image prompts);
    image j of a pattern group uses noise seed ``seed + first index + j``, as in `Method.generate`.
    Token groups are built here per slot (by occurrence), so repeated digits work ("a mth and a yte" →
    base "a 1 and a 1"; `branch_prompts` binds words to their first occurrence only).
    """

    name = "clora"

    def __init__(
        self,
        schedule: str = "recommended",
        name: str | None = None,
        capture_layers: Sequence[str] | None = None,
        mode: str = "fusion",
        layout: bool = False,
        **option_overrides,
    ) -> None:
        """``schedule``: `CloraOptions.recommended` or ``.paper`` at the world's steps, with
        ``option_overrides``; ``capture_layers``: ``attn2`` names in the UNet (None: the default
        `localizing_layers`; ``["lowest"]``: round 2's lowest-resolution layers); ``mode``: ``"fusion"``
        (one branch per concept, masked fusion) or ``"routed"`` (`RegionalDenoiser`: one UNet pass with
        per-region LoRAs once the layout is known); ``layout``: use what a user would type for the scene
        (equal columns, one per slot, each concept bound to its slot's column) instead of the automatic
        masks."""
        if schedule not in ("recommended", "paper"):
            raise ValueError(f"schedule must be 'recommended' or 'paper', got {schedule!r}")
        if mode not in ("fusion", "routed"):
            raise ValueError(f"mode must be 'fusion' or 'routed', got {mode!r}")
        self.mode, self.layout = mode, layout
        self.region_prompts = bool(option_overrides.pop("region_prompts", False))
        self.schedule = schedule
        self.option_overrides = option_overrides
        self.capture_layers = list(capture_layers) if capture_layers is not None else None
        self.name = name or ("clora" if schedule == "recommended" else f"clora_{schedule}")
        self.last_denoiser = None  # diagnostics/tests: the `CloraDenoiser` of the last batch
        self.last_branches: list[list[tuple[object, float]]] = []
        self.last_prompts: list[list[str]] = []

    def setup(self, world, names):
        from lib_loraclr.clora import CloraOptions
        from lib_loraclr.models.sampling import CFGDenoiser

        super().setup(world, names)
        make = CloraOptions.recommended if self.schedule == "recommended" else CloraOptions.paper
        self.options = make(world.steps, **self.option_overrides)
        self.inner = CFGDenoiser(world.model).inner_model
        if self.capture_layers == ["lowest"]:
            from lib_loraclr.clora import lowest_resolution_layers

            self.capture_layers = lowest_resolution_layers(world.model.model.diffusion_model)

    @staticmethod
    def _slot_positions(world: World, prompt: str, words: Sequence[str], slot: int) -> list[int]:
        """Token positions of slot ``slot``'s word in ``prompt`` (its occurrence among equal words)."""
        tp = world.model.prompt_encoder.token_positions
        w = words[slot]
        n_tok = max(1, len(tp(w, w)))
        found = tp(prompt, w)
        occ = sum(1 for v in words[:slot] if v == w)
        return found[occ * n_tok : (occ + 1) * n_tok]

    def branch_layout(self, world: World, words: Sequence[str]):
        """``(branch_words, groups, mask_tokens)`` of one request: ``branch_words[b]`` = slot words of
        branch b's prompt; ``groups[g][b]`` / ``mask_tokens[b]`` as in `lib_loraclr.clora.branch_prompts`."""
        slots = [j for j, w in enumerate(words) if w in world.concepts]
        base = [str(world.concepts[w].digit) if w in world.concepts else w for w in words]
        branch_words = [base]
        for j in slots:
            bw = list(base)
            bw[j] = words[j]
            branch_words.append(bw)
        prompts = [wdata.canonical_prompt(bw) for bw in branch_words]
        groups = [
            [self._slot_positions(world, p, bw, j) for p, bw in zip(prompts, branch_words)] for j in slots
        ]
        mask_tokens = [[]] + [list(groups[g][g + 1]) for g in range(len(slots))]
        self.last_background = [
            t
            for j in range(len(words))
            if j not in slots
            for t in self._slot_positions(world, prompts[0], base, j)
        ]
        return branch_words, groups, mask_tokens

    def denoiser(self, world: World, requests: Sequence[Request]):
        """A `CloraDenoiser` for a batch of requests with one pattern (one row per request)."""
        from lib_loraclr.clora import CloraDenoiser, RoutedLoras, te_branch_conds, te_key
        from lib_loraclr.clora.routing import UNET_PREFIX

        layouts = [self.branch_layout(world, r) for r in requests]
        _, groups, mask_tokens = layouts[0]
        if any(lay[1] != groups for lay in layouts):
            raise ValueError("requests of one CLoRA batch must share their token groups")
        concepts = [w for w in requests[0] if w in world.concepts]
        branches = [[]] + [[(world.loras[c], 1.0)] for c in concepts]
        prompts = [[wdata.canonical_prompt(lay[0][b]) for lay in layouts] for b in range(len(branches))]
        model = world.model
        router = RoutedLoras(model.model.diffusion_model, branches, prefix=UNET_PREFIX)
        te_router = RoutedLoras(model, branches, key_filter=te_key)
        if te_router.n_modules == 0:
            te_router = None
        conds = te_branch_conds(model.get_learned_conditioning, prompts, te_router)
        if self.region_prompts:
            # routed: region k attends to its own short prompt ("a sks"), as a regional-prompting user types
            slots = [j for j, w in enumerate(requests[0]) if w in world.concepts]
            region = [[wdata.canonical_prompt(r) for r in requests]] + [
                [wdata.canonical_prompt([r[j]]) for r in requests] for j in slots
            ]
            region_conds = te_branch_conds(model.get_learned_conditioning, region, te_router)
        negatives = [[""] * len(requests)] * len(branches)
        unconds = te_branch_conds(model.get_learned_conditioning, negatives, te_router)
        unet = model.model.diffusion_model
        layout = user_layout(world, requests[0]) if self.layout else None
        den = CloraDenoiser(
            self.inner,
            unet,
            conds,
            groups,
            mask_tokens,
            self.options,
            unconds=unconds,
            router=router,
            capture_layers=self.capture_layers,
            layout=layout if self.mode == "fusion" else None,
            background_tokens=self.last_background,
        )
        if self.mode == "routed":
            from lib_loraclr.clora.regional import RegionalDenoiser

            den = RegionalDenoiser(
                self.inner,
                unet,
                region_conds if self.region_prompts else conds,
                unconds,
                router,
                layout=layout,
                estimator=den if layout is None else None,
                crops=self.options.region_crops,
                options=self.options,
            )
        self.last_denoiser, self.last_branches, self.last_prompts = den, branches, prompts
        return den

    def generate(self, world, requests, cfg, seed):
        width = len(requests[0])
        out = torch.zeros(len(requests), 1, 8, 8 * width)
        plain = [i for i, r in enumerate(requests) if not any(w in world.concepts for w in r)]
        if plain:
            out[plain] = super().generate(world, [requests[i] for i in plain], cfg, seed)
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, r in enumerate(requests):
            if i not in plain:
                groups.setdefault(tuple(w if w in world.concepts else "#" for w in r), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), world.batch):
                chunk = idx[s : s + world.batch]
                rs = [requests[i] for i in chunk]
                den = self.denoiser(world, rs)
                prompts = [wdata.canonical_prompt(r) for r in rs]  # unused by the denoiser (own conds)
                out[chunk] = world.sample(prompts, width, cfg, seed + chunk[0], denoiser=den)
        return out


def user_layout(world: World, words: Sequence[str]) -> torch.Tensor:
    """What a user types for a scene: equal columns (``"1,1"`` for two slots), each concept bound to the
    column it should stand in. ``[1, K, 8, 8·width]``."""
    from lib_loraclr.clora.layout import box_masks, columns, layout_weights, parse_ratio_layout

    regions = box_masks(parse_ratio_layout(columns(len(words))), (8, 8 * len(words)))
    slots = [j for j, w in enumerate(words) if w in world.concepts]
    return layout_weights(regions, len(slots), assign=slots)


class MergedLayoutMethod(MergeMethod):
    """A merged LoRA (patched) with region prompts (`RegionalDenoiser` without LoRAs: Mix-of-Show's
    regionally controllable sampling): each concept's column attends to its own prompt, the rest to the
    whole scene's prompt.

    ``region_prompts``: ``"short"`` (default) = the concept alone ("a ohwx"), so a region sees only its own
    trigger word; ``"branch"`` = the scene with only that concept's trigger and the other concepts replaced
    by their digits ("a 2 and a ohwx", CLoRA's branch prompts; the merged LoRA then draws the other concept
    from the digit word: docs/DESIGN.md "Two concepts with a layout"). ``crops``: `RegionalDenoiser` crops."""

    def __init__(self, *args, region_prompts: str = "short", crops: float = 0.0, **kw) -> None:
        super().__init__(*args, **kw)
        if region_prompts not in ("short", "branch"):
            raise ValueError(f"region_prompts must be 'short' or 'branch', got {region_prompts!r}")
        self.region_prompts, self.crops = region_prompts, float(crops)

    def generate(self, world, requests, cfg, seed):
        from lib_loraclr.apply import patched
        from lib_loraclr.clora.regional import RegionalDenoiser
        from lib_loraclr.models.sampling import CFGDenoiser

        width = len(requests[0])
        out = torch.zeros(len(requests), 1, 8, 8 * width)
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(tuple(w if w in world.concepts else "#" for w in r), []).append(i)
        helper = CloraMethod()
        model = world.model
        inner = CFGDenoiser(model).inner_model
        with patched(model, self.deltas):
            for key, idx in groups.items():
                if not any(w in world.concepts for w in key):
                    out[idx] = world.sample(
                        [wdata.canonical_prompt(requests[i]) for i in idx], width, cfg, seed + idx[0]
                    )
                    continue
                for s in range(0, len(idx), world.batch):
                    chunk = idx[s : s + world.batch]
                    rs = [requests[i] for i in chunk]
                    # branch 0 = the whole scene (global prompt), branch k = region k's prompt
                    prompts = [[wdata.canonical_prompt(r) for r in rs]]
                    if self.region_prompts == "short":
                        slots = [j for j, w in enumerate(rs[0]) if w in world.concepts]
                        prompts += [[wdata.canonical_prompt([r[j]]) for r in rs] for j in slots]
                    else:
                        lays = [helper.branch_layout(world, r)[0] for r in rs]
                        prompts += [
                            [wdata.canonical_prompt(lay[b]) for lay in lays] for b in range(1, len(lays[0]))
                        ]
                    with torch.no_grad():
                        conds = [model.get_learned_conditioning(p) for p in prompts]
                        unconds = [model.get_learned_conditioning([""] * len(rs))] * len(prompts)
                    lay = user_layout(world, rs[0])
                    den = RegionalDenoiser(
                        inner, model.model.diffusion_model, conds, unconds, layout=lay, crops=self.crops
                    )
                    out[chunk] = world.sample(prompts[0], width, cfg, seed + chunk[0], denoiser=den)
        return out


class MergedRoutedMethod(MergeMethod):
    """A merged LoRA as the WebUI uses it with a layout: bound once per concept with that concept's trigger
    (``<clora:merged:trigger=sks>`` rows), routed mode, each concept's region reading its own short prompt
    (`CloraMethod` ``routed_layout`` with the merged LoRA as every concept's LoRA). Unlike
    `MergedLayoutMethod` (the LoRA patched everywhere), the LoRA acts only inside the concept regions and
    CFG's unconditional half follows `CloraOptions.base_uncond` (the base model's by default)."""

    def __init__(self, *args, clora: dict | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        self.clora = {"mode": "routed", "layout": True, "region_prompts": True, **(clora or {})}

    def setup(self, world, names):
        super().setup(world, names)
        self.inner_method = CloraMethod("recommended", self.name, **self.clora)
        self.inner_method.setup(world, names)

    def context(self, world, concepts_in_request):
        return nullcontext()

    def generate(self, world, requests, cfg, seed):
        from dataclasses import replace

        merged = replace(world, loras={**world.loras, **{n: self.deltas for n in self.names}})
        return self.inner_method.generate(merged, requests, cfg, seed)


register_method("clora", lambda: CloraMethod("recommended"))
register_method("clora_layout", lambda: CloraMethod("recommended", "clora_layout", layout=True))
register_method("routed", lambda: CloraMethod("recommended", "routed", mode="routed", region_prompts=True))
register_method(
    "routed_layout",
    lambda: CloraMethod("recommended", "routed_layout", mode="routed", layout=True, region_prompts=True),
)
# the WebUI's routed mode with region_prompt=scene (before 2026-12-06 its only form): each region reads the
# whole scene with its concept's trigger (CLoRA's branch prompt) instead of the concept's own phrase
register_method(
    "routed_layout_scene",
    lambda: CloraMethod("recommended", "routed_layout_scene", mode="routed", layout=True),
)
register_method("routed_scene", lambda: CloraMethod("recommended", "routed_scene", mode="routed"))
# routed passes with each concept region also denoised as its own cropped canvas (RegionalDenoiser crops)
register_method(
    "routed_crops",
    lambda: CloraMethod(
        "recommended", "routed_crops", mode="routed", region_prompts=True, region_crops=CROPS
    ),
)
register_method(
    "routed_layout_crops",
    lambda: CloraMethod(
        "recommended",
        "routed_layout_crops",
        mode="routed",
        layout=True,
        region_prompts=True,
        region_crops=CROPS,
    ),
)
# before 2026-12-07: every concept region's unconditional half with its own LoRA on (the paper's CFG);
# now the base model's (`CloraOptions.base_uncond` = 1)
for _name, _kw in {
    "clora": {},
    "clora_layout": {"layout": True},
    "routed": {"mode": "routed", "region_prompts": True},
    "routed_layout": {"mode": "routed", "layout": True, "region_prompts": True},
}.items():
    register_method(
        f"{_name}_own_uncond",
        lambda _name=_name, _kw=_kw: CloraMethod(
            "recommended", f"{_name}_own_uncond", base_uncond=0.0, **_kw
        ),
    )
register_method(
    "loraclr_routed_layout", lambda: MergedRoutedMethod("loraclr", "recommended", "loraclr_routed_layout")
)
register_method(
    "loraclr_routed_layout_own_uncond",
    lambda: MergedRoutedMethod(
        "loraclr", "recommended", "loraclr_routed_layout_own_uncond", clora={"base_uncond": 0.0}
    ),
)
register_method("loraclr_layout", lambda: MergedLayoutMethod("loraclr", "recommended", "loraclr_layout"))
# before 2026-12-06: region k attended to the branch prompt ("a 2 and a ohwx"), which names the other concept's digit
register_method(
    "loraclr_layout_branch",
    lambda: MergedLayoutMethod("loraclr", "recommended", "loraclr_layout_branch", region_prompts="branch"),
)
register_method(
    "loraclr_layout_crops",
    lambda: MergedLayoutMethod("loraclr", "recommended", "loraclr_layout_crops", crops=CROPS),
)
# the same with the output-level refinement on (MergeConfig.distill_steps; off by default on CPU)
register_method(
    "loraclr_distill_layout",
    lambda: MergedLayoutMethod(
        "loraclr", "recommended", "loraclr_distill_layout", overrides={"distill_steps": DISTILL_STEPS}
    ),
)
register_method(
    "loraclr_distill25_layout",
    lambda: MergedLayoutMethod(
        "loraclr", "recommended", "loraclr_distill25_layout", overrides={"distill_steps": 25}
    ),
)
register_method(
    "loraclr_gpu_layout",
    lambda: MergedLayoutMethod("loraclr", "recommended", "loraclr_gpu_layout", as_on_gpu=True),
)
register_method("clora_paper", lambda: CloraMethod("paper", capture_layers=["lowest"]))
# the recommended schedule with the masks of round 2: paper rule on the lowest-resolution layers
register_method(
    "clora_paper_masks",
    lambda: CloraMethod("recommended", "clora_paper_masks", capture_layers=["lowest"], mask_rule="paper"),
)


def _fmt(x) -> str:
    return "   —  " if x is None else f"{100 * x:5.1f}%"


def summarize(rows: list[dict]) -> str:
    """Table: one line per (method, N, CFG), mean over seeds and (± half the spread) when 2+ seeds."""
    keys = ("fidelity", "fidelity_ratio", "multi", "compose", "leakage", "base")
    lines = [f"{'method':18s} {'N':>2s} {'cfg':>4s} " + " ".join(f"{k:>14s}" for k in keys)]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["n"], r["cfg"]), []).append(r)
    for (m, n, cfg), rs in groups.items():
        cols = []
        for k in keys:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if not vals:
                cols.append(f"{'—':>14s}")
                continue
            mean = statistics.fmean(vals)
            spread = (max(vals) - min(vals)) / 2
            cols.append(
                f"{100 * mean:6.1f}±{100 * spread:4.1f}%  " if len(vals) > 1 else f"{100 * mean:12.1f}% "
            )
        lines.append(f"{m:18s} {n:2d} {cfg:4.1f} " + " ".join(cols))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    t_start = time.time()
    all_names = list(load_concepts())
    names = args.concepts.split(",") if args.concepts else all_names
    unknown = [n for n in names if n not in all_names]
    if unknown:
        raise SystemExit(f"unknown concepts: {unknown}; known: {all_names}")
    ns = [int(v) for v in args.n.split(",")]
    if max(ns) > len(names):
        raise SystemExit(f"N={max(ns)} but only {len(names)} concepts were chosen")
    world = load_world(args.base, args.lora_dir, names, args.steps, args.sampler)
    world.batch = args.batch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = [float(v) for v in args.cfg.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    rows: list[dict] = []
    merge_reports: dict = {}
    single_fid: dict[tuple[float, int], dict[str, float]] = {}
    for n in ns:
        if args.subset_seed is None:
            subset = names[:n]
        else:
            subset = sorted(random.Random(args.subset_seed + n).sample(names, n), key=names.index)
        cells = make_cells(subset, args.samples, args.prompt_seed)
        order = ["single"] + [m for m in methods if m != "single"]  # single first: fidelity ratios
        for mname in order:
            method = METHODS[mname]()
            t0 = time.time()
            method.setup(world, subset)
            setup_s = time.time() - t0
            if isinstance(method, MergeMethod):
                merge_reports[f"{mname}/N{n}"] = {
                    "seconds": method.seconds,
                    "summary": method.report.get("summary"),
                }
            for cfg in cfgs:
                for seed in seeds:
                    t1 = time.time()
                    res = evaluate(world, method, subset, cells, cfg, seed * 1_000_003)
                    imgs = res.pop("_images")
                    if mname == "single":
                        single_fid[(cfg, seed)] = res["fidelity_per_concept"]
                    own = single_fid.get((cfg, seed), {})
                    ratios = [res["fidelity_per_concept"][c] / own[c] for c in subset if own.get(c)]
                    res["fidelity_ratio"] = statistics.fmean(ratios) if ratios else None
                    row = {
                        "method": mname,
                        "n": n,
                        "cfg": cfg,
                        "seed": seed,
                        "concepts": subset,
                        "setup_seconds": setup_s,
                        "seconds": time.time() - t1,
                        **res,
                    }
                    if mname in methods:
                        rows.append(row)
                        if seed == seeds[0]:
                            save_grid(imgs, out / f"grid_{mname}_N{n}_cfg{cfg:g}.png")
                    print(
                        f"[{time.time() - t_start:6.0f}s] {mname} N={n} cfg={cfg:g} seed={seed}: "
                        f"fid {_fmt(res['fidelity'])} multi {_fmt(res['multi'])} compose {_fmt(res['compose'])} "
                        f"leak {_fmt(res['leakage'])} base {_fmt(res['base'])}",
                        flush=True,
                    )
                    if res.get("multi_slots"):  # where two-concept scenes fail: each word's own slot
                        print(
                            "         slots: "
                            + "; ".join(
                                f"{w} " + ", ".join(f"{k} {v}" for k, v in t.items())
                                for w, t in res["multi_slots"].items()
                            ),
                            flush=True,
                        )
    table = summarize(rows)
    print(table)
    result = {
        "args": vars(args),
        "table": table,
        "rows": rows,
        "merge_reports": merge_reports,
        "seconds": time.time() - t_start,
    }
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out / "results.json")
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", default="", help="comma-separated concept names (default: all, in order)")
    ap.add_argument("--n", default="2,4", help="numbers of merged concepts, e.g. 2,4,8,12")
    ap.add_argument(
        "--subset-seed", type=int, default=None, help="random concept subsets instead of the first N"
    )
    ap.add_argument("--methods", default="base,single,linear")
    ap.add_argument("--samples", type=int, default=96, help="images per cell")
    ap.add_argument("--seeds", default="0,1", help="sampling (noise) seeds")
    ap.add_argument("--prompt-seed", type=int, default=0)
    ap.add_argument("--cfg", default="1.5,3")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--base", default=str(BASE_FILE))
    ap.add_argument("--lora-dir", default=str(LORA_DIR))
    ap.add_argument("--out", default="out/quality")
    ap.add_argument(
        "--smoke", action="store_true", help="CI size: N=2, base,single,linear, 8 samples, 1 seed"
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.methods, args.samples, args.seeds, args.cfg, args.steps = (
            "2",
            "base,single,linear",
            8,
            "0",
            "3",
            12,
        )
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
