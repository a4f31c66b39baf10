"""The headless merge at SDXL size: wall time, CPU time and peak memory of the real CLI on a random-weight SDXL.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python bench/merge_sdxl.py [--concepts 2] [--steps 1] [--keep DIR]
[--max-rss-gib 14] [--load-only] [--device cuda]``

The SDXL sibling of ``bench/merge_sd15.py`` (same measurements, same stage split, its ``run_merge``):

1. writes a random-weight, full-size SDXL base checkpoint in the WebUI's (sgm) key layout, the module tree of
   `lib_loraclr.models.full_trees.full_sdxl_tree` built on the meta device: ``model.diffusion_model.*``
   (2.57 G parameters), ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L, 123 M) and
   ``conditioner.embedders.1.model.*`` (OpenCLIP bigG, 695 M, fused ``attn.in_proj_weight``), fp16 like the
   usual ``sd_xl_base_1.0_0.9vae.safetensors`` minus its VAE (the merge never reads it): 6.5 GiB, written
   tensor by tensor (one tensor in memory at a time). Weights N(0, 1/fan_in), norm scales 1 and biases 0,
   embeddings N(0, 0.02);
2. writes N kohya LoRAs (rank 8, alpha 8, fp16) on every UNet attention projection (``attn1``/``attn2``
   ``to_q/to_k/to_v/to_out.0`` of the 70 transformer blocks: 560 modules), every CLIP-L layer (``self_attn``
   q/k/v/out, ``mlp`` fc1/fc2: 72) and every bigG layer (``lora_te2_…_self_attn_{q,k,v,out}_proj``,
   ``mlp_fc1/fc2``: 192), ‖ΔW‖ = 0.3·‖W0‖ per module;
3. runs ``python -m lib_loraclr merge --base … --concept … --out … --method loraclr --preset recommended``
   and measures it as ``bench/merge_sd15.py`` does (wall, CPU = user + system, ``ru_maxrss``, stages), with a
   watchdog: the merge is killed when its RSS passes ``--max-rss-gib`` or the machine's MemAvailable falls
   under 2 GiB (a shared machine), and the table then says where it stopped;
4. checks that the merged file loads back (``python -m lib_loraclr inspect``).

``--load-only``: instead of the merge, `lib_loraclr.base_model.load_base` on the checkpoint in a fresh process,
then one prompt's conditioning and one UNet call on the merge's default 8×8 latent (time, peak RSS, the
resident weights by dtype).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import merge_sd15  # the SD1.5 bench: run_merge, the stage split, the table format

TE_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "c_fc", "c_proj")
_NORMS = ("norm", "ln_", "in_layers.0", "out_layers.0", "out.0")


def sdxl_shapes() -> dict[str, tuple[int, ...]]:
    """{checkpoint key: shape} of SDXL base's UNet and both text encoders (meta device, no memory)."""
    from lib_loraclr.models.full_trees import full_sdxl_tree

    return {k: tuple(v.shape) for k, v in full_sdxl_tree().state_dict().items()}


def random_tensor(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """The bench's weights: N(0, 1/fan_in) matrices, norm scales 1, biases 0, embeddings N(0, 0.02)."""
    if key.endswith("position_ids"):
        return torch.arange(shape[-1]).expand(shape).contiguous()
    if key.endswith("logit_scale"):
        return torch.full(shape, math.log(1 / 0.07))
    if "embedding" in key:
        return torch.randn(shape, generator=g) * 0.02
    if len(shape) <= 1:
        norm_scale = key.endswith(".weight") and any(s in key for s in _NORMS)
        return torch.ones(shape) if norm_scale else torch.zeros(shape)
    return torch.randn(shape, generator=g) / math.prod(shape[1:]) ** 0.5


def write_checkpoint_streaming(
    path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype: torch.dtype = torch.float16
) -> None:
    """A safetensors file written tensor by tensor (header first, then each tensor's bytes): peak memory is
    one tensor, not the 6.5 GiB model."""
    codes = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    order, offset = sorted(shapes), 0
    dtypes = {k: torch.int64 if k.endswith("position_ids") else dtype for k in order}
    for k in order:
        n = math.prod(shapes[k]) * torch.empty((), dtype=dtypes[k]).element_size()
        header[k] = {
            "dtype": codes[dtypes[k]],
            "shape": list(shapes[k]),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in order:
            t = random_tensor(k, shapes[k], g).to(dtypes[k]).contiguous()
            f.write(t.view(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def lora_keys(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Canonical keys: every UNet attention projection, every CLIP-L and bigG layer (q/k/v rows of bigG's
    fused ``in_proj_weight`` as ``…attn.in_proj:q|k|v``)."""
    keys = []
    for k in shapes:
        if k.endswith(".attn.in_proj_weight"):
            keys += [f"{k[: -len('_weight')]}:{p}" for p in "qkv"]
            continue
        if not k.endswith(".weight"):
            continue
        path = k[: -len(".weight")]
        if path.startswith("model.diffusion_model.") and ".attn" in path:
            if path.endswith(merge_sd15.UNET_LEAVES):
                keys.append(path)
        elif path.startswith("conditioner.embedders.") and path.rsplit(".", 1)[-1] in TE_LEAVES:
            keys.append(path)
    return keys


def module_shape(key: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    if ":" in key:
        rows, cols = shapes[key.split(":")[0] + "_weight"]
        return rows // 3, cols
    return shapes[key + ".weight"][:2]  # type: ignore[return-value]


def build_lora(path: Path, keys: list[str], shapes: dict, trigger: str, seed: int, rank: int = 8) -> None:
    """A kohya SDXL LoRA (``lora_unet_``, ``lora_te1_``, ``lora_te2_``) with ‖ΔW‖ ≈ 0.3·‖W0‖ per module."""
    from lib_loraclr.deltas import DeltaSet, LoraModule
    from lib_loraclr.writers import write_kohya_lora

    g = torch.Generator().manual_seed(seed)
    mods = {}
    for k in keys:
        d_out, d_in = module_shape(k, shapes)
        down = torch.randn(rank, d_in, generator=g) / d_in**0.5
        up = torch.randn(d_out, rank, generator=g)
        up *= 0.3 * d_out**0.5 / (up @ down).norm()  # E‖W0‖_F = √d_out for N(0, 1/d_in) entries
        mods[k] = LoraModule(key=k, down=down, up=up, alpha=float(rank))
    meta = {"loraclr_trigger": f'["{trigger}"]', "ss_output_name": path.stem}
    write_kohya_lora(DeltaSet(modules=mods, arch="sdxl", fmt="kohya"), path, arch="sdxl", metadata=meta)


def _mem_available_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


class Watchdog:
    """Kills the merge subprocess when its RSS passes ``max_kb`` or MemAvailable falls under 2 GiB."""

    def __init__(self, max_kb: int) -> None:
        self.max_kb, self.proc, self.reason = max_kb, None, ""
        self.stop = threading.Event()
        orig = subprocess.Popen
        dog = self

        class Popen(orig):  # type: ignore[misc, valid-type]
            def __init__(self, *a, **kw) -> None:
                super().__init__(*a, **kw)
                if "merge" in a[0]:
                    dog.proc = self

        merge_sd15.subprocess.Popen = Popen  # the bench module's only Popen is the merge
        threading.Thread(target=self.watch, daemon=True).start()

    def watch(self) -> None:
        while not self.stop.wait(0.5):
            p = self.proc
            if p is None or p.poll() is not None:
                continue
            rss, avail = merge_sd15._rss_kb(p.pid), _mem_available_kb()
            if rss > self.max_kb or avail < 2 * 2**20:
                self.reason = f"killed at RSS {rss / 2**20:.2f} GiB (MemAvailable {avail / 2**20:.2f} GiB)"
                print(f"  watchdog: {self.reason}", flush=True)
                p.kill()


def load_child(base: str) -> None:
    """In a fresh process: `load_base` on ``base``, then one prompt's conditioning and one UNet call (8×8
    latent, the merge's default canvas); prints the timings as JSON."""
    from lib_loraclr.base_model import load_base

    t0 = time.perf_counter()
    m = load_base(base)
    t1 = time.perf_counter()
    sizes: dict[str, float] = {}
    for v in m.state_dict().values():
        sizes[str(v.dtype)] = sizes.get(str(v.dtype), 0.0) + v.numel() * v.element_size() / 2**30
    with torch.no_grad():
        c = m.get_learned_conditioning(["photo of a sks dog"])
        t2 = time.perf_counter()
        eps = m.apply_model(torch.randn(1, *m.latent_shape), torch.tensor([500.0]), c)
        t3 = time.perf_counter()
    out = {"load_s": t1 - t0, "cond_s": t2 - t1, "unet_s": t3 - t2, "gib_by_dtype": sizes}
    print(json.dumps({**out, "eps_finite": bool(torch.isfinite(eps).all())}))


def measure_load(base: Path, env: dict[str, str]) -> dict:
    """`load_child` in a subprocess: its timings, wall time and peak RSS (``ru_maxrss``)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, __file__, "--load-child", str(base)], stdout=subprocess.PIPE, env=env, cwd=ROOT
    )
    assert p.stdout is not None
    text = p.stdout.read().decode()
    _, status, usage = os.wait4(p.pid, 0)
    r = json.loads(text.strip().splitlines()[-1]) if os.waitstatus_to_exitcode(status) == 0 else {}
    return {
        **r,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_gib": usage.ru_maxrss / 2**20,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, default=2, help="number of concept LoRAs (default 2)")
    ap.add_argument("--steps", type=int, default=1, help="sampling steps of the feature runs (default 1)")
    ap.add_argument("--method", default="loraclr")
    ap.add_argument(
        "--device", default="cpu", help="the merge's device (the CLI's --device: cpu, cuda, cuda:N, auto)"
    )
    ap.add_argument("--keep", default=None, help="build the files in this folder and keep them")
    ap.add_argument("--max-rss-gib", type=float, default=14.0, help="kill the merge above this RSS")
    ap.add_argument("--build-only", action="store_true", help="write the checkpoint and LoRAs, no merge")
    ap.add_argument(
        "--load-only", action="store_true", help="measure load_base + one UNet call instead of the merge"
    )
    ap.add_argument("--load-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_child:
        load_child(args.load_child)
        return 0
    n = args.concepts
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="merge_sdxl_"))
    work.mkdir(parents=True, exist_ok=True)
    env = merge_sd15.cli_env()
    try:
        base = work / "sdxl_random.safetensors"
        t = time.perf_counter()
        shapes = sdxl_shapes()
        if not base.exists():
            write_checkpoint_streaming(base, shapes)
        keys = lora_keys(shapes)
        groups = {
            g: sum(k.startswith(p) for k in keys)
            for g, p in (
                ("unet", "model."),
                ("te1", "conditioner.embedders.0."),
                ("te2", "conditioner.embedders.1."),
            )
        }
        for i in range(n):
            lp = work / f"concept{i}.safetensors"
            if not lp.exists():
                build_lora(lp, keys, shapes, merge_sd15.TRIGGERS[i], seed=100 + i)
        print(
            f"built {base.name} ({base.stat().st_size / 2**30:.2f} GiB, fp16) and {n} rank-8 LoRAs "
            f"({len(keys)} modules: {groups}) in {time.perf_counter() - t:.0f} s; "
            f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}",
            flush=True,
        )
        if args.build_only:
            return 0
        if args.load_only:
            r = measure_load(base, env)
            print(
                f"load_base: {r.get('load_s', float('nan')):.1f} s, conditioning of one prompt "
                f"{r.get('cond_s', float('nan')):.1f} s, one UNet call {r.get('unet_s', float('nan')):.1f} s "
                f"(finite: {r.get('eps_finite')}); process wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, "
                f"peak RSS {r['peak_rss_gib']:.2f} GiB; resident weights "
                + ", ".join(f"{k} {v:.2f} GiB" for k, v in r.get("gib_by_dtype", {}).items())
            )
            return 0
        out = work / f"merged_{n}.safetensors"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "lib_loraclr", "merge", "--base", str(base)]
        for i in range(n):
            cmd += ["--concept", str(work / f"concept{i}.safetensors"), merge_sd15.TRIGGERS[i]]
        cmd += ["--out", str(out), "--method", args.method, "--preset", "recommended"]
        # the device as given and no refinement (the CLI's defaults, "auto" and 100 steps on a GPU, would
        # make this a different measurement on every machine)
        cmd += ["--steps", str(args.steps), "--device", args.device, "--distill-steps", "0"]
        print("$ " + " ".join(c if " " not in c else f'"{c}"' for c in cmd[1:]), flush=True)
        dog = Watchdog(int(args.max_rss_gib * 2**20))
        r = merge_sd15.run_merge(cmd, env)
        dog.stop.set()
        s = r["stage_s"]
        stages = ", ".join(f"{k} {merge_sd15._fmt_s(v)}" for k, v in s.items() if k != "end")
        peaks = ", ".join(f"{k} {v / 2**20:.2f} G" for k, v in r["stage_rss_kb"].items())
        print(
            f"\nSDXL random weights, N = {n}, rank-8 LoRAs ({len(keys)} modules), {args.method} recommended, "
            f"steps {args.steps}, device {args.device}: exit {r['rc']}{' (' + dog.reason + ')' if dog.reason else ''}\n"
            f"wall {merge_sd15._fmt_s(r['wall_s'])}, CPU {merge_sd15._fmt_s(r['cpu_s'])}, "
            f"peak RSS {r['peak_rss_kb'] / 2**20:.2f} GiB\nstages: {stages}\nhighest polled RSS per stage: {peaks}"
        )
        if r["rc"] != 0:
            print("\n".join(r["stderr_tail"][-8:] + r["stdout"]))
            return 1
        print("\n".join(r["stdout"]))
        ins = subprocess.run(
            [sys.executable, "-m", "lib_loraclr", "inspect", str(out)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        print(
            f"inspect {out.name} ({out.stat().st_size / 2**20:.1f} MB): exit {ins.returncode}; "
            + " | ".join(ins.stdout.splitlines()[:4])
        )
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
