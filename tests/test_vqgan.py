"""Tests of vqkit's vqgan module (the VQGAN-class encoder/decoder, ``--arch vqgan``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vqkit.models import VQVAE, VQVAEConfig, export_safetensors, load_model
from vqkit.models.vqgan import AttnBlock, ResnetBlock, parse_vqgan_ch_mult

SMALL = dict(arch="vqgan", hidden=32, res_layers=1, num_embeddings=16, embedding_dim=8)


@pytest.mark.parametrize("factor", [4, 8, 16])
def test_shapes_levels_and_attention_at_the_lowest_resolution(factor):
    torch.manual_seed(0)
    model = VQVAE(image_size=32, downsample=factor, channel_mult="", **SMALL)
    x = torch.rand(2, 3, 32, 32) - 0.5
    out = model(x)
    assert out.recon.shape == x.shape
    assert out.vq.indices.shape == (2, 32 // factor, 32 // factor)
    levels = factor.bit_length()
    assert len(model.encoder.levels) == len(model.decoder.levels) == levels
    # attention in the blocks of the lowest level only (plus the middle blocks)
    enc_attn = [lvl.attn is not None for lvl in model.encoder.levels]
    dec_attn = [lvl.attn is not None for lvl in model.decoder.levels]  # deepest first
    assert enc_attn == [False] * (levels - 1) + [True]
    assert dec_attn == [True] + [False] * (levels - 1)
    # GroupNorm and SiLU, no BatchNorm or ReLU anywhere in the network
    kinds = {type(m).__name__ for m in model.encoder.modules()}
    assert "GroupNorm" in kinds and "BatchNorm2d" not in kinds
    widths = [32 * m for m in parse_vqgan_ch_mult("", factor)]
    assert model.encoder.out_channels == widths[-1]
    assert model.last_layer is model.decoder.conv_out.weight
    out.recon.sum().backward()  # every parameter but the codebook's gets a gradient
    missing = [n for n, p in model.named_parameters() if p.grad is None and "quantizer" not in n]
    assert not missing


def test_attention_block_against_a_float64_softmax():
    torch.manual_seed(1)
    block = AttnBlock(32).double()
    x = torch.randn(2, 32, 3, 5, dtype=torch.float64)
    h = block.norm(x)
    q, k, v = block.qkv(h).chunk(3, dim=1)
    q, k, v = (t.reshape(2, 32, 15) for t in (q, k, v))
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=-1)
    ref = x + block.proj(torch.einsum("bij,bcj->bci", w, v).reshape(2, 32, 3, 5))
    torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)


def test_resnet_block_formula_and_shortcut():
    torch.manual_seed(2)
    block = ResnetBlock(32, 64).double()
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    h = block.conv1(F.silu(F.group_norm(x, 32, block.norm1.weight, block.norm1.bias, 1e-6)))
    h = block.conv2(F.silu(F.group_norm(h, 32, block.norm2.weight, block.norm2.bias, 1e-6)))
    torch.testing.assert_close(block(x), block.shortcut(x) + h)
    assert ResnetBlock(32, 32).shortcut is None


def test_config_checks_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="res_hidden applies to arch 'classic'"):
        VQVAEConfig(arch="vqgan", res_hidden=16)
    with pytest.raises(ValueError, match="attn_resolutions applies to arch 'vqgan'"):
        VQVAEConfig(attn_resolutions="8")
    with pytest.raises(ValueError, match="multiples of 32"):
        VQVAEConfig(arch="vqgan", hidden=48)
    with pytest.raises(ValueError, match="needs 4 positive ints for downsample 8"):
        VQVAEConfig(arch="vqgan", downsample=8, channel_mult="1,2")
    with pytest.raises(ValueError, match="not feature-map sizes"):
        VQVAEConfig(arch="vqgan", image_size=32, attn_resolutions="7")
    with pytest.raises(ValueError, match="arch must be one of"):
        VQVAEConfig(arch="unet")
    cfg = VQVAEConfig(
        image_size=32, downsample=8, channel_mult="1, 1,2,2", attn_resolutions="4,8", **SMALL
    )
    assert (cfg.channel_mult, cfg.attn_resolutions) == ("1,1,2,2", "4,8")
    model = VQVAE(cfg)
    assert [lvl.attn is not None for lvl in model.encoder.levels] == [False, False, True, True]
    path = tmp_path / "m.safetensors"
    export_safetensors(model, path)
    again = load_model(path)
    assert again.config == cfg
    x = torch.rand(1, 3, 32, 32) - 0.5
    torch.testing.assert_close(again.eval()(x).recon, model.eval()(x).recon)


def test_classic_stays_the_default():
    assert VQVAEConfig().arch == "classic"
    model = VQVAE()
    assert model.last_layer is model.decoder.up2.weight
    assert not any("levels" in n for n, _ in model.named_parameters())
