"""``modules.shared`` stand-in: ``opts``, ``state``, ``cmd_opts`` (with the built-in Lora's ``lora_dir``),
``sd_model``."""

from types import SimpleNamespace

from modules.shared_state import State

cmd_opts = SimpleNamespace(lora_dir=None, ckpt_dir=None, api=False, nowebui=False)
opts = SimpleNamespace(
    batch_cond_uncond=True,
    persistent_cond_cache=True,
    CLIP_stop_at_last_layers=1,
    skip_early_cond=0.0,
    s_min_uncond_all=False,
    pad_cond_uncond=False,
    pad_cond_uncond_v0=False,
    live_preview_content="Prompt",
    refiner_switch_by_sample_steps=True,
    enable_quantization=False,
)
state = State()
sd_model = None
