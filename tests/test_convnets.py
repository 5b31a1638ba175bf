"""Encoder/decoder with a configurable downsampling factor; the classic model unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqkit.models import VQVAE, VQVAEConfig
from vqkit.models.convnets import Decoder, Encoder, parse_channel_mult

# --- the classic Encoder/Decoder exactly as models/vqvae.py had them before convnets.py ---


class _OldResidualBlock(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


class _OldResidualStack(nn.Module):
    def __init__(self, channels: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_OldResidualBlock(channels, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return F.relu(x)


class _OldEncoder(nn.Module):
    def __init__(self, in_channels: int, hidden: int, res_hidden: int, res_layers: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden // 2, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.res = _OldResidualStack(hidden, res_hidden, res_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.res(self.conv3(x))


class _OldDecoder(nn.Module):
    def __init__(
        self, embedding_dim: int, hidden: int, out_channels: int, res_hidden: int, res_layers: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(embedding_dim, hidden, 3, padding=1)
        self.res = _OldResidualStack(hidden, res_hidden, res_layers)
        self.up1 = nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(hidden // 2, out_channels, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.res(self.conv1(z))
        return self.up2(F.relu(self.up1(x)))


# ------------------------------------------------------------------------------- tests


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)  # same names in the same order
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("res_layers", [0, 2])
def test_classic_encoder_decoder_identical_to_old_code(res_layers):
    torch.manual_seed(0)
    old_e = _OldEncoder(3, 32, 8, res_layers)
    old_d = _OldDecoder(16, 32, 3, 8, res_layers)
    torch.manual_seed(0)
    new_e = Encoder(3, 32, 8, res_layers)
    new_d = Decoder(16, 32, 3, 8, res_layers)
    # seeded construction draws the same initial weights (same creation order)
    _same_state(old_e, new_e)
    _same_state(old_d, new_d)
    x = torch.randn(2, 3, 16, 16)
    z = torch.randn(2, 16, 4, 4)
    assert torch.equal(old_e(x), new_e(x))
    assert torch.equal(old_d(z), new_d(z))


def test_classic_vqvae_parameters_unchanged_and_old_weights_load():
    model = VQVAE(hidden=32, res_hidden=8, num_embeddings=16, embedding_dim=8)
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    old_e, old_d = _OldEncoder(3, 32, 8, 2), _OldDecoder(8, 32, 3, 8, 2)
    want = {f"encoder.{k}": tuple(v.shape) for k, v in old_e.state_dict().items()}
    want |= {f"decoder.{k}": tuple(v.shape) for k, v in old_d.state_dict().items()}
    got = {k: s for k, s in names.items() if k.startswith(("encoder.", "decoder."))}
    assert got == want
    assert names["pre_vq.weight"] == (8, 32, 1, 1)
    # an "old checkpoint": weights of the old modules load strictly into the new model
    state = model.state_dict()
    state.update({f"encoder.{k}": v for k, v in old_e.state_dict().items()})
    state.update({f"decoder.{k}": v for k, v in old_d.state_dict().items()})
    model.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, 16, 16) - 0.5
    assert torch.equal(model.encoder(x), old_e(x))
    # a config dict written before the new fields existed gets the classic defaults
    d = model.config.to_dict()
    del d["downsample"], d["channel_mult"]
    assert VQVAEConfig.from_dict(d).downsample == 4


@pytest.mark.parametrize(
    ("factor", "mult", "latent_ch"), [(8, "", 32), (8, "2", 64), (16, "", 32), (16, "2,3", 96)]
)
def test_factor_8_and_16_shapes(factor, mult, latent_ch):
    enc = Encoder(3, 32, 8, 1, downsample=factor, channel_mult=mult)
    dec = Decoder(8, 32, 3, 8, 1, downsample=factor, channel_mult=mult)
    x = torch.randn(2, 3, 64, 32)
    h = enc(x)
    assert h.shape == (2, latent_ch, 64 // factor, 32 // factor)
    assert enc.out_channels == latent_ch
    assert dec(torch.randn(2, 8, 64 // factor, 32 // factor)).shape == (2, 3, 64, 32)


@pytest.mark.parametrize("factor", [4, 8, 16])
@pytest.mark.parametrize("quantizer", ["ema", "rvq"])
def test_vqvae_index_maps_follow_the_factor(factor, quantizer):
    model = VQVAE(
        image_size=32,
        hidden=16,
        res_hidden=4,
        res_layers=1,
        num_embeddings=8,
        embedding_dim=4,
        quantizer=quantizer,
        **({"num_quantizers": 2} if quantizer == "rvq" else {}),
        downsample=factor,
        channel_mult="2" * (factor > 4) + ",2" * (factor > 8),
    )
    x = torch.rand(3, 3, 32, 32) - 0.5
    idx = model.encode(x)
    want = (3, 32 // factor, 32 // factor) + ((2,) if quantizer == "rvq" else ())
    assert idx.shape == want
    assert model.decode(idx).shape == x.shape
    out = model(x)
    assert out.recon.shape == x.shape
    VQVAE.loss(out, x, 0.06)["loss"].backward()


def test_config_validation_and_canonical_form():
    with pytest.raises(ValueError, match="multiple of downsample=16"):
        VQVAEConfig(image_size=40, downsample=16)
    with pytest.raises(ValueError, match="downsample must be one of"):
        VQVAEConfig(downsample=2)
    with pytest.raises(ValueError, match="needs 1 value"):
        VQVAEConfig(downsample=8, channel_mult="2,2")
    with pytest.raises(ValueError, match="needs 0 value"):
        VQVAEConfig(channel_mult="2")
    with pytest.raises(ValueError, match=">= 1"):
        VQVAEConfig(downsample=8, channel_mult="0")
    with pytest.raises(ValueError, match="comma-separated ints"):
        VQVAEConfig(downsample=8, channel_mult="x")
    c = VQVAEConfig(image_size=64, downsample=16, channel_mult=" 2, 4 ")
    assert c.channel_mult == "2,4"
    assert VQVAEConfig.from_dict(c.to_dict()).to_dict() == c.to_dict()
    assert parse_channel_mult("", 16) == (1, 1)
    model = VQVAE(
        image_size=16, hidden=16, res_hidden=4, num_embeddings=8, embedding_dim=4, downsample=8
    )
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.zeros(1, 3, 12, 12))
