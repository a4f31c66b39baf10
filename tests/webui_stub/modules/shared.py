"""``modules.shared`` stand-in: ``opts``, ``state``, ``cmd_opts`` (with the built-in Lora's ``lora_dir``),
``sd_model``."""

from types import SimpleNamespace

from modules.shared_state import State

cmd_opts = SimpleNamespace(lora_dir=None, ckpt_dir=None, api=False, nowebui=False)
opts = SimpleNamespace(batch_cond_uncond=True, persistent_cond_cache=True, CLIP_stop_at_last_layers=1)
state = State()
sd_model = None
