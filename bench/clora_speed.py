"""CLoRA speed and memory: plain sampling vs CLoRA (ours) vs the faithful official per-branch loop.

Side by side in one run, as ratios to plain sampling, one line per case:

    python bench/clora_speed.py                       # mini15 (SD1 layout, SD1.5 channel ratios), CPU, 50 steps
    python bench/clora_speed.py --quick               # 20 steps (schedules scaled), 2 and 3 LoRAs
    python bench/clora_speed.py --device cuda --sd15  # SD1.5-size UNet (320 ch, context 768), 512² (64×64)

Model (``--model``): ``mini15`` (default) = the SD1 module layout (16 ``attn2``, capture at input 7, 8 and
output 3, 4, 5) with SD1.5's channel ratios (32·[1, 2, 4, 4]) and 16-channel heads, 16×16 latents;
``tiny`` = the default tiny test model (8 heads of 4 channels, which makes CPU attention kernels
unrepresentatively slow); ``--sd15`` = SD1.5's UNet size (320 channels, context 768, 8 heads), random
weights, 64×64 latents (512²), meant for ``--device cuda`` (fp16 autocast).

Cases (K = LoRAs + 1 branches, CFG on, DDIM run as Euler in σ-space, one image, random rank-4 LoRAs on
attn1 q/k and attn2 q/k/v/out):
- ``plain``: the WebUI-style batched CFG denoiser;
- ``masks``: CLoRA fusion only (no latent update) — the cost of K branches;
- ``paper``: ours at the paper schedule (update until step 25 of 50, 20 extra iterations at steps 0, 10,
  20, s = 20) with the official loss (maps of both CFG halves);
- ``paper_cond``: the same schedule, loss on the cond half's maps only (our default; half the rows in
  the gradient pass);
- ``official``: the faithful per-branch loop (`lib_loraclr.clora.official`) at the same schedule;
- ``recommended``: ours at `CloraOptions.recommended` (branch fusion with layout masks, no latent update);
- ``routed``: `RegionalDenoiser` with the automatic layout: branch fusion until the layout is frozen (the
  first 15 % of the steps), then ONE UNet pass per step with per-region LoRAs;
- ``routed_layout``: `RegionalDenoiser` with a user layout (equal columns): one UNet pass from step 0;
- ``routed_layout_crops``: the same with region crops 0.5 (one more UNet call a step on the regions' crops).

Loss reduction (same measure for every method): the latents each run hands its sampler (after its
updates) are recorded at every step of the paper's update window; afterwards (not timed) the official
loss (NT-Xent on maps averaged over both CFG halves, masks-only forward) is evaluated at each of them;
reduction = 1 − mean(loss of the method) / mean(loss of the ``masks`` run, which never updates). It is
printed for the official loss and for the loss on the cond half's maps only (what ``maps_from="cond"``
optimises).

Memory: CPU — every case runs in a fresh subprocess; peak = VmHWM (peak resident set, reset through
/proc/self/clear_refs) minus the resident set just before the timed run (model, LoRAs and a warm-up
step already loaded). CUDA — ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, in
process. Time: CUDA — wall time (synchronised). CPU — one thread (``torch.set_num_threads(1)``) and the
process CPU time, which approximates the wall time of the run alone and, unlike wall time, is not inflated when
other jobs share the cores.
The SDPA attention (the WebUI's ``--opt-sdp-attention``) is used for plain/masks/ours; the official
loop overrides every attention layer with an explicit softmax, as its attention processor does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

PROMPT = "a cat and a dog and a bird and a fish"
CONCEPT_WORDS = [("sks", "cat"), ("ohwx", "dog"), ("<d8>", "bird"), ("<p4>", "fish")]


@dataclass
class Config:
    steps: int
    loras: list[int]
    latent: int
    device: str
    model: str
    cfg: float
    seed: int
    official: bool
    rec_until: int | None
    rec_iters: int | None
    repeat: int = 3
    kinds: tuple[str, ...] = ("masks", "paper", "paper_cond", "recommended", "routed", "routed_layout")


def _parse() -> tuple[Config, str | None]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50, help="sampling steps (schedules scale with it)")
    ap.add_argument("--loras", default="2,3,4", help="LoRA counts, comma separated")
    ap.add_argument("--latent", type=int, default=0, help="latent size (default: 16 tiny, 64 sd15)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--model",
        choices=["tiny", "tiny16", "mini15"],
        default="mini15",
        help="tiny: the default tiny SD1-layout model (8 heads of 4 channels); tiny16: the same with "
        "16-channel heads; mini15: SD1 layout with SD1.5's channel ratios (1,2,4,4), 16-channel heads",
    )
    ap.add_argument(
        "--sd15", action="store_true", help="SD1.5-size UNet (320 ch, context 768), random weights"
    )
    ap.add_argument("--quick", action="store_true", help="20 steps, 2 and 3 LoRAs")
    ap.add_argument("--no-official", action="store_true", help="skip the official loop")
    ap.add_argument(
        "--kinds",
        default="masks,paper,paper_cond,recommended,routed,routed_layout",
        help="cases besides plain (and official), comma separated",
    )
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rec-until", type=int, default=None, help="override the recommended update window")
    ap.add_argument(
        "--rec-iters", type=int, default=None, help="override the recommended refinement iterations"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of the short cases (plain, masks, recommended); the minimum time is reported",
    )
    ap.add_argument("--run-case", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    steps, loras = a.steps, [int(v) for v in a.loras.split(",")]
    if a.quick:
        steps, loras = 20, [n for n in loras if n <= 3] or [2]
    model = "sd15" if a.sd15 else a.model
    latent = a.latent or (64 if model == "sd15" else 16)
    cfg = Config(
        steps,
        loras,
        latent,
        a.device,
        model,
        a.cfg,
        a.seed,
        not a.no_official,
        a.rec_until,
        a.rec_iters,
        a.repeat,
        tuple(k for k in a.kinds.split(",") if k),
    )
    return cfg, a.run_case


# ---------------------------------------------------------------------------------------------- setup
def build(cfg: Config) -> Any:
    from lib_loraclr.models.sd import SD1Config, TextConfig, UNetConfig, build_tiny_sd1

    if cfg.model == "sd15":
        conf = SD1Config(
            unet=UNetConfig(model_channels=320, channel_mult=[1, 2, 4, 4], num_heads=8, context_dim=768),
            text=TextConfig(hidden_size=768, layers=2, heads=12, intermediate=3072),
        )
    elif cfg.model == "mini15":
        conf = SD1Config(unet=UNetConfig(channel_mult=[1, 2, 4, 4], num_head_channels=16))
    elif cfg.model == "tiny16":
        conf = SD1Config(unet=UNetConfig(num_head_channels=16))
    else:
        conf = SD1Config()
    return build_tiny_sd1(seed=cfg.seed, config=conf).to(cfg.device)


OWN_UNCOND = "_own_uncond"  # a kind with this suffix: the same with each branch's own uncond (base_uncond 0)


def options(kind: str, cfg: Config) -> Any:
    from dataclasses import replace

    from lib_loraclr.clora import CloraOptions

    if kind.endswith(OWN_UNCOND):
        return replace(options(kind[: -len(OWN_UNCOND)], cfg), base_uncond=0.0)
    if kind == "masks":
        return CloraOptions(latent_update=False, maps_from="both", mask_rule="paper")
    if kind in ("routed", "routed_layout", "routed_layout_crops"):
        return CloraOptions.recommended(cfg.steps)
    if kind in ("paper", "official"):
        return CloraOptions.paper(cfg.steps)
    if kind == "paper_cond":
        return CloraOptions.paper(cfg.steps, maps_from="cond")
    kw: dict[str, Any] = {}
    if cfg.rec_until is not None:
        kw["update_until"] = cfg.rec_until
    if cfg.rec_iters is not None:
        kw["refinement_iters"] = cfg.rec_iters
    return CloraOptions.recommended(cfg.steps, **kw)


def make_denoiser(kind: str, n_loras: int, model: Any, cfg: Config) -> Any:
    from lib_loraclr.clora import UNET_PREFIX, CloraDenoiser, Concept, RoutedLoras, branch_prompts
    from lib_loraclr.clora.official import OfficialCloraLoop
    from lib_loraclr.clora.synthetic import random_lora
    from lib_loraclr.models.sampling import CFGDenoiser

    unet = model.model.diffusion_model
    concepts = [Concept(t, w) for t, w in CONCEPT_WORDS[:n_loras]]
    bp = branch_prompts(PROMPT, concepts, model.prompt_encoder.token_positions)
    loras = [random_lora(unet, 100 + i, rank=4, relative=0.5, prefix=UNET_PREFIX) for i in range(n_loras)]
    for ds in loras:
        for m in ds:
            m.down, m.up = m.down.to(cfg.device), m.up.to(cfg.device)
    router = RoutedLoras(unet, [[]] + [[(ds, 1.0)] for ds in loras], prefix=UNET_PREFIX)
    with torch.no_grad():
        conds = [model.get_learned_conditioning([p]) for p in bp.prompts]
        unconds = [model.get_learned_conditioning([""])] * len(conds)
    inner = CFGDenoiser(model).inner_model
    opts = options(kind, cfg)
    kind = kind.removesuffix(OWN_UNCOND)
    if kind == "official":
        return OfficialCloraLoop(inner, unet, conds, unconds, bp.groups, bp.mask_tokens, opts, router=router)
    den = CloraDenoiser(inner, unet, conds, bp.groups, bp.mask_tokens, opts, unconds=unconds, router=router)
    if kind in ("routed", "routed_layout", "routed_layout_crops"):
        from lib_loraclr.clora.layout import box_masks, columns, layout_weights, parse_ratio_layout
        from lib_loraclr.clora.regional import RegionalDenoiser

        layout = None
        if kind != "routed":
            layout = layout_weights(
                box_masks(parse_ratio_layout(columns(n_loras)), (cfg.latent, cfg.latent)), n_loras
            )
        return RegionalDenoiser(
            inner,
            unet,
            conds,
            unconds,
            router,
            layout=layout,
            estimator=den if layout is None else None,
            crops=0.5 if kind == "routed_layout_crops" else 0.0,
            options=opts,
        )
    return den


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_case(cfg: Config, case: str, model: Any = None) -> dict[str, Any]:
    """case = "plain" or "<kind>:<n_loras>" → seconds, peak MB, losses at the recorded latents."""
    from lib_loraclr.clora import efficient_attention
    from lib_loraclr.models.sampling import sample

    if cfg.device == "cpu":
        torch.set_num_threads(1)
    if model is None:
        model = build(cfg)
    unet = model.model.diffusion_model
    shape = (4, cfg.latent, cfg.latent)
    kind, n = ([*case.split(":"), "0"])[:2]
    den = make_denoiser(kind, int(n), model, cfg) if kind != "plain" else None
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    window = options("paper", cfg).update_until

    def record(d: dict[str, Any]) -> None:
        if d["i"] < window:
            recorded.append((d["x"].detach().clone(), d["sigma"].detach().clone().reshape(1)))

    amp = (
        torch.autocast("cuda", dtype=torch.float16)
        if cfg.device == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    with efficient_attention(unet), amp:
        sample(
            model, [PROMPT], steps=2, cfg_scale=cfg.cfg, sampler="ddim", seed=cfg.seed, shape=shape
        )  # warm-up
        if cfg.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_kb("VmRSS") * 1024
            _reset_peak_rss()
        clock = time.perf_counter if cfg.device == "cuda" else time.process_time
        wall = float("inf")
        for _ in range(
            1 if kind in ("paper", "paper_cond", "official") else cfg.repeat
        ):  # short cases: min of N
            recorded.clear()
            t0 = clock()
            sample(
                model,
                [PROMPT],
                steps=cfg.steps,
                cfg_scale=cfg.cfg,
                sampler="ddim",
                seed=cfg.seed,
                shape=shape,
                denoiser=den,
                callback=record if den is not None else None,
            )
            if cfg.device == "cuda":
                torch.cuda.synchronize()
            wall = min(wall, clock() - t0)
        peak = (torch.cuda.max_memory_allocated() if cfg.device == "cuda" else _rss_kb("VmHWM") * 1024) - base
        losses: list[float] = []
        losses_cond: list[float] = []
        if den is not None:
            ev = make_denoiser("masks", int(n), model, cfg)
            with torch.no_grad():
                for x, sigma in recorded:
                    ev.reset()
                    ev(x.clone(), sigma, cond_scale=cfg.cfg)
                    losses.append(ev.step_log[0]["loss_both"])
                    losses_cond.append(ev.step_log[0]["loss_cond"])
    n_updates = len(getattr(den, "history", []))
    return {
        "case": case,
        "wall": wall,
        "peak_mb": peak / 2**20,
        "losses": losses,
        "losses_cond": losses_cond,
        "updates": n_updates,
    }


# ---------------------------------------------------------------------------------------------- driver
def _child(case: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, *sys.argv[1:], "--run-case", case],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")


def main() -> None:
    cfg, run = _parse()
    if run is not None:
        print(json.dumps(run_case(cfg, run)))
        return
    cases = ["plain"]
    for n in cfg.loras:
        cases += [f"{k}:{n}" for k in cfg.kinds]
        cases += [f"official:{n}"] if cfg.official else []
    dev = torch.cuda.get_device_name() if cfg.device == "cuda" else f"CPU, {os.cpu_count()} cores, 1 thread"
    print(
        f"# model {cfg.model}, latent {cfg.latent}x{cfg.latent}, {cfg.steps} steps DDIM(σ-space Euler), "
        f"CFG {cfg.cfg}, {dev}"
    )
    print(f"# paper: {options('paper', cfg)}")
    print(f"# recommended: {options('recommended', cfg)}")
    res: dict[str, dict[str, Any]] = {}
    model = build(cfg) if cfg.device != "cpu" else None  # CPU: a fresh process per case (peak RSS)
    for case in cases:
        res[case] = run_case(cfg, case, model) if model is not None else _child(case)
        r = res[case]
        print(
            f"#   {case}: {r['wall']:.2f} s, peak {r['peak_mb']:.1f} MB, {r['updates']} updates", flush=True
        )
    plain = res["plain"]["wall"]
    print(f"plain: {plain:.2f} s, peak {res['plain']['peak_mb']:.1f} MB")

    def mean(xs: list[float]) -> float:
        return sum(xs) / max(1, len(xs))

    for n in cfg.loras:
        ref = mean(res[f"masks:{n}"]["losses"]) if f"masks:{n}" in res else 0.0
        ref_c = mean(res[f"masks:{n}"]["losses_cond"]) if f"masks:{n}" in res else 0.0
        for kind in (
            "masks",
            "paper",
            "paper_cond",
            "recommended",
            "routed",
            "routed_layout",
            "routed_layout_crops",
            "official",
        ):
            r = res.get(f"{kind}:{n}")
            if r is None:
                continue
            red = 1 - mean(r["losses"]) / ref if ref > 0 else 0.0
            red_c = 1 - mean(r["losses_cond"]) / ref_c if ref_c > 0 else 0.0
            print(
                f"{n} LoRAs {kind}: ratio {r['wall'] / plain:.1f} (time {r['wall']:.1f} s, peak "
                f"{r['peak_mb']:.0f} MB, {r['updates']} updates, loss reduction {100 * red:.1f}% official loss, "
                f"{100 * red_c:.1f}% cond-maps loss)"
            )
        if f"official:{n}" in res and f"paper:{n}" in res and f"paper_cond:{n}" in res:
            o = res[f"official:{n}"]
            for kind in ("paper", "paper_cond"):
                p = res[f"{kind}:{n}"]
                mem = p["peak_mb"] / o["peak_mb"] if o["peak_mb"] > 0 else float("nan")
                print(
                    f"{n} LoRAs {kind} ours/official: time ratio {p['wall'] / o['wall']:.2f} "
                    f"({o['wall'] / p['wall']:.1f}x faster), memory ratio {mem:.2f}"
                )


if __name__ == "__main__":
    main()
