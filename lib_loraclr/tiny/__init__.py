"""Tiny reference models built from the real classes, offline.

- `tokenizer`  — the standard CLIP BPE tokenizer (49,408 tokens) generated from open_clip_torch's
  ``bpe_simple_vocab_16e6.txt.gz``, no download.
- `models`     — `TinySD` (SD1 checkpoint layout: ldm UNet + transformers CLIPTextModel) and
  `TinySDXL` (sgm module names), with safetensors save/load.
- `sampling`   — WebUI-style batched CFG denoiser over k-diffusion's `CompVisDenoiser`, and `sample`.
- `full_trees` — the FULL SD1.5 / SD2 / SDXL module trees on the meta device (names only, no memory).

Submodules are imported lazily so that importing `lib_loraclr.tiny` stays cheap.
"""
