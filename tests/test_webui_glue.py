"""The WebUI glue (scripts/) against the stand-in of the WebUI API (tests/webui_stub), with the real
engines on a tiny SD1-layout model: loading, the ``clora`` extra network, the A1111 adapter end to end,
the Forge function wrapper, hook removal after postprocess and after an exception, the merge service."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
STUB = ROOT / "tests" / "webui_stub"
if str(STUB) not in sys.path:
    sys.path.insert(0, str(STUB))

from lora_factory import attention_keys, random_lora
from modules import extra_networks, processing, script_callbacks, scripts, shared

from lib_loraclr import clora_args as ca
from lib_loraclr.clora import count_hooks
from lib_loraclr.clora_controls import default_state
from lib_loraclr.models.sd import build_tiny_sd1
from lib_loraclr.writers import write_kohya_lora
from tests.references import assert_matches_reference

PROMPT = "a cat<clora:catlora:trigger=sks> and a dog<clora:doglora:trigger=ohwx>"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model():
    m = build_tiny_sd1(0)
    enc = m.prompt_encoder
    # A1111's FrozenCLIPEmbedderWithCustomWords.tokenize_line: (chunks with .tokens, token count)
    m.cond_stage_model.tokenize_line = lambda text: (enc.chunks(text), len(enc.tokenize(text)))
    return m


@pytest.fixture(scope="module")
def lora_dir(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    for i, name in enumerate(["catlora", "doglora"]):
        write_kohya_lora(
            random_lora(model, attention_keys(model), seed=i + 1),
            d / f"{name}.safetensors",
            arch="sd1",
            metadata={"loraclr_trigger": json.dumps([["sks", "ohwx"][i]])},
        )
    write_kohya_lora(
        random_lora(model, attention_keys(model), seed=9), d / "notrigger.safetensors", arch="sd1"
    )
    return d


@pytest.fixture(scope="module")
def loaded(lora_dir):
    """The extension loaded like the WebUI loads it, callbacks fired as at startup."""
    script_callbacks.clear_callbacks()
    extra_networks.initialize()
    shared.cmd_opts.lora_dir = str(lora_dir)
    path_before = list(sys.path)
    module, classes = scripts.load_scripts_from(str(ROOT), str(ROOT / "scripts" / "loraclr_script.py"))
    assert sys.path == path_before
    script_callbacks.before_ui_callback()
    return SimpleNamespace(module=module, classes=classes, script=classes[0]())


def run_job(model, script, prompt, args=None, steps=3, runner_cls=processing.ScriptRunner, **kw):
    p = processing.StableDiffusionProcessing(
        sd_model=model,
        prompt=prompt,
        steps=steps,
        scripts=runner_cls([(script, list(args or [False, {}]))]),
        **kw,
    )
    return p, processing.process_images(p)


def assert_a1111_sampler_untouched(sampler) -> None:
    """The CFG denoiser never gets an instance ``forward`` (A1111's own runs) and keeps no hook; the
    k-diffusion wrapper's per-run ``forward`` is gone."""
    cfg = sampler.model_wrap_cfg
    assert "forward" not in cfg.__dict__
    assert not cfg._forward_pre_hooks and not cfg._forward_hooks
    assert "forward" not in sampler.model_wrap.__dict__


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ loading


def test_library_never_imports_the_webui():
    code = (
        "import sys, lib_loraclr.prompt_syntax, lib_loraclr.clora_args, lib_loraclr.clora, lib_loraclr.merge; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('modules', 'backend', 'modules_forge')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_script_loads_like_the_webui(loaded):
    assert [c.__name__ for c in loaded.classes] == ["LoraclrScript"]  # exactly one Script subclass
    s = loaded.script
    assert (
        s.title() == "CLoRA"
        and s.show(False) is scripts.AlwaysVisible
        and s.show(True) is scripts.AlwaysVisible
    )
    counts = {k: len(v) for k, v in script_callbacks.callback_map.items() if v}
    assert counts == {"before_ui": 1, "ui_tabs": 1, "app_started": 1, "script_unloaded": 1}
    assert "loraclr_glue" in sys.modules
    assert not any(p.endswith("scripts") and "loraclr" in p for p in sys.path if Path(p).parent == ROOT)


def test_old_a1111_registers_the_cfg_denoiser_fallback(monkeypatch, lora_dir):
    monkeypatch.delattr(scripts.Script, "process_before_every_sampling")
    saved = {k: list(v) for k, v in script_callbacks.callback_map.items()}
    try:
        script_callbacks.clear_callbacks()
        scripts.load_scripts_from(str(ROOT), str(ROOT / "scripts" / "loraclr_script.py"))
        assert len(script_callbacks.callback_map["cfg_denoiser"]) == 1
    finally:
        script_callbacks.clear_callbacks()
        script_callbacks.callback_map.update(saved)


def test_clora_network_registered_and_receives_params(loaded):
    net = extra_networks.extra_network_registry["clora"]
    assert net.name == "clora" and isinstance(net, extra_networks.ExtraNetwork)
    prompts, data = extra_networks.parse_prompts(
        ["a cat<clora:mycat:0.9> <lora:style:1> and a dog<clora:mydog>"]
    )
    assert prompts == ["a cat  and a dog"]
    p = SimpleNamespace()
    extra_networks.activate(p, data)
    assert [x.items for x in net.last_params] == [["mycat", "0.9"], ["mydog"]]
    extra_networks.activate(p, {})  # unmentioned network: empty list = off
    assert net.last_params == []


def test_ui_components_when_gradio_is_available(loaded):
    pytest.importorskip("gradio")
    import gradio as gr

    with gr.Blocks():
        comps = loaded.script.ui(False)
    assert len(comps) == 2 and comps[1].value == default_state()
    assert loaded.script.infotext_fields and loaded.script.paste_field_names == [
        ca.INFOTEXT_KEY,
        ca.INFOTEXT_TABLE_KEY,
    ]


def test_ui_state_and_paste_helpers(loaded):
    ui = loaded.module.ui_clora
    assert ca.validate(ui.default_state()) == ca.CloraArgs(mask_preview=True)  # the UI shows masks by default
    st = ui.update_state(None, "update_steps", 0)
    assert st["update_steps"] is None
    st = ui.update_state(st, "update_steps", 7)
    st = ui.update_state(st, "loras", [["catlora", 0.5, "cat", "sks"], ["", "", "", ""]])
    assert ca.from_script_args([True, st]) == ca.validate(
        {"enabled": True, "update_steps": 7, "mask_preview": True, "loras": [["catlora", 0.5, "cat", "sks"]]}
    )
    params = ca.to_infotext(
        ca.validate(
            {
                "enabled": True,
                "update_steps": 4,
                "refinement_steps": [0, 3],
                "loras": [["catlora", 0.5, "cat", "sks"]],
            }
        )
    )
    assert ui.paste_value("enabled")(params) is True
    assert ui.paste_value("update_steps")(params) == 4
    assert ui.paste_value("refinement_steps")(params) == "0, 3"
    assert ui.paste_value("loras")(params) == [["catlora", 0.5, "cat", "sks"]]
    assert ui.paste_value("enabled")({"Steps": "20"}) is False  # no CLoRA in the infotext: switch off
    assert ui.paste_value("update_steps")({"Steps": "20"}) is None  # leave the control unchanged
    assert ui.paste_value("enabled")({ca.INFOTEXT_KEY: "bogus=1"}) is None  # a broken entry never raises


# ------------------------------------------------------------------------------------------ capability


class StubUnetPatcher:
    """Forge's ``UnetPatcher`` surface the adapter uses (``clone`` deep-copies ``model_options``)."""

    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = StubUnetPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        self.model_options["transformer_options"].setdefault("patches_replace", {})[(block_name, number)] = (
            patch
        )


def test_adapter_picked_by_capability(loaded):
    glue = loaded.module
    from loraclr_glue import adapters

    from lib_loraclr import host_objects as host

    forge_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=StubUnetPatcher(SimpleNamespace())))
    half_forge = SimpleNamespace(forge_objects=SimpleNamespace(unet=SimpleNamespace(clone=lambda: None)))
    assert host.is_forge(SimpleNamespace(sd_model=forge_model))
    assert isinstance(adapters.pick_adapter(SimpleNamespace(sd_model=forge_model)), adapters.ForgeAdapter)
    assert not host.is_forge(half_forge)  # forge_objects alone (a fork without the patcher API) is not enough
    assert isinstance(adapters.pick_adapter(SimpleNamespace(sd_model=half_forge)), adapters.A1111Adapter)
    assert isinstance(adapters.pick_adapter(SimpleNamespace(sd_model=object())), adapters.A1111Adapter)
    assert glue.HAS_BEFORE_EVERY_SAMPLING is True


# ------------------------------------------------------------------------------------------ A1111 end to end


@pytest.fixture
def installed_runs(monkeypatch):
    """``{"run": the CloraRun}`` of the last CLoRA install (the real install still runs)."""
    from loraclr_glue import clora_run

    seen: dict = {}
    install = clora_run.CloraRun.install

    def spy(self, *a, **k):
        install(self, *a, **k)
        seen["run"] = self

    monkeypatch.setattr(clora_run.CloraRun, "install", spy)
    return seen


def test_a1111_clora_end_to_end(loaded, model, monkeypatch, installed_runs):
    from loraclr_glue import clora_run

    seen = installed_runs
    before = state_of(model)
    p, res = run_job(model, loaded.script, PROMPT, args=[False, {"latent_update": True}])
    run = seen["run"]
    # infotext: every option written; no error
    assert res.extra_generation_params[ca.INFOTEXT_KEY].startswith(
        "mode=fusion layout=- regions=concept crops=0 base_uncond=1 masks=layout latent=1 "
    )
    assert "CLoRA error" not in res.extra_generation_params
    # the engine ran: three branches, the latent update lowered the loss at step 0, masks sum to 1
    hist = [h for h in run.denoiser.history if h["step"] == 0]
    assert len(hist) >= 2 and hist[-1]["loss"] < hist[0]["loss"]
    w = run.denoiser.last_weights
    assert w.shape[1] == 3 and torch.allclose(w.sum(dim=1), torch.ones_like(w.sum(dim=1)))
    # the extra network got this batch's tags
    assert [x.items[0] for x in run.network_params] == ["catlora", "doglora"]
    # CLoRA changed the image vs the same prompt without it
    _, plain = run_job(model, loaded.script, "a cat and a dog")
    assert (res.images[0] - plain.images[0]).abs().max() > 1e-3
    # everything removed: no hooks, weights bit-identical, the sampler's objects as A1111 made them, no run left
    assert count_hooks(model) == 0
    assert same_state(before, state_of(model))
    assert_a1111_sampler_untouched(p.sampler)
    assert clora_run.active_count() == 0
    # the conditioning cache of this run is its own (class-wide cache untouched by CLoRA runs)
    assert p.cached_c is not processing.StableDiffusionProcessing.cached_c


def test_a1111_weights_patched_in_place_inside_the_forward(loaded, model):
    """Real A1111 1.10.1: UNet weights keep ``requires_grad=True`` and the built-in Lora restores / patches them
    in place lazily inside each layer's first forward (``networks.network_apply_weights`` → ``weight.copy_``),
    which then runs inside CLoRA's gradient pass too ("a leaf Variable that requires grad is being used in
    an in-place operation" before the adapter froze the UNet's parameters)."""
    unet = model.model.diffusion_model
    params = list(unet.parameters())
    flags = [q.requires_grad for q in params]
    backup: dict[torch.nn.Module, torch.Tensor] = {}

    def restore_from_backup(mod, _inputs):
        mod.weight.copy_(backup.setdefault(mod, mod.weight.detach().clone()))

    handles = [
        m.register_forward_pre_hook(restore_from_backup)
        for m in unet.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        for q in params:
            q.requires_grad_(True)
        before = state_of(model)
        _, res = run_job(model, loaded.script, PROMPT, args=[False, {"latent_update": True}], steps=2)
        assert "CLoRA error" not in res.extra_generation_params, res.extra_generation_params
        assert " latent=1 " in res.extra_generation_params[ca.INFOTEXT_KEY]
        assert all(q.requires_grad for q in params)  # the flags are given back
        assert same_state(before, state_of(model))
    finally:
        for h in handles:
            h.remove()
        for q, f in zip(params, flags):
            q.requires_grad_(f)


def test_table_rows_give_the_same_image_as_tags(loaded, model):
    _, tags = run_job(model, loaded.script, PROMPT, steps=2)
    table = {"loras": [["catlora", 1.0, "cat", "sks"], ["doglora", 1.0, "dog", "ohwx"]]}
    _, rows = run_job(model, loaded.script, "a cat and a dog", args=[True, table], steps=2)
    assert torch.equal(tags.images[0], rows.images[0])
    assert json.loads(rows.extra_generation_params[ca.INFOTEXT_TABLE_KEY]) == [
        ["catlora", 1.0, "cat", "sks"],
        ["doglora", 1.0, "dog", "ohwx"],
    ]
    assert ca.INFOTEXT_TABLE_KEY not in tags.extra_generation_params


def test_trigger_words_from_metadata(loaded, model):
    _, explicit = run_job(model, loaded.script, PROMPT, steps=2)
    _, from_meta = run_job(model, loaded.script, "a cat<clora:catlora> and a dog<clora:doglora>", steps=2)
    assert torch.equal(explicit.images[0], from_meta.images[0])


@pytest.mark.parametrize(
    ("prompt", "args", "message"),
    [
        ("a cat<clora:catlora:oops>", None, "the weight must be a number"),
        ("a cat<clora:nosuchlora>", None, "LoRA 'nosuchlora' not found"),
        ("a cat<clora:notrigger>", None, "has no trigger words"),
        ("a cat", [True, {"loras": [["catlora", 1, "horse", "sks"]]}], "not in the prompt"),
        ("a cat<clora:catlora>", [True, {"threshhold": 0.2}], "did you mean 'mask_threshold'"),
    ],
)
def test_user_errors_are_reported_not_raised(loaded, model, capsys, prompt, args, message):
    from loraclr_glue import clora_run

    _, res = run_job(model, loaded.script, prompt, args=args, steps=1)
    assert message in res.extra_generation_params["CLoRA error"]
    out = capsys.readouterr().out
    assert message in out and "Traceback" not in out
    assert count_hooks(model) == 0 and clora_run.active_count() == 0


def test_syntax_error_shows_caret(loaded, model, capsys):
    run_job(model, loaded.script, "a cat<clora:catlora:oops>", steps=1)
    out = capsys.readouterr().out
    lines = out.splitlines()
    i = lines.index("a cat<clora:catlora:oops>")
    assert lines[i + 1] == " " * 20 + "^"


def test_hooks_removed_after_an_exception_mid_sampling(loaded, model, monkeypatch):
    from loraclr_glue import clora_run

    before = state_of(model)
    calls = {"n": 0}
    real = type(model).apply_model

    def failing(self, x, t, cond):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated out of memory")
        return real(self, x, t, cond)

    monkeypatch.setattr(type(model), "apply_model", failing)
    p = processing.StableDiffusionProcessing(
        sd_model=model,
        prompt=PROMPT,
        steps=3,
        scripts=processing.ScriptRunner([(loaded.script, [False, {}])]),
    )
    with pytest.raises(RuntimeError, match="simulated"):
        processing.process_images(p)
    monkeypatch.setattr(type(model), "apply_model", real)
    assert count_hooks(model) == 0  # the engine's per-call hooks are gone even though postprocess never ran
    assert same_state(before, state_of(model))
    assert clora_run.active_count() == 1  # A1111 skips postprocess on errors …
    assert "forward" in p.sampler.model_wrap.__dict__  # still wrapped until …
    script_callbacks.script_unloaded_callback()  # … the next unload (or job) cleans up
    assert clora_run.active_count() == 0
    assert_a1111_sampler_untouched(p.sampler)


def test_old_a1111_installs_from_the_cfg_denoiser_callback(loaded, model):
    class OldRunner(processing.ScriptRunner):  # A1111 1.8/1.9: no process_before_every_sampling
        def process_before_every_sampling(self, p, **kwargs):
            pass

    logic = loaded.module.LOGIC
    script_callbacks.on_cfg_denoiser(logic.cfg_denoiser)
    try:
        _, res = run_job(model, loaded.script, PROMPT, steps=3, runner_cls=OldRunner)
    finally:
        script_callbacks.callback_map["cfg_denoiser"].remove(logic.cfg_denoiser)
    assert "starts at the second sampling step" in res.extra_generation_params[ca.INFOTEXT_NOTICE_KEY]
    assert count_hooks(model) == 0


def test_masks_saved_when_asked(loaded, model, tmp_path):
    _, res = run_job(
        model,
        loaded.script,
        PROMPT,
        args=[False, {"show_masks": True}],
        steps=2,
        outpath_samples=str(tmp_path),
    )
    files = sorted(tmp_path.glob("clora-mask-*.png"))
    assert len(files) == 1
    from PIL import Image

    img = Image.open(files[0])
    assert img.size == (8 * res.images[0].shape[-1], 8 * res.images[0].shape[-2])


def test_hires_pass_runs_masks_only(loaded, model, monkeypatch):
    from loraclr_glue import clora_run

    seen = {}
    install = clora_run.CloraRun.install

    def spy(self, adapter, p, prompt, *, masks_only=False):
        seen["masks_only"] = masks_only
        install(self, adapter, p, prompt, masks_only=masks_only)
        seen["options"] = self.denoiser.options

    monkeypatch.setattr(clora_run.CloraRun, "install", spy)

    class HiresRunner(processing.ScriptRunner):
        def process_before_every_sampling(self, p, **kwargs):
            p.is_hr_pass = True
            super().process_before_every_sampling(p, **kwargs)

    run_job(model, loaded.script, PROMPT, steps=2, runner_cls=HiresRunner)
    assert seen["masks_only"] is True and seen["options"].masks_only is True


def test_adetailer_inner_pass_is_left_alone(loaded, model):
    p = processing.StableDiffusionProcessing(sd_model=model, prompt=PROMPT, steps=1)
    p._ad_inner = True
    p.setup_prompts()
    assert loaded.module.LOGIC.process(p, False, {}) is None
    assert ca.INFOTEXT_KEY not in p.extra_generation_params


# ------------------------------------------------------------------------------------------ Forge


def forge_model_of(model):
    unet = model.model.diffusion_model
    kmodel = SimpleNamespace(diffusion_model=unet)
    enc = model.prompt_encoder
    return SimpleNamespace(
        forge_objects=SimpleNamespace(
            unet=StubUnetPatcher(kmodel), clip=SimpleNamespace(cond_stage_model=model.cond_stage_model)
        ),
        get_learned_conditioning=lambda prompts: model.get_learned_conditioning(list(prompts)),
        text_processing_engine=SimpleNamespace(tokenize_line=lambda t: (enc.chunks(t), len(enc.tokenize(t)))),
        is_sdxl=False,
    )


def forge_call(model, wrapper, x, t, cond, uncond):
    """What Forge's ``calc_cond_uncond_batch`` passes to a UNet function wrapper (cond chunk, uncond chunk)."""
    unet = model.model.diffusion_model

    def apply_model(xx, tt, c_crossattn, transformer_options=None, **kw):
        return unet(xx, timesteps=tt, context=c_crossattn)

    args = {
        "input": torch.cat([x, x]),
        "timestep": torch.cat([t, t]),
        "c": {"c_crossattn": torch.cat([cond, uncond]), "transformer_options": {"cond_or_uncond": [0, 1]}},
        "cond_or_uncond": [0, 1],
    }
    return wrapper(apply_model, args), apply_model(args["input"], args["timestep"], args["c"]["c_crossattn"])


def test_forge_adapter_installs_a_function_wrapper_and_removes_it(loaded, model, lora_dir):
    from loraclr_glue import adapters, clora_run

    fm = forge_model_of(model)
    original = fm.forge_objects.unet
    p = SimpleNamespace(sd_model=fm, steps=4, width=64, height=64, extra_generation_params={})
    run = clora_run.CloraRun(args=ca.CloraArgs(latent_update=True), lora_folder=lora_dir)
    run.infotext = p.extra_generation_params
    run.prepare([PROMPT])
    adapter = adapters.pick_adapter(p)
    assert isinstance(adapter, adapters.ForgeAdapter)
    run.install(adapter, p, PROMPT)
    patched = fm.forge_objects.unet
    assert patched is not original and "model_function_wrapper" not in original.model_options
    fusion = patched.model_options["model_function_wrapper"]
    assert "masks-only" in p.extra_generation_params[ca.INFOTEXT_NOTICE_KEY]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    t = torch.tensor([500.0])
    cond = model.get_learned_conditioning(["a cat and a dog"])
    uncond = model.get_learned_conditioning([""])
    with torch.inference_mode():  # Forge samples in inference mode
        out, plain = forge_call(model, fusion, x, t, cond, uncond)
    assert out.shape == plain.shape and torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-4  # the LoRA branches changed the prediction
    w = fusion.last_weights
    assert w.shape == (1, 3, 1, 16, 16) and torch.allclose(w.sum(dim=1), torch.ones(1, 1, 16, 16))
    assert count_hooks(model) == 0
    run.remove()
    assert fm.forge_objects.unet is original


def _zero_weight_forge_call(model, lora_dir, notice=None):
    from lib_loraclr.clora import CloraDenoiser
    from lib_loraclr.clora.host_calls import ForgeUnetCall
    from lib_loraclr.clora.routing import unet_router
    from lib_loraclr.readers import read_lora

    unet = model.model.diffusion_model
    spec = SimpleNamespace(deltas=read_lora(lora_dir / "catlora.safetensors"), te_weight=0.0, unet_weight=0.0)
    cond = model.get_learned_conditioning(["a cat and a dog"])
    denoiser = CloraDenoiser(
        inner_model=None,
        unet=unet,
        conds=[None] * 3,
        groups=[[[2], [2], [2]], [[5], [5], [5]]],
        mask_tokens=[[], [2], [5]],
        options=ca.CloraArgs(masks_only=True).to_options(4),
        router=unet_router(unet, [spec, spec]),
    )
    return ForgeUnetCall(denoiser, branch_conds=[cond, cond], notice=notice)


def test_forge_fusion_with_zero_weight_loras_equals_plain(loaded, model, lora_dir):
    fusion = _zero_weight_forge_call(model, lora_dir)
    cond = model.get_learned_conditioning(["a cat and a dog"])
    uncond = model.get_learned_conditioning([""])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300.0, 300.0])
    with torch.no_grad():
        out, plain = forge_call(model, fusion, x, t, cond.expand(2, -1, -1), uncond.expand(2, -1, -1))
    assert torch.allclose(out, plain, atol=1e-5, rtol=1e-5)
    assert count_hooks(model) == 0


class StubControlNet:
    """Forge's ControlBase surface: ``get_control(x, t, cond, batched_number)`` → residuals for x's rows."""

    def __init__(self) -> None:
        self.transformer_options: dict = {}
        self.previous_controlnet = None
        self.calls: list[tuple[int, int, list]] = []

    def get_control(self, x, t, cond, batched_number):
        assert cond["c_crossattn"].shape[0] == x.shape[0] == t.shape[0]
        self.calls.append((x.shape[0], batched_number, list(self.transformer_options["cond_or_uncond"])))
        return {"output": [torch.full((x.shape[0], 1, 1, 1), 0.01)]}


def test_forge_call_gives_each_unet_call_its_own_rows_options_and_controlnet(loaded, model, lora_dir):
    """Attention patches (reference-only) read ``cond_indices`` and a ControlNet's residuals are per row:
    each of CLoRA's UNet calls gets them for its own rows, as Forge's sampling function would make them."""
    from lib_loraclr.clora.host_calls import forge_row_options

    opts = forge_row_options([1, 0, 0], torch.tensor([300.0, 300.0]))
    assert opts["cond_indices"] == [2, 3, 4, 5] and opts["uncond_indices"] == [0, 1]
    assert opts["cond_mark"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0] and opts["cond_or_uncond"] == [
        1,
        0,
        0,
    ]

    unet = model.model.diffusion_model
    seen = []

    def apply_model(xx, tt, c_crossattn, transformer_options=None, control=None, control_model=None, **kw):
        rows = xx.shape[0]
        assert control is not None and control["output"][0].shape[0] == rows  # residuals for these rows
        to = transformer_options
        b = rows // len(to["cond_or_uncond"])
        assert sorted(to["cond_indices"] + to["uncond_indices"]) == list(range(rows))
        assert to["cond_mark"].shape[0] == rows and to["sigmas"].shape[0] == b
        seen.append((rows, list(to["cond_or_uncond"])))
        return unet(xx, timesteps=tt, context=c_crossattn) + control["output"][0]

    control = StubControlNet()
    cond = model.get_learned_conditioning(["a cat and a dog"])
    uncond = model.get_learned_conditioning([""])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300.0])
    host_rows = {"c_crossattn": torch.cat([cond, uncond]), "transformer_options": {"cond_or_uncond": [0, 1]}}
    args = {
        "input": torch.cat([x, x]),
        "timestep": torch.cat([t, t]),
        "c": {**host_rows, "control": {"output": [torch.zeros(2, 1, 1, 1)]}, "control_model": control},
        "cond_or_uncond": [0, 1],
    }
    call = _zero_weight_forge_call(model, lora_dir)
    with torch.no_grad():
        out = call(apply_model, args)
        plain = unet(args["input"], timesteps=args["timestep"], context=host_rows["c_crossattn"]) + 0.01
    assert call.disabled is None and seen and any(rows > 2 for rows, _ in seen)  # branch rows, not the host's
    assert [c[0] for c in control.calls] == [rows for rows, _ in seen]
    assert torch.allclose(out, plain, atol=1e-5, rtol=1e-5)  # zero-weight LoRAs: the host's own result


def test_forge_call_falls_back_to_the_host_when_a_patch_cannot_follow(loaded, model, lora_dir):
    """Another extension's model patch that fails on CLoRA's rows: the step and the rest of the image run
    the host's plain call, once noticed; an Interrupt is the host's to handle."""
    unet = model.model.diffusion_model
    notices = []
    host_calls = []

    def previous(apply_model, a):  # e.g. a patch that only works on the host's own 2 rows
        if a["input"].shape[0] != 2:
            raise RuntimeError("shape mismatch in a recorded attention")
        host_calls.append(a["cond_or_uncond"])
        return apply_model(a["input"], a["timestep"], **a["c"])

    def apply_model(xx, tt, c_crossattn, transformer_options=None, **kw):
        return unet(xx, timesteps=tt, context=c_crossattn)

    call = _zero_weight_forge_call(model, lora_dir, notice=notices.append)
    call.previous = previous
    cond = model.get_learned_conditioning(["a cat and a dog"])
    uncond = model.get_learned_conditioning([""])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    args = {
        "input": torch.cat([x, x]),
        "timestep": torch.tensor([300.0, 300.0]),
        "c": {"c_crossattn": torch.cat([cond, uncond]), "transformer_options": {"cond_or_uncond": [0, 1]}},
        "cond_or_uncond": [0, 1],
    }
    with torch.no_grad():
        plain = apply_model(args["input"], args["timestep"], args["c"]["c_crossattn"])
        out = call(apply_model, args)
        again = call(apply_model, args)
    assert torch.equal(out, plain) and torch.equal(again, plain) and host_calls == [[0, 1], [0, 1]]
    assert len(notices) == 1 and "RuntimeError" in notices[0] and call.disabled == notices[0]

    notices.clear()
    call = _zero_weight_forge_call(model, lora_dir, notice=notices.append)
    recorder = {
        **args,
        "c": {**args["c"], "transformer_options": {"cond_or_uncond": [0, 1], "block_modifiers": [id]}},
    }
    with torch.no_grad():
        out = call(lambda xx, tt, c_crossattn, **kw: apply_model(xx, tt, c_crossattn), recorder)
    assert torch.equal(out, plain) and "block modifier" in notices[0]  # reference-only: CLoRA stays off

    class InterruptedException(Exception):
        pass

    def interrupted(apply_model, a):
        raise InterruptedException()

    call = _zero_weight_forge_call(model, lora_dir)
    call.previous = interrupted
    with pytest.raises(InterruptedException), torch.no_grad():
        call(apply_model, args)


# ------------------------------------------------------------------------------------------ helpers


def test_token_positions_match_the_engine_tokenizer(model):
    from lib_loraclr.clora.tokens import token_positions_from

    enc = model.prompt_encoder
    pos = token_positions_from(model.cond_stage_model.tokenize_line)
    for prompt, words in [
        ("a photo of a cat", "cat"),
        ("a sks cat and a dog, a cat", "cat"),
        ("a <d8> dog", "<d8>"),
        ("x " * 80 + "cat", "cat"),
    ]:
        assert pos(prompt, words) == enc.token_positions(prompt, words)
    with pytest.raises(ValueError):
        pos("a dog", "cat")


def test_mask_image_colours(loaded):
    from lib_loraclr.clora.masks import PALETTE, mask_image

    w = torch.zeros(3, 1, 2, 2)
    w[0, 0, 0, 0] = 1
    w[1, 0, 0, 1] = 1
    w[2, 0, 1, :] = 1
    img = mask_image(w, scale=2)
    assert img.size == (4, 4)
    assert img.getpixel((0, 0)) == PALETTE[0] and img.getpixel((2, 0)) == PALETTE[1]
    assert img.getpixel((0, 2)) == PALETTE[2]


# ------------------------------------------------------------------------------------------ merge service


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"loras": ["a"], "output": {"name": "x"}}, "at least two"),
        ({"loras": ["a", "b"], "output": {"name": "x"}, "methd": "lsq"}, "unknown key 'methd'"),
        ({"loras": ["a", "b"], "output": {"name": "x"}, "method": "average"}, "unknown method"),
        ({"loras": ["a", "a"], "output": {"name": "x"}}, "listed twice"),
        ({"loras": ["a", "b"], "output": {"name": ""}}, "give the output a name"),
        ({"loras": ["a", "b"], "output": {"name": "x", "rank": 0}}, "rank must be"),
        ({"loras": ["a", "b"], "output": {"name": "x", "kind": "ckpt"}}, "output kind"),
        (
            {"loras": [{"name": "a", "te_weight": "x"}, "b"], "output": {"name": "x"}},
            "te_weight must be a number",
        ),
        ("nope", "JSON object"),
    ],
)
def test_merge_request_validation(loaded, body, message):

    from lib_loraclr.merge.request import MergeRequestError, validate_request

    with pytest.raises(MergeRequestError, match=message):
        validate_request(body)


def test_merge_request_defaults(loaded):

    from lib_loraclr.merge.request import validate_request

    r = validate_request({"output": {"name": "m"}, "loras": ["a", {"name": "b", "trigger": "sks"}]})
    assert (r.method, r.preset, r.kind, r.rank, r.overwrite) == ("loraclr", "recommended", "lora", 32, False)
    assert r.loras[1].trigger == "sks" and r.loras[0].te_weight == 1.0


def make_service(lora_dir, ckpt=None):
    from loraclr_glue.api import MergeService

    sh = SimpleNamespace(
        cmd_opts=SimpleNamespace(lora_dir=str(lora_dir), ckpt_dir=str(lora_dir)),
        state=shared.state,
        sd_model=SimpleNamespace(sd_checkpoint_info=SimpleNamespace(filename=ckpt)),
    )
    return MergeService(shared=sh, runner=lambda fn: fn())


def test_merge_service_errors(loaded, lora_dir, tmp_path):
    from loraclr_glue.api import ServiceError

    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(b"")
    svc = make_service(lora_dir, str(ckpt))
    base = {"loras": ["catlora", "doglora"], "output": {"name": "merged"}}
    for body, status, message in [
        ({**base, "output": {"name": "../evil"}}, 400, "path separator"),
        ({**base, "output": {"name": "catlora"}}, 400, "already exists"),
        ({**base, "loras": ["catlora", "ghost"]}, 400, "'ghost' not found"),
        ({**base, "loras": ["catlora", "notrigger"]}, 400, "no trigger words"),
        (base, 400, "the file is empty"),  # an empty checkpoint file: a clear 400, nothing written
    ]:
        with pytest.raises(ServiceError) as ei:
            svc.merge(body, locked=False)
        assert ei.value.status == status and message in ei.value.message, ei.value.message
    assert not (lora_dir / "merged.safetensors").exists()
    with pytest.raises(ServiceError) as ei:
        make_service(lora_dir, None).merge(base, locked=False)
    assert ei.value.status == 400 and "no checkpoint is loaded" in ei.value.message


def test_merge_service_interrupt_leaves_no_file(loaded, lora_dir, tmp_path, monkeypatch):
    from loraclr_glue.api import ServiceError

    from lib_loraclr import folder_merge

    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(b"")
    svc = make_service(lora_dir, str(ckpt))
    monkeypatch.setattr(folder_merge, "load_base_model", lambda path, unet_factory=None: object())

    def fake_merge(model, concepts, config, progress):
        assert [c.trigger for c in concepts] == ["sks", "ohwx"]  # from the files' metadata
        progress("collecting features", 1, 4)
        shared.state.interrupt()
        progress("solving", 2, 4)
        raise AssertionError("not reached")

    monkeypatch.setattr(folder_merge, "merge_loras", fake_merge)
    with pytest.raises(ServiceError) as ei:
        svc.merge({"loras": ["catlora", "doglora"], "output": {"name": "merged"}}, locked=True)
    assert ei.value.status == 409 and "nothing was written" in ei.value.message
    assert not (lora_dir / "merged.safetensors").exists()
    assert shared.state.job == ""  # state ended


def test_a_failed_merge_frees_its_model_before_the_memory_is_released(
    loaded, lora_dir, tmp_path, monkeypatch
):
    """A bug inside the merge (HTTP 500) must not keep the merge's base model alive through the exception's
    frames while ``release_memory`` runs: in the real Forge Neo the host stayed ~4 GiB larger after each failed
    merge (an SD1.5 base in fp32)."""
    import gc
    import weakref

    import loraclr_glue.api as api
    from loraclr_glue.api import ServiceError

    from lib_loraclr import folder_merge

    class Base:  # stands for the several-GB model the merge builds from the checkpoint file
        pass

    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(b"")
    refs: list[weakref.ref] = []

    def load(path, unet_factory=None):
        m = Base()
        refs.append(weakref.ref(m))
        return m

    def broken_merge(model, concepts, config, progress):
        raise RuntimeError("a bug in the merge")

    alive_at_release: list[bool] = []

    def release() -> None:
        gc.collect()
        alive_at_release.append(refs[0]() is not None)

    monkeypatch.setattr(folder_merge, "load_base_model", load)
    monkeypatch.setattr(folder_merge, "merge_loras", broken_merge)
    monkeypatch.setattr(api, "release_memory", release)
    with pytest.raises(ServiceError) as ei:
        make_service(lora_dir, str(ckpt)).merge({"loras": ["catlora", "doglora"], "output": {"name": "m"}})
    assert ei.value.status == 500 and "a bug in the merge" in ei.value.message
    assert alive_at_release == [False]


class RecordingLora(extra_networks.ExtraNetwork):
    """The built-in Lora's place in the registry: records what each txt2img batch activates."""

    def __init__(self):
        super().__init__("lora")
        self.calls = []

    def activate(self, p, params_list):
        self.calls.append(
            ([x.items for x in params_list], [q.strip() for q in p.prompts], list(p.seeds), p.steps, p.width)
        )

    def deactivate(self, p):
        pass


def test_merge_service_success_writes_and_reports(loaded, model, lora_dir, tmp_path, monkeypatch):
    from loraclr_glue import ui_merge

    from lib_loraclr import folder_merge
    from lib_loraclr.merge.pipeline import MergeResult
    from lib_loraclr.readers import read_lora

    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(b"")
    svc = make_service(lora_dir, str(ckpt))
    svc.shared.sd_model = model  # the WebUI's loaded model: the preview's txt2img runs on it
    monkeypatch.setattr(model, "sd_checkpoint_info", SimpleNamespace(filename=str(ckpt)), raising=False)
    seen = {}

    def fake_load(path, unet_factory=None):
        seen["factory"] = unet_factory
        return object()

    monkeypatch.setattr(folder_merge, "load_base_model", fake_load)
    merged = random_lora(model, attention_keys(model, te=False, other=False), seed=5)
    report = {
        "groups": {
            "kv": {
                "concepts": {
                    "catlora": {"rel_err": 0.01, "interference": 0.2},
                    "doglora": {"rel_err": 0.02, "interference": 0.1},
                },
                "base_change_neutral": 0.05,
            }
        }
    }
    configs = []

    def recording_merge(m, c, cfg, progress):
        configs.append(cfg)
        return MergeResult(merged, report)

    monkeypatch.setattr(folder_merge, "merge_loras", recording_merge)
    lora_net = RecordingLora()
    extra_networks.register_extra_network(lora_net)
    try:
        table = [["catlora", "sks", 1.0, 1.0], ["doglora", "", 0.8, 1.0], ["", "", 1.0, 1.0]]
        rows, prompt, images, status = ui_merge.merge_click(
            svc, "task(x)", table, "lsq", "recommended", 5, 7, "LoRA", "merged_pair", 8, False, True, 128, 2
        )
        out = lora_dir / "merged_pair.safetensors"
        assert out.is_file() and "Saved" in status and "Preview failed" not in status, status
        assert seen["factory"] is None  # ldm is importable here: load_base's own UNet
        assert prompt == "<lora:merged_pair:1> sks, ohwx"
        assert rows == [["catlora", "kv", 0.01, 0.2, 0.05], ["doglora", "kv", 0.02, 0.1, 0.05]]
        # preview: one txt2img job, one image per concept + all concepts, same seed, the merged LoRA at weight 1
        assert [c for _, c in images] == ["catlora", "doglora", "all concepts"]
        assert [call[0] for call in lora_net.calls] == [[["merged_pair", "1"]]] * 3
        assert [call[1] for call in lora_net.calls] == [
            ["photo of sks"],
            ["photo of ohwx"],
            ["photo of sks and ohwx"],
        ]
        assert {tuple(call[2]) for call in lora_net.calls} == {(7,)} and {c[3:] for c in lora_net.calls} == {
            (2, 128)
        }
        lat = [img for img, _ in images]
        assert all(bool(torch.isfinite(x).all()) for x in lat) and not torch.equal(lat[0], lat[1])
        back = read_lora(out)
        assert len(back) == len(merged) and json.loads(back.metadata["loraclr_trigger"]) == ["sks", "ohwx"]
        lora_net.calls.clear()
        rows, prompt, images, status = ui_merge.merge_click(
            svc, "task(y)", table, "lsq", "recommended", 5, 0, "LoRA", "merged_pair", 8, False, True, 128, 2
        )
        assert rows == [] and images == [] and "already exists" in status and "class='error'" in status
        assert lora_net.calls == []
        # preview off: no txt2img; a failing preview keeps the saved file and says why
        rows, _, images, status = ui_merge.merge_click(
            svc, "task(z)", table, "lsq", "recommended", 5, 0, "LoRA", "merged_pair", 8, True, False, 128, 2
        )
        assert images == [] and lora_net.calls == [] and "Saved" in status
        monkeypatch.setattr(
            processing, "process_images", lambda p: (_ for _ in ()).throw(RuntimeError("no VRAM"))
        )
        rows, _, images, status = ui_merge.merge_click(
            svc, "task(w)", table, "lsq", "recommended", 5, 0, "LoRA", "merged_pair", 8, True, True, 128, 2
        )
        assert images == [] and "Saved" in status and "Preview failed: RuntimeError: no VRAM" in status
        assert out.is_file() and len(rows) == 2
        # the tab's refinement slider reaches the merge (-1 = automatic, the default: the device decides)
        assert [c.distill_steps for c in configs] == [None, None, None]

        def overwrite_no_preview(task: str, *extra):  # the tab's later inputs: refinement steps, device
            common = ("lsq", "recommended", 5, 0, "LoRA", "merged_pair", 8, True, False, 128, 2)
            return ui_merge.merge_click(svc, task, table, *common, *extra)

        overwrite_no_preview("task(v)", 40)
        assert configs[-1].distill_steps == 40
        overwrite_no_preview("task(o)", 0)  # 0 = off, also where a GPU would refine
        assert configs[-1].distill_steps == 0 and configs[-1].device == "auto"
        overwrite_no_preview("task(c)", -1, "CPU")
        assert configs[-1].distill_steps is None and configs[-1].device == "cpu"
        # "Merge on: GPU" reaches the job; where torch sees no GPU the tab says so and writes nothing
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert ui_merge.gpu_present() is False
        n_configs, before = len(configs), out.stat().st_mtime_ns
        rows, _, images, status = overwrite_no_preview("task(g)", 0, "GPU")
        assert rows == [] and "class='error'" in status and "torch sees no CUDA GPU here" in status, status
        assert len(configs) == n_configs and out.stat().st_mtime_ns == before
    finally:
        extra_networks.extra_network_registry.pop("lora", None)
    out.unlink()


def test_preview_prompts_and_render_arguments(loaded):
    from loraclr_glue import preview

    assert preview.preview_prompts("m", [("a", "sks cat"), ("b", "ohwx dog")]) == [
        ("a", "<lora:m:1> photo of sks cat"),
        ("b", "<lora:m:1> photo of ohwx dog"),
        ("all concepts", "<lora:m:1> photo of sks cat and ohwx dog"),
    ]
    assert preview.preview_prompts("m", [("a", "sks")]) == [("a", "<lora:m:1> photo of sks")]
    made = []

    class Txt2Img(processing.StableDiffusionProcessingTxt2Img):
        def __init__(self, **kw):
            made.append(kw)
            super().__init__(**kw)

    fake = SimpleNamespace(
        StableDiffusionProcessingTxt2Img=Txt2Img,
        process_images=lambda p: SimpleNamespace(images=["grid"] + [f"img{i}" for i in range(3)]),
    )
    got = preview.render(
        fake,
        SimpleNamespace(sd_model="M"),
        [("a", "x"), ("b", "y"), ("all", "z")],
        preview.PreviewSettings(size=200, steps=3, seed=5),
    )
    assert got == [("img0", "a"), ("img1", "b"), ("img2", "all")]  # a leading grid image is dropped
    kw = made[0]
    assert kw["width"] == kw["height"] == 192 and kw["n_iter"] == 3 and kw["batch_size"] == 1
    assert (
        kw["seed"] == [5, 5, 5]
        and kw["do_not_save_samples"]
        and kw["do_not_save_grid"]
        and kw["sd_model"] == "M"
    )
    assert kw["scheduler"] == "Automatic" and kw["sampler_name"] == "Euler"

    @dataclasses.dataclass
    class OldTxt2Img:  # A1111 1.8: a dataclass without ``scheduler``
        sampler_name: str = None

    assert not preview._accepts(OldTxt2Img, "scheduler") and preview._accepts(OldTxt2Img, "sampler_name")


def test_merge_result_is_strict_json(loaded, model, lora_dir, tmp_path, monkeypatch):
    """Real A1111 1.10.1: FastAPI's JSONResponse refuses NaN/inf (HTTP 500 after the file was written); the
    report's per-layer ratios can be non-finite (e.g. a concept's leak onto itself), so they become null."""
    from lib_loraclr import folder_merge
    from lib_loraclr.merge.pipeline import MergeResult

    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(b"")
    svc = make_service(lora_dir, str(ckpt))
    monkeypatch.setattr(folder_merge, "load_base_model", lambda path, unet_factory=None: object())
    merged = random_lora(model, attention_keys(model, te=False, other=False), seed=6)
    report = {
        "groups": {
            "kv": {
                "concepts": {"catlora": {"rel_err": float("inf"), "interference": 0.2}},
                "base_change_neutral": float("nan"),
            }
        },
        "per_layer": {"k": {"fidelity": {"leak": [[float("nan"), 0.5], [0.25, float("nan")]]}}},
    }
    monkeypatch.setattr(folder_merge, "merge_loras", lambda m, c, cfg, progress: MergeResult(merged, report))
    res = svc.merge({"loras": ["catlora", "doglora"], "output": {"name": "strict_json"}}, locked=False)
    text = json.dumps(res, allow_nan=False)  # raises on NaN / inf
    assert json.loads(text)["report"]["per_layer"]["k"]["fidelity"]["leak"] == [[None, 0.5], [0.25, None]]
    assert res["report_rows"] == [["catlora", "kv", None, 0.2, None]]
    (lora_dir / "strict_json.safetensors").unlink()


def test_inspect_and_list(loaded, lora_dir):
    from loraclr_glue.api import ServiceError

    svc = make_service(lora_dir)
    listed = svc.loras()["loras"]
    assert [x["name"] for x in listed] == ["catlora", "doglora", "notrigger"]
    assert listed[0]["trigger_words"] == ["sks"] and listed[2]["trigger_words"] == []
    assert [x["name"] for x in svc.loras("DOG")["loras"]] == ["doglora"]
    info = svc.inspect({"names": ["catlora"]})["loras"][0]
    assert info["name"] == "catlora" and info["modules"] > 0 and info["trigger_words"] == ["sks"]
    for body, status in [({"name": "ghost"}, 404), ({"nam": "x"}, 400), ({"names": []}, 400)]:
        with pytest.raises(ServiceError) as ei:
            svc.inspect(body)
        assert ei.value.status == status


def test_routes_registered_with_fastapi(loaded, lora_dir):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from loraclr_glue import api

    app = FastAPI()
    api.register_routes(app, make_service(lora_dir))
    client = TestClient(app)
    assert client.get("/loraclr/v1/loras").json()["loras"][0]["name"] == "catlora"
    r = client.post("/loraclr/v1/inspect", json={"name": "ghost"})
    assert r.status_code == 404 and "not found" in r.json()["error"]


@pytest.mark.parametrize("mode", ["fusion", "routed"])
def test_a1111_user_layout_and_routed_mode(loaded, model, monkeypatch, installed_runs, mode):
    """A ratio-string layout binds region r to the r-th concept; the routed mode runs one UNet call per step;
    the infotext restores both; nothing stays hooked."""
    seen = installed_runs
    calls = {"n": 0}
    real = type(model).apply_model

    def counting(self, x, t, cond):
        calls["n"] += 1
        return real(self, x, t, cond)

    monkeypatch.setattr(type(model), "apply_model", counting)
    from modules import prompt_parser

    encoded: list[str] = []
    encode = prompt_parser.get_learned_conditioning
    monkeypatch.setattr(
        prompt_parser, "get_learned_conditioning", lambda m, q, s: (encoded.extend(q), encode(m, q, s))[1]
    )
    before = state_of(model)
    _, res = run_job(model, loaded.script, PROMPT, args=[False, {"mode": mode, "layout": "1,1"}], steps=3)
    monkeypatch.setattr(type(model), "apply_model", real)
    # the branches' text: fusion = the scene with each trigger; routed = each concept's own phrase
    own = ["sks cat", "ohwx dog"] if mode == "routed" else ["a sks cat and a dog", "a cat and a ohwx dog"]
    assert [q for q in encoded if q in own] == own, encoded
    assert "CLoRA error" not in res.extra_generation_params, res.extra_generation_params
    text = res.extra_generation_params[ca.INFOTEXT_KEY]
    assert text.startswith(f"mode={mode} layout=1_1 regions=concept crops=0 base_uncond=1 masks=layout ")
    back = ca.from_infotext(res.extra_generation_params)
    assert (back.mode, back.layout) == (mode, "1,1")
    w = seen["run"].denoiser.last_weights  # [B, K, 1, H, W]: cat left, dog right, no background
    assert w.shape[1] == 3 and float(w[0, 0].max()) == 0.0
    half = w.shape[-1] // 2
    assert bool((w[0, 1, 0, :, :half] == 1).all()) and bool((w[0, 2, 0, :, half:] == 1).all())
    if mode == "routed":
        assert calls["n"] == 3  # one batched UNet call (cond + uncond) per step
    else:
        assert calls["n"] >= 3
    assert count_hooks(model) == 0 and same_state(before, state_of(model))


def test_a1111_merged_lora_with_a_layout_routes_each_concept_to_its_region(loaded, model, installed_runs):
    """A merged LoRA holding two concepts, bound once per concept with its trigger, in the routed mode with a
    layout: Mix-of-Show's regional sampling of one merged LoRA (`loraclr_layout` in the benchmark): one
    UNet call a step, each region reading its concept's own phrase; nothing stays hooked."""
    from modules import prompt_parser

    prompt = "a cat<clora:catlora:trigger=sks> and a dog<clora:catlora:trigger=ohwx>"
    encoded: list[str] = []
    encode = prompt_parser.get_learned_conditioning
    calls = {"n": 0}
    real = type(model).apply_model

    def counting(self, x, t, cond):
        calls["n"] += 1
        return real(self, x, t, cond)

    before = state_of(model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model), "apply_model", counting)
        mp.setattr(
            prompt_parser, "get_learned_conditioning", lambda m, q, s: (encoded.extend(q), encode(m, q, s))[1]
        )
        _, res = run_job(
            model, loaded.script, prompt, args=[False, {"mode": "routed", "layout": "1,1"}], steps=3
        )
    assert "CLoRA error" not in res.extra_generation_params, res.extra_generation_params
    assert calls["n"] == 3 and [q for q in encoded if q in ("sks cat", "ohwx dog")] == ["sks cat", "ohwx dog"]
    specs = installed_runs["run"].concepts_for(prompt)[1]
    assert [(s.name, s.trigger) for s in specs] == [("catlora", "sks"), ("catlora", "ohwx")]
    assert count_hooks(model) == 0 and same_state(before, state_of(model))


def test_mask_preview_joins_the_result_images(loaded, model):
    """``mask_preview``: one extra picture per image in the gallery / API images (API default: off)."""
    _, off = run_job(model, loaded.script, PROMPT, args=[False, {}], steps=2)
    assert len(off.images) == 1
    _, on = run_job(
        model, loaded.script, PROMPT, args=[False, {"mask_preview": True, "layout": "1,1"}], steps=2
    )
    assert "CLoRA error" not in on.extra_generation_params
    assert len(on.images) == 2 and len(on.infotexts) == 2
    mask = on.images[1]
    assert mask.mode == "RGB" and mask.size[0] > 0
    import numpy as np

    arr = np.asarray(mask)
    half = arr.shape[1] // 2
    left, right = arr[:, :half].reshape(-1, 3), arr[:, half:].reshape(-1, 3)
    assert len({tuple(c) for c in left}) == 1 and len({tuple(c) for c in right}) == 1  # one colour per region
    assert tuple(left[0]) != tuple(right[0])


# ------------------------------------------------------------------------------------------ A1111 numbers

REFERENCE = ROOT / "tests" / "data" / "a1111_clora_reference.safetensors"
# recorded when every region's uncond had its own LoRA on (base_uncond=0) and routed regions read the
# whole prompt (region_prompt=scene)
_OLD = {"base_uncond": 0}
REFERENCE_CASES = {
    "fusion": (_OLD, 3, 1),
    "fusion_update": ({**_OLD, "latent_update": True}, 3, 1),
    "fusion_update_batch2": ({**_OLD, "latent_update": True}, 3, 2),
    "routed_layout": ({**_OLD, "mode": "routed", "layout": "1,1", "region_prompt": "scene"}, 3, 1),
    "routed_auto": ({**_OLD, "mode": "routed", "region_prompt": "scene"}, 4, 1),
}


def test_a1111_clora_numbers_equal_the_previous_implementation(loaded, model):
    """The final latents of the tiny model on fixed seeds equal those of the adapter that re-implemented
    ``CFGDenoiser.forward`` (recorded with it in ``tests/data``; set LORACLR_RECORD=1 to record again)."""
    import os

    from safetensors.torch import load_file, save_file

    got = {}
    for name, (args, steps, batch) in REFERENCE_CASES.items():
        _, res = run_job(model, loaded.script, PROMPT, args=[False, args], steps=steps, batch_size=batch)
        assert "CLoRA error" not in res.extra_generation_params, res.extra_generation_params
        got[name] = res.images[0].contiguous()
    if os.environ.get("LORACLR_RECORD") == "1":
        REFERENCE.parent.mkdir(exist_ok=True)
        save_file(got, str(REFERENCE))
    ref = load_file(str(REFERENCE))
    for name, x in got.items():
        update = bool(REFERENCE_CASES[name][0].get("latent_update"))
        assert_matches_reference(name, x, ref[name], atol=1e-5, latent_update=update)


# ------------------------------------------------------------------------------------------ A1111 host behaviour


def test_a1111_other_scripts_callbacks_fire_with_clora(loaded, model, installed_runs):
    """A1111's own ``CFGDenoiser.forward`` runs under CLoRA: another script's ``on_cfg_denoiser`` /
    ``on_cfg_denoised`` / ``on_cfg_after_cfg`` callbacks fire on every step, see CLoRA's rows, and what they
    change is used (here: the after-CFG callback scales the result)."""
    seen = {"denoiser": [], "denoised": [], "after": []}

    def on_denoiser(params):
        seen["denoiser"].append((params.sampling_step, params.x.shape[0], params.text_cond.shape[0]))

    def on_denoised(params):
        seen["denoised"].append(params.x.clone())

    def on_after(params):
        seen["after"].append(params.x.clone())
        params.x = params.x * scale["v"]

    scale = {"v": 1.0}
    for register, fn in [
        (script_callbacks.on_cfg_denoiser, on_denoiser),
        (script_callbacks.on_cfg_denoised, on_denoised),
        (script_callbacks.on_cfg_after_cfg, on_after),
    ]:
        register(fn)
    try:
        p, res = run_job(model, loaded.script, PROMPT, args=[False, {}], steps=3)
        w = installed_runs["run"].denoiser.last_weights
        assert "CLoRA error" not in res.extra_generation_params
        assert [n for _, n, _ in seen["denoiser"]] == [2, 2, 2]  # cond row + uncond row, every step
        assert len(seen["denoised"]) == 3 and len(seen["after"]) == 3
        assert w is not None and w.shape[1] == 3  # CLoRA ran its three branches
        # the raw outputs the callback saw are CLoRA's, not the plain model's
        seen_clora = seen["denoised"][0]
        for v in seen.values():
            v.clear()
        run_job(model, loaded.script, "a cat and a dog", steps=3)
        assert (seen_clora - seen["denoised"][0]).abs().max() > 1e-4
        for v in seen.values():
            v.clear()
        scale["v"] = 0.5  # the callback's change reaches the sampler
        _, halved = run_job(model, loaded.script, PROMPT, args=[False, {}], steps=3)
        assert not torch.allclose(halved.images[0], res.images[0])
        assert_a1111_sampler_untouched(p.sampler)
    finally:
        for fn in (on_denoiser, on_denoised, on_after):
            script_callbacks.remove_callbacks_for_function(fn)
    assert count_hooks(model) == 0


@pytest.mark.parametrize("case", ["fusion", "fusion_update", "routed_layout", "routed_auto"])
def test_a1111_separate_cond_and_uncond_calls(loaded, model, monkeypatch, case):
    """``batch_cond_uncond`` off: A1111 calls the model for the cond rows, then the uncond rows; CLoRA takes
    the masks (and the latent update) from the cond call and gives the same image as batched."""
    from safetensors.torch import load_file

    args, steps, batch = REFERENCE_CASES[case]
    monkeypatch.setattr(shared.opts, "batch_cond_uncond", False)
    calls = {"n": 0}
    real = type(model).apply_model

    def counting(self, x, t, cond):
        calls["n"] += 1
        return real(self, x, t, cond)

    monkeypatch.setattr(type(model), "apply_model", counting)
    _, res = run_job(model, loaded.script, PROMPT, args=[False, args], steps=steps, batch_size=batch)
    assert "CLoRA error" not in res.extra_generation_params, res.extra_generation_params
    ref = load_file(str(REFERENCE))[case]
    update = bool(args.get("latent_update"))
    assert_matches_reference(case, res.images[0], ref, atol=1e-4, latent_update=update)
    if case == "routed_layout":
        assert calls["n"] == 2 * steps  # one routed pass per half and step
    assert count_hooks(model) == 0


def test_a1111_unequal_lengths_skip_early_cfg_and_and_parts(loaded, model, monkeypatch, installed_runs):
    """A negative prompt longer than 75 tokens (cond chunk, then the uncond call), skip-early-CFG steps
    (cond rows only) and an ``AND`` part (passed to the model as it is) all run with CLoRA on."""
    monkeypatch.setattr(shared.opts, "skip_early_cond", 0.4)
    p = processing.StableDiffusionProcessing(
        sd_model=model,
        prompt=PROMPT + " AND a tree :0.5",
        negative_prompt="blurry " * 90,
        steps=3,
        scripts=processing.ScriptRunner([(loaded.script, [False, {"latent_update": True}])]),
    )
    res = processing.process_images(p)
    assert "CLoRA error" not in res.extra_generation_params, res.extra_generation_params
    assert "first AND part" in res.extra_generation_params[ca.INFOTEXT_NOTICE_KEY]
    assert res.extra_generation_params["Skip Early CFG"] == 0.4
    run = installed_runs["run"]
    assert run.denoiser.last_weights.shape[1] == 3 and torch.isfinite(res.images[0]).all()
    assert any(h["step"] == 0 for h in run.denoiser.history)  # the latent update ran on a cond-only step
    assert count_hooks(model) == 0
    assert_a1111_sampler_untouched(p.sampler)


def test_a1111_refiner_switch_and_mask_blend_stay_the_hosts(loaded, model, installed_runs):
    """At the refiner switch A1111 drops its k-diffusion wrapper and builds one for the refiner: CLoRA stops
    there (its LoRAs belong to the first model) and sampling goes on; an inpainting mask is blended by
    A1111 (another script's ``on_mask_blend`` is called) and the kept region is the original latent."""
    blends = []

    class Blender(scripts.Script):
        def on_mask_blend(self, p, mba, *args):
            blends.append(mba.sigma)

    refiner = copy.copy(model)  # another model object (same weights): A1111 builds a new wrapper for it
    p = processing.StableDiffusionProcessing(
        sd_model=model,
        prompt=PROMPT,
        steps=4,
        scripts=processing.ScriptRunner([(loaded.script, [False, {}]), (Blender(), [])]),
    )
    p.refiner_checkpoint_info, p.refiner_switch_at = refiner, 0.5
    c, h, w = model.latent_shape
    p.init_latent = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(3))
    p.mask = torch.zeros(1, 1, h, w)
    p.mask[..., w // 2 :] = 1.0
    p.nmask = 1.0 - p.mask
    try:
        res = processing.process_images(p)
    finally:
        shared.sd_model = model
    assert "CLoRA error" not in res.extra_generation_params, res.extra_generation_params
    assert len(blends) == 4
    assert torch.allclose(res.images[0][..., w // 2 :], p.init_latent[..., w // 2 :], atol=1e-4)
    assert installed_runs["run"].denoiser.step == 1  # steps 0 and 1 ran CLoRA, the refiner's steps did not
    assert p.sampler.model_wrap_cfg.inner_model is not p.sampler.model_wrap  # the refiner's own wrapper
    assert count_hooks(model) == 0
    assert_a1111_sampler_untouched(p.sampler)


# ------------------------------------------------------------------------------------------ Forge Neo


def test_cond_cache_reset_keeps_the_hosts_length(loaded):
    """A1111's caches are ``[params, conds]``, Forge Neo's ``[params, conds, extra infotext params]``
    (Neo reads the third entry only when the list has one)."""
    from loraclr_glue.script_logic import invalidate_cond_cache

    p = SimpleNamespace(cached_c=["a", 1], cached_uc=["b", 2, {"x": 1}], cached_hr_c=None)
    invalidate_cond_cache(p)
    assert p.cached_c == [None, None] and p.cached_uc == [None, None, None] and p.cached_hr_c == [None, None]


def test_lora_listing_includes_neo_lora_dirs(loaded, lora_dir, tmp_path):
    """Forge Neo's ``--lora-dirs`` folders are listed after ``--lora-dir`` (a name seen first wins)."""
    from loraclr_glue.lora_files import extra_lora_dirs, list_host_loras

    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "extralora.safetensors").write_bytes((lora_dir / "catlora.safetensors").read_bytes())
    (extra / "catlora.safetensors").write_bytes(b"")
    opts = SimpleNamespace(lora_dir=str(lora_dir), lora_dirs=[str(extra)])
    listed = list_host_loras(SimpleNamespace(cmd_opts=opts))
    assert list(listed) == ["catlora", "doglora", "extralora", "notrigger"]
    assert listed["catlora"] == lora_dir / "catlora.safetensors" and listed["extralora"].parent == extra
    assert list(list_host_loras(SimpleNamespace(cmd_opts=opts), "extra")) == ["extralora"]
    a1111 = SimpleNamespace(cmd_opts=SimpleNamespace(lora_dir=str(lora_dir)))  # no lora_dirs
    assert extra_lora_dirs(a1111) == [] and list(list_host_loras(a1111)) == [
        "catlora",
        "doglora",
        "notrigger",
    ]


def test_the_merge_finds_its_base_without_loading_a_model(loaded, tmp_path, monkeypatch):
    """On A1111 ``shared.sd_model`` is a property that loads the checkpoint when none is loaded (seen in a
    real A1111 started with ``--skip-load-model-at-start``: the merge request loaded the fp32 SDXL, +14 GiB,
    only to learn the file's name). The merge reads the file, so the service asks ``model_data`` and falls
    back to the selected checkpoint."""
    import types

    from loraclr_glue.api import MergeService

    ckpt = tmp_path / "chosen.safetensors"

    class LazyShared:
        opts = SimpleNamespace(sd_model_checkpoint="chosen.safetensors [abc]")

        @property
        def sd_model(self):
            raise AssertionError("the merge must not load the host's model")

    fake = types.ModuleType("modules.sd_models")
    fake.model_data = SimpleNamespace(sd_model=None)
    fake.get_closet_checkpoint_match = lambda title: SimpleNamespace(filename=str(ckpt))
    monkeypatch.setitem(sys.modules, "modules.sd_models", fake)
    import modules

    monkeypatch.setattr(modules, "sd_models", fake, raising=False)
    svc = MergeService(shared=LazyShared(), runner=lambda fn: fn())
    assert svc.base_checkpoint() == ckpt
    loaded_file = tmp_path / "loaded.safetensors"
    fake.model_data.sd_model = SimpleNamespace(sd_checkpoint_info=SimpleNamespace(filename=str(loaded_file)))
    assert svc.base_checkpoint() == loaded_file
