"""The headless merge at SD1.5 size: wall time and peak memory of the real CLI on a random-weight SD1.5.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python bench/merge_sd15.py [--concepts 2,4] [--steps 20] [--quick]``

What it does, in a temporary folder (deleted afterwards unless ``--keep DIR``):

1. writes a random-weight, full-size SD1.5 checkpoint with the A1111 (ldm) key names (``model.diffusion_model.*``,
   ``cond_stage_model.transformer.text_model.*``; UNet 860 M + CLIP-L 123 M parameters, fp16 like the usual
   ``v1-5-pruned-emaonly-fp16.safetensors``; no VAE: the merge never reads it). Weights N(0, 1/fan_in),
   norms 1/0, embeddings N(0, 0.02): finite activations through a sampling run;
2. writes N kohya LoRAs at rank 8 (alpha 8, fp16) on every attention layer of the UNet (``attn1`` / ``attn2``
   ``to_q`` ``to_k`` ``to_v`` ``to_out.0``: 16 transformer blocks × 8 = 128 modules) and every text-encoder
   layer (``self_attn`` ``q/k/v/out_proj``, ``mlp.fc1/fc2``: 12 × 6 = 72 modules), random factors with
   ‖ΔW‖ = 0.3·‖W0‖ per module (a visible effect), triggers "sks dog", "ohwx cat", "zwx car", "qtz vase";
3. runs ``python -m lib_loraclr merge --base … --concept … --out … --method loraclr --preset recommended``
   in a subprocess with the user's defaults (sampling steps 20 unless ``--steps``; rank: the CLI's default
   cap; fp16 output; the feature runs on the model's default latent, which for a plain SD1
   checkpoint is 16×16 = 128×128 px, not 512²: ``MergeConfig.shape`` is not a CLI option) and measures
   - wall time of the subprocess, and its CPU time (user + system; on a shared machine CPU ÷ wall shows the
     share of the cores the merge actually got),
   - peak RSS of the subprocess in GiB (``ru_maxrss`` from ``os.wait4`` of that child: the kernel's high-water
     mark),
   - stage times and the highest RSS seen per stage (RSS polled from ``/proc`` every 0.2 s; stages read
     from the progress bar's text on stderr): loading (start → first progress line: imports, reading the
     LoRAs and the base), text encoder, cross-attention K/V, UNet feature runs (teacher-forced sampling),
     per-layer solves, and writing (last progress line → report on stdout: SVD re-rank + save);
4. checks that the merged file loads back (``python -m lib_loraclr inspect``).

``--distill-steps K``: the same merge with the output-level refinement (the CLI's ``--distill-steps``); its
time is the "refine" column (teacher outputs on the pool + K Adam steps through the whole model).

``--devices cpu,cuda``: each merge on each device in turn (the CLI's ``--device``), with the wall-time ratio
to the first device and, on a GPU, its memory peak (``torch.cuda.max_memory_allocated``, printed by the CLI);
`bench/device_check.sh` runs it on a lent GPU machine.

``--quick``: a smoke run (N = 2, 1 sampling step); peak memory does not depend on the steps (the feature
statistics are bounded), the sampling stage time scales linearly with them.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRIGGERS = ("sks dog", "ohwx cat", "zwx car", "qtz vase", "bkx tree", "vlt lamp", "pxr hat", "jmn boat")
TE_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
UNET_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")


# ---------------------------------------------------------------------------------------------- builders
def build_checkpoint(path: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, tuple]:
    """Random-weight SD1.5 (UNet + CLIP-L) in A1111 key names; returns {key: shape}."""
    from safetensors.torch import save_file

    from lib_loraclr.models.full_trees import full_sd15_tree

    shapes = {k: tuple(v.shape) for k, v in full_sd15_tree().state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for k, shape in shapes.items():
        if k.endswith("position_ids"):
            sd[k] = torch.arange(shape[-1]).expand(shape).contiguous()
            continue
        leaf = k.rsplit(".", 1)[-1]
        if "embedding" in k:
            t = torch.randn(shape, generator=g) * 0.02
        elif len(shape) == 1:  # biases 0, norm scales 1
            t = torch.ones(shape) if (leaf == "weight" and "norm" in k) else torch.zeros(shape)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / fan_in**0.5
        sd[k] = t.to(dtype)
    save_file(sd, str(path), metadata={"format": "pt"})
    return shapes


def lora_keys(shapes: dict[str, tuple]) -> list[str]:
    """Canonical keys (module paths) of every UNet attention projection and every text-encoder layer."""
    keys = []
    for k in shapes:
        if not k.endswith(".weight"):
            continue
        path = k[: -len(".weight")]
        if path.startswith("model.diffusion_model.") and re.search(r"\.attn[12]\.", path):
            if path.endswith(UNET_LEAVES):
                keys.append(path)
        elif path.startswith("cond_stage_model.transformer.") and path.rsplit(".", 1)[-1] in TE_LEAVES:
            keys.append(path)
    return keys


def build_lora(
    path: Path,
    keys: list[str],
    shapes: dict[str, tuple],
    trigger: str,
    seed: int,
    rank: int = 8,
    rel: float = 0.3,
) -> None:
    """A kohya LoRA (rank ``rank``, alpha = rank) with ‖ΔW‖ ≈ rel·‖W0‖ per module (W0 ~ N(0, 1/fan_in))."""
    from lib_loraclr.deltas import DeltaSet, LoraModule
    from lib_loraclr.writers import write_kohya_lora

    g = torch.Generator().manual_seed(seed)
    mods = {}
    for k in keys:
        d_out, d_in = shapes[k + ".weight"]
        down = torch.randn(rank, d_in, generator=g) / d_in**0.5
        up = torch.randn(d_out, rank, generator=g)
        w0_norm = (d_out * d_in / d_in) ** 0.5  # E‖W0‖_F for N(0, 1/d_in) entries
        up *= rel * w0_norm / (up @ down).norm()
        mods[k] = LoraModule(key=k, down=down, up=up, alpha=float(rank))
    meta = {"loraclr_trigger": f'["{trigger}"]', "ss_output_name": path.stem}
    write_kohya_lora(DeltaSet(modules=mods, arch="sd1", fmt="kohya"), path, arch="sd1", metadata=meta)


# ------------------------------------------------------------------------------------------- measuring
def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


STAGES = (
    ("text encoder", "text encoder"),
    ("cross-attention", "K/V"),
    ("UNet", "UNet sampling"),
    ("solved", "solves"),
    ("output rank", "SVD"),  # layers no later pass needs, reduced to the saved file's rank (`lowrank_output`)
)


def _stage_of(text: str) -> str:
    for prefix, name in STAGES:
        if prefix in text:
            return name
    return "other"


def run_merge(cmd: list[str], env: dict[str, str], verbose: bool = True) -> dict:
    """Run the CLI; wall time, peak RSS (wait4), per-stage time and max polled RSS."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    state = {"stage": "load", "since": t0}
    times: dict[str, float] = {}
    rss: dict[str, int] = {}
    lock = threading.Lock()
    stdout_lines: list[str] = []
    stderr_tail: list[str] = []

    def switch(stage: str, now: float) -> None:
        with lock:
            old = state["stage"]
            times[old] = times.get(old, 0.0) + now - state["since"]
            state["stage"], state["since"] = stage, now
        if verbose:
            print(f"  [{now - t0:7.1f} s] {stage} (RSS {_rss_kb(p.pid) / 2**20:.2f} G)", flush=True)

    def read_err() -> None:
        buf = b""
        assert p.stderr is not None
        while True:
            ch = p.stderr.read(1)
            if not ch:
                break
            if ch in (b"\r", b"\n"):
                line = buf.decode(errors="replace")
                buf = b""
                if not line.strip():
                    continue
                stderr_tail.append(line)
                del stderr_tail[:-20]
                # tqdm: "merge:  40%|####      | 80/200 [01:02<01:33, 1.28layer/s, UNet (sequential): stage 1/16, run 1/3]"
                m = re.search(r"\| *(\d+)/(\d+) \[(.*)\]\s*$", line)
                if m is not None and state["stage"] != "report":
                    parts = m.group(3).split(", ", 2)
                    post = parts[2] if len(parts) == 3 else ""
                    if "distill" in post:
                        stage = "refinement"  # after every layer is solved (`--distill-steps`)
                    elif state["stage"] in ("write", "refinement"):
                        stage = state["stage"]
                    else:
                        stage = _stage_of(post) if post else state["stage"]
                        if int(m.group(2)) > 1 and m.group(1) == m.group(2):
                            stage = "write"  # every layer solved: the SVD re-rank and the save follow
                    if stage != state["stage"]:
                        switch(stage, time.perf_counter())
            else:
                buf += ch

    def read_out() -> None:
        assert p.stdout is not None
        for raw in p.stdout:
            if not stdout_lines:  # the report is printed right after writing the file
                switch("report", time.perf_counter())
            stdout_lines.append(raw.decode(errors="replace").rstrip("\n"))

    def poll() -> None:
        while p.returncode is None and not done.is_set():
            kb = _rss_kb(p.pid)
            with lock:
                st = state["stage"]
                if kb > rss.get(st, 0):
                    rss[st] = kb
            done.wait(0.2)

    done = threading.Event()
    threads = [threading.Thread(target=f, daemon=True) for f in (read_err, read_out, poll)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    for t in threads:
        t.join(timeout=5)
    switch("end", t0 + wall)
    return {
        "rc": p.returncode,
        "wall_s": wall,
        "peak_rss_kb": usage.ru_maxrss,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # ÷ wall = the CPU share the merge got (shared machines)
        "stage_s": times,
        "stage_rss_kb": rss,
        "stdout": stdout_lines,
        "stderr_tail": stderr_tail,
    }


def cli_env() -> dict[str, str]:
    """The environment of the merge CLI's subprocess: the repo first on ``PYTHONPATH``, then whatever the caller
    put there (a lent GPU machine: carried wheels in /tmp/site); this process's thread count unless set."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return env


def _gpu_peak(stdout: Sequence[str]) -> float | None:
    """The GPU memory peak the CLI prints after its report (``--device cuda``), if any."""
    for line in stdout:
        m = re.search(r"GPU memory peak ([0-9.]+) GiB", line)
        if m:
            return float(m.group(1))
    return None


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", default="2,4", help="comma-separated concept counts (default 2,4)")
    ap.add_argument(
        "--steps", type=int, default=20, help="sampling steps of the feature runs (CLI default 20)"
    )
    ap.add_argument(
        "--method",
        default="loraclr",
        help="merge method (default loraclr; lsq = the same passes, closed-form solves)",
    )
    ap.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        help="output-level refinement steps (the CLI's --distill-steps; default 0 = off)",
    )
    ap.add_argument(
        "--devices",
        default="cpu",
        help="comma-separated merge devices, each merge run on each, side by side (e.g. cpu,cuda; default cpu)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: N = 2, 1 step")
    ap.add_argument("--keep", default=None, help="build the files in this folder and keep them")
    ap.add_argument("--ckpt-dtype", choices=("fp16", "fp32"), default="fp16")
    args = ap.parse_args()
    ns = [2] if args.quick else [int(x) for x in args.concepts.split(",")]
    steps = 1 if args.quick else args.steps
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="merge_sd15_"))
    work.mkdir(parents=True, exist_ok=True)
    env = cli_env()
    try:
        base = work / "sd15_random.safetensors"
        t = time.perf_counter()
        dtype = torch.float16 if args.ckpt_dtype == "fp16" else torch.float32
        if base.exists():
            from safetensors import safe_open

            with safe_open(str(base), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        else:
            shapes = build_checkpoint(base, dtype=dtype)
        keys = lora_keys(shapes)
        n_te = sum(k.startswith("cond_stage_model.") for k in keys)
        for i in range(max(ns)):
            lp = work / f"concept{i}.safetensors"
            if not lp.exists():
                build_lora(lp, keys, shapes, TRIGGERS[i], seed=100 + i)
        print(
            f"built {base.name} ({base.stat().st_size / 2**30:.2f} GiB, {args.ckpt_dtype}) and {max(ns)} rank-8 "
            f"LoRAs ({len(keys)} modules: {len(keys) - n_te} UNet attention, {n_te} text encoder) "
            f"in {time.perf_counter() - t:.0f} s; OMP_NUM_THREADS={env['OMP_NUM_THREADS']}",
            flush=True,
        )
        rows = []
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        for n, device in ((n, d) for n in ns for d in devices):
            out = work / f"merged_{n}_{device.replace(':', '')}.safetensors"
            out.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "lib_loraclr", "merge", "--base", str(base)]
            for i in range(n):
                cmd += ["--concept", str(work / f"concept{i}.safetensors"), TRIGGERS[i]]
            cmd += ["--out", str(out), "--method", args.method, "--preset", "recommended"]
            if steps != 20:
                cmd += ["--steps", str(steps)]
            # both explicit: the CLI's defaults ("auto", 100 refinement steps on a GPU) depend on the machine
            cmd += ["--distill-steps", str(args.distill_steps), "--device", device]
            print("$ " + " ".join(c if " " not in c else f'"{c}"' for c in cmd[1:]), flush=True)
            r = run_merge(cmd, env)
            if r["rc"] != 0:
                print("\n".join(r["stderr_tail"] + r["stdout"]))
                print(f"merge N={n} failed (exit {r['rc']})")
                return 1
            print("\n".join(r["stdout"]))
            ins = subprocess.run(
                [sys.executable, "-m", "lib_loraclr", "inspect", str(out)],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
            )
            loads = ins.returncode == 0
            print(f"inspect {out.name}: exit {ins.returncode}; " + " | ".join(ins.stdout.splitlines()[:4]))
            r.update(
                n=n, device=device, size=out.stat().st_size, loads=loads, gpu_peak=_gpu_peak(r["stdout"])
            )
            rows.append(r)
        print(
            f"\nSD1.5 random weights, rank-8 LoRAs ({len(keys)} modules), {args.method} recommended, steps {steps}"
            f", refinement steps {args.distill_steps}"
        )
        head = (
            f"{'N':>2} {'device':>7} {'wall':>9} {'CPU':>9} {'peak RSS':>9} {'load':>7} {'TE':>6} {'K/V':>6} {'UNet sampl.':>11} "
            f"{'solves':>8} {'refine':>7} {'write':>7} {'file MB':>8} loads"
        )
        print(head)
        print("-" * len(head))
        for r in rows:
            s = r["stage_s"]
            print(
                f"{r['n']:>2} {r['device']:>7} {_fmt_s(r['wall_s']):>9} {_fmt_s(r['cpu_s']):>9} {r['peak_rss_kb'] / 2**20:>7.2f} G "
                f"{_fmt_s(s.get('load', 0) + s.get('other', 0)):>7} {_fmt_s(s.get('text encoder', 0)):>6} {_fmt_s(s.get('K/V', 0)):>6} "
                f"{_fmt_s(s.get('UNet sampling', 0)):>11} {_fmt_s(s.get('solves', 0)):>8} "
                f"{_fmt_s(s.get('refinement', 0)):>7} {_fmt_s(s.get('write', 0)):>7} {r['size'] / 2**20:>8.1f} "
                f"{'yes' if r['loads'] else 'NO'}"
            )
            peaks = ", ".join(f"{k} {v / 2**20:.2f} G" for k, v in r["stage_rss_kb"].items())
            print(f"   highest polled RSS per stage: {peaks}")
            if r["gpu_peak"] is not None:
                print(f"   GPU memory peak (torch.cuda.max_memory_allocated): {r['gpu_peak']:.2f} GiB")
        for n in ns:  # side-by-side ratios of the same merge on each device
            base_r = next((r for r in rows if r["n"] == n and r["device"] == devices[0]), None)
            for r in rows:
                if base_r is not None and r["n"] == n and r is not base_r:
                    print(f"N={n}: wall {r['device']} / {devices[0]} = {r['wall_s'] / base_r['wall_s']:.3f}")
        print(
            "(CPU: user + system time of the merge process; load: start → first progress line; write: last layer solved → report printed (SVD re-rank + "
            "save); UNet sampling includes the first solve after each block's runs)"
        )
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
