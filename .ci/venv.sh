#!/usr/bin/env bash
# Create (or refresh) the project's development environment in .venv.
# Idempotent: a stamp file records the requirement set, so a second run costs a second.
# torch 2.14.1 + torchvision 0.29.1 is the pair that imports together on this kind of machine
# (k-diffusion imports torchvision); packages whose declared pins would drag in a CUDA torch or
# much more are installed with --no-deps and their real import needs listed explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP_SRC=".ci/venv.sh"
stamp=$(sha256sum "$STAMP_SRC" | cut -c1-16)
if [ -f "$VENV/.stamp" ] && [ "$(cat "$VENV/.stamp")" = "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "setuptools>=70,<81" wheel
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
"${pip[@]}" \
  "numpy>=1.26,<3" "safetensors>=0.4" "einops>=0.6" "tqdm" "pillow" "omegaconf>=2.1" \
  "transformers==4.46.1" "huggingface_hub>=0.23,<1.0" "tokenizers<0.21" \
  "scipy" "scikit-learn" "scikit-image" "torchsde" "torchdiffeq" "jsonmerge" "dctorch" \
  "clean-fid" "ftfy" "regex" "kornia" \
  "diffusers==0.31.0" "peft==0.13.2" \
  "pytest>=8" "ruff==0.17.6" "hypothesis"
# --no-deps: their declared pins pull a CUDA torch, wandb, pytorch-lightning 1.4, ...
"${pip[@]}" --no-deps "stable-diffusion-sdkit==2.1.5" "k-diffusion==0.1.1.post1" \
  "clip-anytorch==2.6.0" "open_clip_torch==2.24.0"
echo "$stamp" > "$VENV/.stamp"
