"""Rebuilding a merge base from a plain SD1-layout checkpoint file (no tiny-config metadata)."""

import pytest
import torch
from safetensors.torch import save_file

from lib_loraclr.base_model import BaseModelError, load_base, sd1_config_from_shapes
from lib_loraclr.models.full_trees import full_sd15_tree
from lib_loraclr.models.sd import SD1Config, TextConfig, build_tiny_sd1


def test_plain_sd1_layout_file_loads_bit_exact(tmp_path) -> None:
    # plain SD1 files do not say the text encoder's head count: head width 64 is assumed (CLIP-L: 12 × 64)
    ref = build_tiny_sd1(seed=3, config=SD1Config(text=TextConfig(heads=1)))
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # other parts are ignored
    save_file(sd, str(tmp_path / "plain.safetensors"))  # no metadata: read like a real checkpoint
    m = load_base(tmp_path / "plain.safetensors")
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    assert torch.equal(m.alphas_cumprod, ref.alphas_cumprod)
    x = torch.randn(1, 4, 16, 16)
    c = ref.get_learned_conditioning(["a photo of sks"])
    torch.testing.assert_close(
        m.apply_model(x, torch.tensor([500]), c), ref.apply_model(x, torch.tensor([500]), c)
    )
    torch.testing.assert_close(m.get_learned_conditioning(["a photo of sks"]), c)


def test_sd15_sizes_read_from_shapes_and_bad_files(tmp_path) -> None:
    shapes = {k: tuple(v.shape) for k, v in full_sd15_tree().state_dict().items()}
    cfg = sd1_config_from_shapes(shapes)
    assert cfg["unet"]["model_channels"] == 320 and cfg["unet"]["channel_mult"] == [1, 2, 4, 4]
    assert cfg["unet"]["attention_resolutions"] == [1, 2, 4] and cfg["unet"]["context_dim"] == 768
    assert cfg["text"] == {
        "hidden_size": 768,
        "layers": 12,
        "heads": 12,
        "intermediate": 3072,
        "max_position_embeddings": 77,
    }
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(BaseModelError, match=r"not an SD1\.x checkpoint"):
        load_base(tmp_path / "other.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"PK")
    with pytest.raises(BaseModelError, match=r"only \.safetensors"):
        load_base(tmp_path / "model.ckpt")
