"""CLoRA text-encoder routing of SDXL's OpenCLIP bigG (kohya ``lora_te2_…``; canonical keys with the fused
``attn.in_proj:q/k/v`` selectors), under both namings a host has:

- transformers names (Forge / ComfyUI): `keymap.te_hf_module_path` maps the keys to the separate q/k/v
  Linears, and `te_router` with ``(module, prefix, path_of)`` roots routes them per branch;
- OpenCLIP names (A1111): the ``nn.MultiheadAttention`` computes with its fused ``in_proj_weight`` and its
  ``out_proj.weight`` inside one call, so `RoutedLoras` hooks the MultiheadAttention itself.

Each routed branch must equal the model with that branch's ΔW merged into the weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lib_loraclr.clora.errors import RoutingError
from lib_loraclr.clora.routing import RoutedLoras, te_router
from lib_loraclr.deltas import DeltaSet, LoraModule
from lib_loraclr.keymap import TE_SDXL1_PREFIX, TE_SDXL2_PREFIX, te_hf_module_path

TE2 = TE_SDXL2_PREFIX + "transformer.resblocks.{i}."
TE1 = TE_SDXL1_PREFIX + "text_model.encoder.layers.{i}."


def _branch_outputs(router, model, x, n_branches: int = 3) -> list:
    """``model(x)`` with each branch of ``router`` selected (hooks installed for the loop only)."""
    out = []
    with router:
        for b in range(n_branches):
            router.select(b)
            out.append(model(x))
    return out


def test_te_hf_module_path_maps_openclip_and_transformers_keys():
    assert (
        te_hf_module_path(TE2.format(i=3) + "attn.in_proj:q")
        == "text_model.encoder.layers.3.self_attn.q_proj"
    )
    assert (
        te_hf_module_path(TE2.format(i=3) + "attn.in_proj:v")
        == "text_model.encoder.layers.3.self_attn.v_proj"
    )
    assert (
        te_hf_module_path(TE2.format(i=0) + "attn.out_proj")
        == "text_model.encoder.layers.0.self_attn.out_proj"
    )
    assert te_hf_module_path(TE2.format(i=31) + "mlp.c_fc") == "text_model.encoder.layers.31.mlp.fc1"
    assert te_hf_module_path(TE2.format(i=31) + "mlp.c_proj") == "text_model.encoder.layers.31.mlp.fc2"
    assert (
        te_hf_module_path(TE1.format(i=11) + "self_attn.k_proj")
        == "text_model.encoder.layers.11.self_attn.k_proj"
    )
    sd1 = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc2"
    assert te_hf_module_path(sd1) == "text_model.encoder.layers.0.mlp.fc2"
    assert te_hf_module_path("cond_stage_model.model.transformer.resblocks.2.attn.in_proj:k") == (
        "text_model.encoder.layers.2.self_attn.k_proj"
    )
    assert te_hf_module_path("model.diffusion_model.input_blocks.1.1.proj_in") is None


class _Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] → [B, T, d] (single head)
        a = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)
        return x + self.out_proj(a @ self.v_proj(x))


class _HFText(nn.Module):
    """Forge's naming: ``text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj``."""

    def __init__(self, d: int = 16, n: int = 2) -> None:
        super().__init__()
        self.text_model = nn.Module()
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList(nn.Module() for _ in range(n))
        for layer in self.text_model.encoder.layers:
            layer.self_attn = _Attn(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.text_model.encoder.layers:
            x = layer.self_attn(x)
        return x


def _te2_lora(d: int, n: int, seed: int) -> DeltaSet:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i in range(n):
        for part in ("attn.in_proj:q", "attn.in_proj:k", "attn.in_proj:v", "attn.out_proj"):
            key = TE2.format(i=i) + part
            mods[key] = LoraModule(
                key=key,
                down=torch.randn(2, d, generator=g) * 0.3,
                up=torch.randn(d, 2, generator=g) * 0.3,
                alpha=1.0,
            )
    return DeltaSet(modules=mods, arch="sdxl")


def test_fused_openclip_lora_routes_on_hf_named_te2_like_merged_weights():
    torch.manual_seed(0)
    d, n = 16, 2
    model = _HFText(d, n).eval()
    lora_a, lora_b = _te2_lora(d, n, 1), _te2_lora(d, n, 2)
    specs = [SimpleNamespace(deltas=lora_a, te_weight=1.0), SimpleNamespace(deltas=lora_b, te_weight=0.5)]
    x = torch.randn(1, 5, d)
    with torch.no_grad():
        base = model(x)
        router = te_router([(model, TE_SDXL2_PREFIX, te_hf_module_path)], specs)
        assert router is not None and router.routers[0].n_modules == 4 * n  # q, k, v, out of every layer
        got = _branch_outputs(router, model, x)
        assert torch.equal(model(x), base)  # hooks removed, weights untouched
        for b, (lora, w) in ((1, (lora_a, 1.0)), (2, (lora_b, 0.5))):
            merged = _HFText(d, n).eval()
            merged.load_state_dict(model.state_dict())
            for key, lm in lora.modules.items():
                lin = merged.get_submodule(te_hf_module_path(key))
                lin.weight += w * lm.scale * (lm.up @ lm.down)
            torch.testing.assert_close(got[b], merged(x), rtol=1e-5, atol=1e-5)
            assert (got[b] - base).abs().max() > 1e-3
    torch.testing.assert_close(got[0], base, rtol=0, atol=0)


def test_without_path_of_fused_keys_need_a_multihead_attention():
    d, n = 16, 1
    model = _HFText(d, n)
    spec = [SimpleNamespace(deltas=_te2_lora(d, n, 1), te_weight=1.0)]
    # (module, prefix) roots resolve OpenCLIP paths, which this transformers-named model does not have
    with pytest.raises(RoutingError, match="names no module"):
        te_router([(model, TE_SDXL2_PREFIX)], spec)
    # a path_of that knows no module for a key skips it
    r = RoutedLoras(model, [[], [(spec[0].deltas, 1.0)]], prefix=TE_SDXL2_PREFIX, path_of=lambda k: None)
    assert r.n_modules == 0 and len(r.skipped) == 4


class _OpenClipText(nn.Module):
    """A1111's naming of SDXL's bigG: ``transformer.resblocks.N.attn`` is an ``nn.MultiheadAttention`` (fused
    ``in_proj_weight``; ``out_proj`` used as a weight only), causal mask as OpenCLIP passes it."""

    def __init__(self, d: int = 16, n: int = 2, heads: int = 2, batch_first: bool = True) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(nn.Module() for _ in range(n))
        for block in self.transformer.resblocks:
            block.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
            block.mlp = nn.Module()
            block.mlp.c_fc = nn.Linear(d, d)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d]
        t = x.shape[1]
        mask = torch.full((t, t), float("-inf")).triu(1)
        h = x if self.batch_first else x.transpose(0, 1)
        for block in self.transformer.resblocks:
            h = h + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
            h = h + block.mlp.c_fc(h)
        return h if self.batch_first else h.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_fused_openclip_lora_routes_through_the_multihead_attention(batch_first):
    torch.manual_seed(0)
    d, n = 16, 2
    model = _OpenClipText(d, n, batch_first=batch_first).eval()
    lora_a, lora_b = _te2_lora(d, n, 1), _te2_lora(d, n, 2)
    key = TE2.format(i=1) + "mlp.c_fc"  # a plain Linear beside the attention
    lora_a.modules[key] = LoraModule(
        key=key, down=torch.randn(2, d) * 0.3, up=torch.randn(d, 2) * 0.3, alpha=2.0
    )
    specs = [SimpleNamespace(deltas=lora_a, te_weight=1.0), SimpleNamespace(deltas=lora_b, te_weight=0.5)]
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        base = model(x)
        router = te_router([(model, TE_SDXL2_PREFIX)], specs)
        assert router is not None and router.routers[0].n_modules == n + 1  # one hook per attention + c_fc
        got = _branch_outputs(router, model, x)
        assert torch.equal(model(x), base)  # hooks removed, weights untouched
        for b, (lora, w) in ((1, (lora_a, 1.0)), (2, (lora_b, 0.5))):
            merged = _OpenClipText(d, n, batch_first=batch_first).eval()
            merged.load_state_dict(model.state_dict())
            for k, lm in lora.modules.items():
                dw = w * lm.scale * (lm.up @ lm.down)
                path = k[len(TE_SDXL2_PREFIX) :]
                if ":" in path:
                    mpath, part = path.split(".in_proj:")
                    rows = {"q": slice(0, d), "k": slice(d, 2 * d), "v": slice(2 * d, 3 * d)}[part]
                    merged.get_submodule(mpath).in_proj_weight[rows] += dw
                else:
                    merged.get_submodule(path).weight += dw
            torch.testing.assert_close(got[b], merged(x), rtol=1e-5, atol=1e-5)
            assert (got[b] - base).abs().max() > 1e-3
    assert torch.equal(got[0], base)


def test_fused_openclip_routes_refuse_per_row_routing():
    d = 16
    model = _OpenClipText(d, 1)
    r = RoutedLoras(model, [[], [(_te2_lora(d, 1, 1), 1.0)]], prefix=TE_SDXL2_PREFIX)
    assert r.n_modules == 1
    with r, torch.no_grad():
        r.set_rows([0, 1])
        with pytest.raises(RoutingError, match="select"):
            model(torch.randn(2, 3, d))


def test_fused_key_on_a_module_that_is_not_an_attention_is_refused():
    model = _OpenClipText(16, 1)
    key = TE2.format(i=0) + "mlp.c_fc:q"
    bad = DeltaSet(
        modules={key: LoraModule(key=key, down=torch.ones(1, 16), up=torch.ones(16, 1))}, arch="sdxl"
    )
    with pytest.raises(RoutingError, match="fused-row selector"):
        RoutedLoras(model, [[], [(bad, 1.0)]], prefix=TE_SDXL2_PREFIX)
    key = TE2.format(i=0) + "mlp.in_proj:q"  # a well-formed selector on a module without a fused in_proj
    bad = DeltaSet(
        modules={key: LoraModule(key=key, down=torch.ones(1, 16), up=torch.ones(16, 1))}, arch="sdxl"
    )
    with pytest.raises(RoutingError, match="not a fused attention"):
        RoutedLoras(model, [[], [(bad, 1.0)]], prefix=TE_SDXL2_PREFIX)
