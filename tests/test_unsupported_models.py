"""Models the extension cannot serve (Flux, SD3, …): CLoRA stays inert and says so in one line; models of the
SD1/SD2/SDXL UNet layout are served, on A1111 and on Forge alike (decided by capability)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

from torch import nn

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT / "tests" / "webui_stub", ROOT / "scripts"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from loraclr_glue import script_logic  # noqa: E402

from lib_loraclr import clora_args as ca  # noqa: E402
from lib_loraclr import host_objects as host  # noqa: E402


class FluxLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.double_blocks = nn.ModuleList([nn.Linear(2, 2)])


class UNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_blocks = nn.ModuleList()
        self.middle_block = nn.Sequential()
        self.output_blocks = nn.ModuleList()


def a1111_model(net: nn.Module) -> SimpleNamespace:
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=net))


def forge_model(net: nn.Module) -> SimpleNamespace:
    unet = SimpleNamespace(model=SimpleNamespace(diffusion_model=net))
    for name in host.FORGE_UNET_METHODS:
        setattr(unet, name, lambda *a, **k: None)
    return SimpleNamespace(forge_objects=SimpleNamespace(unet=unet))


def test_the_unet_layout_is_served_on_both_hosts():
    for wrap in (a1111_model, forge_model):
        assert host.unsupported_model(wrap(UNetLike())) is None
        why = host.unsupported_model(wrap(FluxLike()))
        assert why is not None and "FluxLike" in why and "without CLoRA" in why
    assert host.unsupported_model(SimpleNamespace()) is None  # nothing to judge: the adapter reports


def test_clora_is_inert_on_a_flux_model(capsys):
    p = SimpleNamespace(
        sd_model=forge_model(FluxLike()),
        prompt="a cat<clora:catlora>",
        all_prompts=["a cat<clora:catlora>"],
        extra_generation_params={},
    )
    logic = script_logic.CloraScriptLogic(shared=SimpleNamespace())
    assert logic.process(p, True, {}) is None
    notice = p.extra_generation_params[ca.INFOTEXT_NOTICE_KEY]
    assert "FluxLike" in notice and "not supported" in notice
    assert "FluxLike" in capsys.readouterr().out
    assert set(p.extra_generation_params) == {ca.INFOTEXT_NOTICE_KEY}  # no CLoRA settings, no run
    # CLoRA not asked for: nothing at all, not even the notice
    q = SimpleNamespace(
        sd_model=forge_model(FluxLike()), prompt="a cat", all_prompts=["a cat"], extra_generation_params={}
    )
    assert logic.process(q, False, {}) is None and q.extra_generation_params == {}


def test_unsupported_network_is_decided_by_the_unet_layout() -> None:
    from torch import nn

    from lib_loraclr.arch import unsupported_network

    class FluxLike(nn.Module):
        pass

    unet = nn.Module()
    for part in ("input_blocks", "middle_block", "output_blocks"):
        setattr(unet, part, nn.Module())
    assert unsupported_network(unet) is None and unsupported_network(None) is None
    why = unsupported_network(FluxLike())
    assert why is not None and "FluxLike" in why and "SDXL" in why and "\n" not in why
