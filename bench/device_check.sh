#!/usr/bin/env bash
# The merge's GPU checks as one prepared script, for a session that is lent a GPU machine (the `run` tool):
#
#   here, once:  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp --platform any -d .whl stable-diffusion-sdkit==2.1.5 open_clip_torch==2.24.0
#   then:        run(command="bash bench/device_check.sh sd15", carry=[".whl"], timeout_s=540)
#                then, on the same warm machine, run(command="bash bench/device_check.sh sdxl", carry=[".whl"], timeout_s=540)
#
# The machine's python3 has torch (CUDA), safetensors, transformers, einops and pytest; `ldm` (from
# stable-diffusion-sdkit) and the CLIP vocabulary file (in the open_clip_torch wheel, read, not imported) travel
# as wheels in .whl/ (gitignored). What it prints, and copies to $OUT:
#   1. tests/test_merge_device.py on the GPU: lsq merged ΔW equal to the CPU merge (< 1e-3 relative), the
#      recommended LoRACLR merge + refinement on the GPU, in-place refinement written back to the CPU tensors,
#      a merge job on the GPU (report: device, GPU memory peak);
#   2. bench/merge_sd15.py at SD1.5 size (random weights, 200 rank-8 modules, N = 2, 1 feature step): the same
#      merge on the CPU and on the GPU, side by side (wall ratio), then on the GPU with 100 refinement steps
#      (what a merge on a GPU does by default, off on the CPU: issue #11 asks whether it pays on a GPU);
#   3. bench/merge_sdxl.py on the GPU: the full-size SDXL merge of LoRAs on both text encoders and every UNet
#      attention layer (never finished on the CPU here: issue #14), cut at 8 min.
set -uo pipefail
part=${1:-sd15}  # sd15: steps 1 and 2; sdxl: step 3 (each fits one 10-minute call)
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
if [ "$part" = sd15 ]; then
echo "== 1. tests/test_merge_device.py"
timeout 100 python3 -m pytest -q -p no:cacheprovider -rs tests/test_merge_device.py 2>&1 | tee "$OUT/tests.log"
echo "== 2. SD1.5 size: CPU vs GPU, then GPU + 100 refinement steps (the GPU's default)"
work=/tmp/merge_sd15_work
timeout 220 python3 bench/merge_sd15.py --concepts 2 --steps 1 --devices cpu,cuda --keep "$work" 2>&1 |
  tee "$OUT/merge_sd15.log"
timeout 180 python3 bench/merge_sd15.py --concepts 2 --steps 1 --distill-steps 100 --devices cuda --keep "$work" 2>&1 |
  tee "$OUT/merge_sd15_refine.log"
fi
if [ "$part" = sdxl ]; then
echo "== 3. SDXL size, 824 rank-8 modules (text encoders + all UNet attention): the merge that takes hours on 2 CPU cores, on the GPU"
timeout 500 python3 bench/merge_sdxl.py --concepts 2 --steps 1 --device cuda --max-rss-gib 60 --keep /tmp/merge_sdxl_work 2>&1 |
  tee "$OUT/merge_sdxl.log"
fi
echo "== done ($part)"
