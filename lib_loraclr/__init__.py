"""sd-webui-loraclr: merge (LoRACLR) and compose (CLoRA) LoRAs for Stable Diffusion.

A pure library: no import of the WebUI. See docs/DESIGN.md for the layout and the canonical keys.
"""

__version__ = "0.1.0"
