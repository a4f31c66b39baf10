"""The model builders the library runs on, from the real classes, offline: full-size bases rebuilt from a
checkpoint (`lib_loraclr.base_model`) and the tiny presets the tests and the measuring world use.

- `tokenizer`  — the standard CLIP BPE tokenizer (49,408 tokens) generated from open_clip_torch's
  ``bpe_simple_vocab_16e6.txt.gz``, no download.
- `sd`         — `SD1Model` (SD1 checkpoint layout: ldm UNet + transformers CLIPTextModel) and
  `SDXLModel` (sgm module names), with safetensors save/load.
- `sampling`   — WebUI-style batched CFG denoiser over k-diffusion's `CompVisDenoiser`, and `sample`.
- `full_trees` — the FULL SD1.5 / SD2 / SDXL module trees on the meta device (names only, no memory).

Submodules are imported lazily so that importing `lib_loraclr.models` stays cheap.
"""
