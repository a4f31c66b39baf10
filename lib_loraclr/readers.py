"""Read LoRA files of every common format into a :class:`~lib_loraclr.deltas.DeltaSet`.

Formats (dispatched on content, not on the file name):

* kohya LoRA / LoCon ``.safetensors`` (``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``/``lora_te2_*``,
  ``.lora_down.weight``/``.lora_up.weight``/``.alpha``, 1×1 and 3×3 conv, CP ``lora_mid`` folded into
  ``down`` exactly), both UNet namings;
* diffusers / PEFT (``lora_A``/``lora_B``, ``.lora.down``/``.lora.up``, ``lora_linear_layer``, processor
  names ``to_q_lora``; ``unet.``/``text_encoder.``/``text_encoder_2.`` prefixes), ``.safetensors`` or
  ``.bin``/``.pt`` (weights-only);
* Mix-of-Show ED-LoRA ``.pth`` (``params`` → ``new_concept_embedding``, ``text_encoder``, ``unet``) with its
  concept embeddings in ``DeltaSet.embeddings``;
* LyCORIS LoHa (``hada_*``), LoKr (``lokr_*``) and full ``diff``: materialised to a dense ΔW.

Other types (OFT, BOFT, GLoRA, (IA)³, DoRA, LyCORIS norm) raise :class:`LoraFormatError` naming the type.
Keys no map knows are listed in ``DeltaSet.unmapped``; if nothing maps the file is refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lib_loraclr.arch import arch_from_metadata, detect_arch, detect_checkpoint_arch
from lib_loraclr.deltas import DeltaSet, LoraModule
from lib_loraclr.errors import (
    ArchitectureMismatchError,
    LoraFormatError,
    NonFiniteWeightsError,
    ShapeMismatchError,
    UnmappedKeysError,
    short_list,
)
from lib_loraclr.keymap import (
    canonical_arch,
    conv_kernel_size,
    diffusers_to_canonical,
    kohya_to_canonical,
    weight_key_to_canonical,
)
from lib_loraclr.safeio import load_torch_file, read_safetensors, sniff_format
from lib_loraclr.validate import check_alpha, check_input_file, check_rank, check_values

ARCH_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "unknown": "an unknown model"}

# (suffix, role); longest/most specific first
_SUFFIX_ROLES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_magnitude_vector.default.weight", "dora"),
    (".lora_magnitude_vector.weight", "dora"),
    (".lora_magnitude_vector", "dora"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".dora_scale", "dora"),
    (".alpha", "alpha"),
    (".scale", "scale"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"),
    (".hada_t2", "hada_t2"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_t2", "lokr_t2"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
    (".oft_blocks", "!OFT"),
    (".oft_diag", "!OFT"),
    (".oft_R", "!OFT"),
    (".boft_blocks", "!BOFT"),
    (".rescale", "!OFT"),
    (".a1.weight", "!GLoRA"),
    (".a2.weight", "!GLoRA"),
    (".b1.weight", "!GLoRA"),
    (".b2.weight", "!GLoRA"),
    (".on_input", "!(IA)³"),
    (".w_norm", "!LyCORIS norm"),
    (".b_norm", "!LyCORIS norm"),
    (".bias_indices", "!LoRA bias"),
    (".bias_values", "!LoRA bias"),
    (".bias_size", "!LoRA bias"),
)
_PROC_SUFFIXES = (("_lora.down.weight", "down"), ("_lora.up.weight", "up"))
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def _split_key(key: str) -> tuple[str, str] | None:
    """Raw tensor key → (raw module name, role), or None if the suffix is unknown."""
    for suf, role in _PROC_SUFFIXES:
        if key.endswith(suf):
            return key[: -len(suf) + len("_lora")], role
    for suf, role in _SUFFIX_ROLES:
        if key.endswith(suf) and len(key) > len(suf):
            return key[: -len(suf)], role
    return None


def _map_module(raw: str, arch: str) -> str | None:
    if "." not in raw and raw.startswith("lora_"):
        return kohya_to_canonical(raw, arch)
    return diffusers_to_canonical(raw, arch)


def _as_float(t: torch.Tensor | float, key: str, source: str) -> float:
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ShapeMismatchError(
                f"{source}: {key} should hold one number but has shape {tuple(t.shape)}."
            )
        v = float(t.reshape(()).item())
    else:
        v = float(t)
    if not math.isfinite(v):
        raise NonFiniteWeightsError(f"{source}: {key} is {v} (NaN or Inf); the file is damaged.")
    return v


def _check_finite(t: torch.Tensor, key: str, source: str) -> None:
    """NaN/Inf (NonFiniteWeightsError) or absurd magnitudes (ValueRangeError, `validate.MAX_LORA_VALUE`)."""
    if t.is_floating_point() and t.numel():
        peak = float(t.detach().abs().max())  # NaN propagates through max
        n_bad = 0 if math.isfinite(peak) else int((~torch.isfinite(t)).sum())
        check_values(peak, n_bad, key, source)


def _shape_dense(d2: torch.Tensor, key: str, arch: str, source: str, raw: str) -> torch.Tensor:
    """A ``[out, in·k·k]`` delta → the module's weight shape, using the known kernel of conv modules."""
    k = conv_kernel_size(key, arch)
    if k is None or d2.dim() == 4:
        return d2
    if d2.shape[1] % (k * k):
        raise ShapeMismatchError(
            f"{source}: {raw}: a delta of shape {tuple(d2.shape)} cannot be a {k}×{k} conv weight."
        )
    return d2.reshape(d2.shape[0], d2.shape[1] // (k * k), k, k)


def _cp_weight(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker/CP rebuild as LyCORIS: ``einsum('i j k l, j r, i p -> p r k l', t, wb, wa)``."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb.flatten(1), wa.flatten(1))


def _build_lora(
    key: str, raw: str, p: dict[str, torch.Tensor], arch: str, source: str, kind: str
) -> LoraModule:
    if "down" not in p or "up" not in p:
        have = "lora_down" if "down" in p else "lora_up"
        miss = "lora_up" if "down" in p else "lora_down"
        raise LoraFormatError(f"{source}: module {raw} has {have} but no {miss}; the file is incomplete.")
    down, up = p["down"], p["up"]
    if (
        down.dim() not in (2, 4)
        or up.dim() not in (2, 4)
        or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1))
    ):
        raise ShapeMismatchError(
            f"{source}: module {raw}: unexpected shapes lora_down {tuple(down.shape)}, lora_up {tuple(up.shape)}."
        )
    if up.shape[1] != down.shape[0]:
        raise ShapeMismatchError(
            f"{source}: module {raw}: rank mismatch, lora_down has rank {down.shape[0]} "
            f"{tuple(down.shape)} but lora_up has rank {up.shape[1]} {tuple(up.shape)}."
        )
    check_rank(down.shape[0], raw, source, f"lora_down {tuple(down.shape)}")
    if "mid" in p:
        mid = p["mid"]
        r = down.shape[0]
        if mid.dim() != 4 or mid.shape[0] != r or mid.shape[1] != r:
            raise ShapeMismatchError(
                f"{source}: module {raw}: lora_mid {tuple(mid.shape)} does not fit rank {r}."
            )
        # ΔW[i,j,k,l] = Σ_{n,m} mid[n,m,k,l] up[i,n] down[m,j]  →  fold mid into down, still rank r.
        down = torch.einsum("n m k l, m j -> n j k l", mid.float(), down.flatten(1).float()).to(down.dtype)
        kind = "locon"
    if down.dim() == 4 and up.dim() == 2:
        up = up[:, :, None, None]
    elif down.dim() == 2 and up.dim() == 4:
        down = down[:, :, None, None]
    elif down.dim() == 2:
        k = conv_kernel_size(key, arch)
        if k == 1:
            down, up = down[:, :, None, None], up[:, :, None, None]
        elif k is not None:
            if down.shape[1] % (k * k):
                raise ShapeMismatchError(
                    f"{source}: module {raw}: lora_down {tuple(down.shape)} cannot feed a {k}×{k} conv."
                )
            down = down.reshape(down.shape[0], down.shape[1] // (k * k), k, k)
            up = up[:, :, None, None]
    if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1):
        kind = "locon"
    alpha = None
    if "alpha" in p:
        alpha = _as_float(p["alpha"], raw + ".alpha", source)
    elif "scale" in p:
        alpha = _as_float(p["scale"], raw + ".scale", source) * down.shape[0]
    if alpha is not None:
        check_alpha(alpha, down.shape[0], raw, source)
    return LoraModule(key=key, down=down, up=up, alpha=alpha, kind=kind)


def _build_loha(key: str, raw: str, p: dict[str, torch.Tensor], arch: str, source: str) -> LoraModule:
    need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    miss = [n for n in need if n not in p]
    if miss:
        raise LoraFormatError(f"{source}: LoHa module {raw} lacks {', '.join(miss)}.")
    w1a, w1b, w2a, w2b = (p[n].float() for n in need)
    cp = "hada_t1" in p and "hada_t2" in p
    # plain: w_a [out, r], w_b [r, in·k·k]; CP (Tucker): t [r, r, kh, kw], w_a [r, out], w_b [r, in]
    ra = 0 if cp else 1
    if w1a.shape[ra] != w1b.shape[0] or w2a.shape[ra] != w2b.shape[0]:
        raise ShapeMismatchError(
            f"{source}: LoHa module {raw}: rank mismatch (w1 {tuple(w1a.shape)}×{tuple(w1b.shape)}, "
            f"w2 {tuple(w2a.shape)}×{tuple(w2b.shape)})."
        )
    rank = w1b.shape[0]
    check_rank(min(rank, w2b.shape[0]), raw, source, "LoHa")
    if cp:
        d1 = _cp_weight(p["hada_t1"].float(), w1a, w1b)
        d2 = _cp_weight(p["hada_t2"].float(), w2a, w2b)
    else:
        d1, d2 = w1a @ w1b.flatten(1), w2a @ w2b.flatten(1)
    if d1.shape != d2.shape:
        raise ShapeMismatchError(
            f"{source}: LoHa module {raw}: halves have shapes {tuple(d1.shape)}, {tuple(d2.shape)}."
        )
    scale = 1.0
    if "alpha" in p:
        alpha = _as_float(p["alpha"], raw + ".alpha", source)
        check_alpha(alpha, rank, raw, source)
        scale = alpha / rank
    dense = _shape_dense(d1 * d2 * scale, key, arch, source, raw)
    return LoraModule(key=key, dense=dense, kind="loha")


def _build_lokr(key: str, raw: str, p: dict[str, torch.Tensor], arch: str, source: str) -> LoraModule:
    dim = None
    if "lokr_w1" in p:
        w1 = p["lokr_w1"].float()
    elif "lokr_w1_a" in p and "lokr_w1_b" in p:
        w1 = p["lokr_w1_a"].float() @ p["lokr_w1_b"].float()
        dim = p["lokr_w1_b"].shape[0]
    else:
        raise LoraFormatError(f"{source}: LoKr module {raw} lacks lokr_w1 (or lokr_w1_a/_b).")
    if "lokr_w2" in p:
        w2 = p["lokr_w2"].float()
    elif "lokr_w2_a" in p and "lokr_w2_b" in p:
        a, b = p["lokr_w2_a"].float(), p["lokr_w2_b"].float()
        dim = b.shape[0]
        w2 = _cp_weight(p["lokr_t2"].float(), a, b) if "lokr_t2" in p else a @ b.flatten(1)
    else:
        raise LoraFormatError(f"{source}: LoKr module {raw} lacks lokr_w2 (or lokr_w2_a/_b).")
    scale = 1.0
    if dim is not None:
        check_rank(dim, raw, source, "LoKr")
    if dim is not None and "alpha" in p:
        alpha = _as_float(p["alpha"], raw + ".alpha", source)
        check_alpha(alpha, dim, raw, source)
        scale = alpha / dim
    # kron of the 2-D views equals the 4-D kron reshaped (row-major), so conv kernels come out right
    d = torch.kron(w1.flatten(1), w2.flatten(1)) * scale
    if w2.dim() == 4:
        d = d.reshape(d.shape[0], -1, w2.shape[2], w2.shape[3])
    return LoraModule(key=key, dense=_shape_dense(d, key, arch, source, raw), kind="lokr")


def _unsupported_type(
    roles: Sequence[str], tensors: Mapping[str, torch.Tensor], keys: Sequence[str]
) -> str | None:
    for role, k in zip(roles, keys):
        if role == "dora":
            return "DoRA (weight-decomposed LoRA)"
        if role.startswith("!"):
            name = role[1:]
            if name == "OFT" and k.endswith(".oft_blocks") and tensors[k].dim() == 4:
                return "BOFT"
            return name
    return None


def deltas_from_state_dict(
    state_dict: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    *,
    arch: str | None = None,
    source: str = "LoRA",
    fmt: str | None = None,
) -> DeltaSet:
    """Build a DeltaSet from a flat ``{tensor name: tensor}`` dict (any supported naming).

    ``arch``: force sd1/sd2/sdxl (else detected); ``source``: the file name used in messages;
    ``fmt``: the format label to record (else inferred from the names).

    Raises:
        LoraFormatError, NonFiniteWeightsError, ShapeMismatchError, ArchitectureMismatchError.
    """
    metadata = dict(metadata or {})
    tensors: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    embeddings: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor):
            if k.startswith("bundle_emb."):
                _check_finite(v, k, source)
                embeddings[k[len("bundle_emb.") :].replace(".string_to_param.*", "")] = v
            else:
                tensors[k] = v
        else:
            unmapped.append(k)
    if not tensors and not embeddings:
        raise LoraFormatError(f"{source}: the file holds no tensors; it is not a LoRA.")

    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    detected = detect_arch(tensors.keys(), shapes, None)
    if arch is not None and arch != "unknown":
        if detected not in ("unknown", arch):
            raise ArchitectureMismatchError(
                f"{source} is a {ARCH_NAMES[detected]} LoRA, but {ARCH_NAMES[arch]} was expected. "
                f"Use it with a {ARCH_NAMES[detected]} model."
            )
        use_arch = arch
    else:
        use_arch = detected if detected != "unknown" else arch_from_metadata(metadata)
    map_arch = use_arch if use_arch != "unknown" else "sd1"

    # group by raw module name
    groups: dict[str, dict[str, torch.Tensor]] = {}
    group_keys: dict[str, list[tuple[str, str]]] = {}
    for k, t in tensors.items():
        sp = _split_key(k)
        if sp is None:
            unmapped.append(k)
            continue
        raw, role = sp
        groups.setdefault(raw, {})[role] = t
        group_keys.setdefault(raw, []).append((role, k))

    bad = _unsupported_type(
        [r for v in group_keys.values() for r, _ in v],
        tensors,
        [k for v in group_keys.values() for _, k in v],
    )
    if bad:
        raise LoraFormatError(
            f"{source}: {bad} files are not supported (only LoRA, LoCon, LoHa, LoKr and full diffs are). "
            "Convert it to a plain LoRA first, e.g. with kohya's or LyCORIS' extraction tools."
        )

    modules: dict[str, LoraModule] = {}
    kinds: set[str] = set()
    for raw, p in groups.items():
        key = _map_module(raw, map_arch)
        if key is None:
            unmapped.extend(k for _, k in group_keys[raw])
            continue
        for role, k in group_keys[raw]:
            _check_finite(p[role], k, source)
        roles = set(p)
        if roles & {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
            mod = _build_loha(key, raw, p, map_arch, source)
        elif any(r.startswith("lokr_") for r in roles):
            mod = _build_lokr(key, raw, p, map_arch, source)
        elif "diff" in roles:
            mod = LoraModule(
                key=key, dense=_shape_dense(p["diff"].float(), key, map_arch, source, raw), kind="full"
            )
            if "diff_b" in p:
                unmapped.extend(k for r, k in group_keys[raw] if r == "diff_b")
        elif roles & {"down", "up"}:
            mod = _build_lora(key, raw, p, map_arch, source, "lora")
        elif roles <= {"alpha", "scale", "diff_b"}:
            unmapped.extend(k for _, k in group_keys[raw])
            continue
        else:
            raise LoraFormatError(
                f"{source}: module {raw} has an unknown combination of tensors: {sorted(roles)}."
            )
        if key in modules:
            raise LoraFormatError(f"{source}: two entries target the same module {key} (second: {raw}).")
        modules[key] = mod
        kinds.add(mod.kind)
        if "." in raw:
            kinds.add("diffusers")

    if not modules:
        if any(k.startswith(_CHECKPOINT_PREFIXES) and k.endswith(".weight") for k in tensors):
            raise LoraFormatError(
                f"{source} looks like a full model checkpoint, not a LoRA. Put it in the Stable-diffusion "
                "models folder instead."
            )
        if embeddings:
            raise LoraFormatError(
                f"{source}: holds only embeddings ({short_list(list(embeddings))}), no LoRA weights."
            )
        raise LoraFormatError(
            f"{source}: none of its {len(tensors)} tensors is a LoRA weight we recognise "
            f"(e.g. {short_list(sorted(tensors), 5)}). Supported: kohya LoRA/LoCon/LoHa/LoKr, diffusers/PEFT, "
            "Mix-of-Show ED-LoRA for SD1.x, SD2.x and SDXL."
        )
    if fmt is None:
        if kinds & {"loha", "lokr", "full"}:
            fmt = "lycoris"
        elif any(r == "down" and (".lora_A." in k) for v in group_keys.values() for r, k in v):
            fmt = "peft"
        elif "diffusers" in kinds:
            fmt = "diffusers"
        else:
            fmt = "kohya"
    key_archs = {a for a in (canonical_arch(k) for k in modules) if a}
    final_arch = use_arch
    if final_arch == "unknown" and len(key_archs) == 1:
        final_arch = key_archs.pop()
    return DeltaSet(
        modules=modules,
        arch=final_arch,
        fmt=fmt,
        metadata=metadata,
        unmapped=unmapped,
        source=source,
        embeddings=embeddings,
    )


def _flatten(prefix: str, obj: Mapping[str, Any], out: dict[str, Any]) -> None:
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            _flatten(name + ".", v, out)
        else:
            out[name] = v


def _from_edlora(params: Mapping[str, Any], *, arch: str | None, source: str) -> DeltaSet:
    flat: dict[str, Any] = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        sub = params.get(comp)
        if isinstance(sub, Mapping):
            _flatten(f"{comp}.", sub, flat)
    emb: dict[str, torch.Tensor] = {}
    raw_emb = params.get("new_concept_embedding") or {}
    if isinstance(raw_emb, Mapping):
        flat_emb: dict[str, Any] = {}
        _flatten("", raw_emb, flat_emb)
        for name, t in flat_emb.items():
            if isinstance(t, torch.Tensor):
                _check_finite(t, f"new_concept_embedding.{name}", source)
                emb[name] = t
    if not flat:
        raise LoraFormatError(f"{source}: ED-LoRA file without unet / text_encoder weights.")
    ds = deltas_from_state_dict(flat, {}, arch=arch, source=source, fmt="edlora")
    ds.embeddings.update(emb)
    return ds


def read_lora(path: str | os.PathLike[str], arch: str | None = None) -> DeltaSet:
    """Read any supported LoRA file into a DeltaSet (see the module docstring for formats).

    ``arch``: sd1 | sd2 | sdxl to force (an ArchitectureMismatchError if the file is clearly another),
    None to detect from keys, shapes and metadata.

    Raises:
        LoraFormatError, UnsafeFileError, NonFiniteWeightsError, ShapeMismatchError, ArchitectureMismatchError.
    """
    p = check_input_file(path, "LoRA file")  # InputFileError: missing, a folder, unreadable
    source = p.name
    kind = sniff_format(p)
    if p.suffix.lower() == ".safetensors" or kind in ("safetensors", "empty"):
        tensors, metadata = read_safetensors(p)
        return deltas_from_state_dict(tensors, metadata, arch=arch, source=source)
    if kind not in ("zip", "pickle"):
        raise LoraFormatError(f"{source}: not a safetensors or PyTorch file (unknown content).")
    obj = load_torch_file(p)
    if not isinstance(obj, Mapping):
        raise LoraFormatError(
            f"{source}: the PyTorch file holds a {type(obj).__name__}, not a LoRA state dict."
        )
    if "params" in obj and isinstance(obj["params"], Mapping):
        return _from_edlora(obj["params"], arch=arch, source=source)
    if "string_to_param" in obj or "emb_params" in obj:
        raise LoraFormatError(f"{source} is a textual-inversion embedding, not a LoRA.")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    flat: dict[str, Any] = {}
    _flatten("", obj, flat)
    return deltas_from_state_dict(flat, {}, arch=arch, source=source)


# --------------------------------------------------------------------------------------------------
# compatibility with a model


def weight_shapes(model_or_state: nn.Module | Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Canonical key → target weight shape, from a model (module paths = canonical keys) or a state dict /
    ``{state key: shape}`` mapping. Fused ``in_proj_weight`` gives three ``…in_proj:q|k|v`` entries."""
    items: list[tuple[str, tuple[int, ...]]] = []
    if isinstance(model_or_state, nn.Module):
        for name, prm in model_or_state.named_parameters():
            items.append((name, tuple(prm.shape)))
    else:
        for name, v in model_or_state.items():
            shape = getattr(v, "shape", v)
            items.append((name, tuple(int(s) for s in shape)))
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in items:
        keys = weight_key_to_canonical(name)
        if len(keys) == 3:
            d = shape[0] // 3
            for k in keys:
                out[k] = (d, *shape[1:])
        elif keys:
            out[keys[0]] = shape
    return out


def _same_shape(delta: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    if delta == weight:
        return True

    # a 1×1 conv delta fits a linear weight and vice versa (SD1 conv proj_in vs SD2/SDXL linear)
    def strip(s):
        return s[:2] if len(s) == 4 and s[2:] == (1, 1) else s

    return strip(delta) == strip(weight)


def check_compatible(
    deltas: DeltaSet,
    model_or_shapes: nn.Module | Mapping[str, Any],
    arch: str | None = None,
    *,
    strict: bool = True,
) -> list[str]:
    """Check that every delta fits the model; returns the keys the model lacks (empty when all fit).

    ``model_or_shapes``: a model whose module paths are canonical keys, a checkpoint state dict, or a
    mapping to shapes (state-dict keys with ``.weight``/``in_proj_weight``, or canonical keys).
    ``arch``: the model's architecture (detected from the shapes when None).

    Raises:
        ArchitectureMismatchError: the LoRA is for another base model family (e.g. SDXL LoRA, SD1 model).
        ShapeMismatchError: a delta's shape differs from the weight's (names the key and both shapes).
        UnmappedKeysError: (``strict``) some keys have no module in the model.
    """
    if isinstance(model_or_shapes, nn.Module):
        shapes = weight_shapes(model_or_shapes)
    else:
        weightish = any(k.endswith((".weight", "in_proj_weight")) for k in model_or_shapes)
        if weightish:
            shapes = weight_shapes(model_or_shapes)
        else:
            shapes = {k: tuple(getattr(v, "shape", v)) for k, v in model_or_shapes.items()}
    if arch is None:
        arch = detect_checkpoint_arch({k + ".weight": s for k, s in shapes.items()})
    lora_arch = deltas.arch
    if lora_arch == "unknown":
        key_archs = {a for a in (canonical_arch(k) for k in deltas.modules) if a}
        lora_arch = key_archs.pop() if len(key_archs) == 1 else "unknown"
    name = deltas.source or "this LoRA"
    if arch != "unknown" and lora_arch != "unknown" and lora_arch != arch:
        raise ArchitectureMismatchError(
            f"{name} is a {ARCH_NAMES[lora_arch]} LoRA but the model is {ARCH_NAMES[arch]}. "
            f"Load a {ARCH_NAMES[lora_arch]} checkpoint, or pick a LoRA made for {ARCH_NAMES[arch]}."
        )
    missing: list[str] = []
    for key, mod in deltas.modules.items():
        if key not in shapes:
            missing.append(key)
            continue
        if not _same_shape(tuple(mod.shape), shapes[key]):
            raise ShapeMismatchError(
                f"{name}: {key}: the LoRA delta has shape {tuple(mod.shape)} but the model's weight has "
                f"shape {shapes[key]}. The LoRA was made for a different model."
            )
    if missing and len(missing) == len(deltas.modules) and deltas.modules:
        raise ArchitectureMismatchError(
            f"{name}: none of its {len(missing)} modules exists in the model "
            f"(e.g. {short_list(missing, 3)}); it was made for a different model."
        )
    if missing and strict:
        raise UnmappedKeysError(
            f"{name}: {len(missing)} module(s) not found in the model: {short_list(missing)}.", missing
        )
    return missing
