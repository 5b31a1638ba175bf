"""SEANet encoder / decoder: lengths, hop, causality, snake against float64."""

from __future__ import annotations

import pytest
import torch

from vqkit.models.seanet import SEANetDecoder, SEANetEncoder, Snake1d, hop_length, snake

SMALL = {"channels": 4, "strides": (2, 3), "dim": 8}  # hop 6: fast


@pytest.mark.parametrize("activation", ["elu", "snake"])
@pytest.mark.parametrize("length", [6, 12, 60, 61, 1, 5])
def test_lengths(activation: str, length: int) -> None:
    torch.manual_seed(0)
    enc = SEANetEncoder(**SMALL, activation=activation)
    dec = SEANetDecoder(**SMALL, activation=activation)
    z = enc(torch.randn(2, 1, length))
    frames = -(-length // 6)
    assert z.shape == (2, 8, frames)
    assert dec(z).shape == (2, 1, frames * 6)  # multiples of the hop: exactly the input


def test_default_hop_and_frames() -> None:
    enc, dec = SEANetEncoder(), SEANetDecoder()
    assert enc.hop == hop_length((2, 4, 5, 8)) == 320
    x = torch.randn(1, 1, 8000)  # one second at 8 kHz: 25 frames
    z = enc(x)
    assert z.shape == (1, 64, 25)
    assert dec(z).shape == x.shape


def test_padding_rule_pads_with_zeros() -> None:
    # a length that is not a multiple of the hop is zero-padded up: the same latents
    torch.manual_seed(0)
    enc = SEANetEncoder(**SMALL)
    x = torch.randn(1, 1, 10)
    padded = torch.cat([x, torch.zeros(1, 1, 2)], dim=-1)
    torch.testing.assert_close(enc(x), enc(padded))


@pytest.mark.parametrize("activation", ["elu", "snake"])
def test_causal_encoder_and_decoder(activation: str) -> None:
    torch.manual_seed(0)
    kw = {**SMALL, "activation": activation}
    enc = SEANetEncoder(**kw, causal=True)
    dec = SEANetDecoder(**kw, causal=True)
    x = torch.randn(1, 1, 60)
    y = x.clone()
    y[..., 30] += 1.0  # sample 30 is in frame 5 (hop 6)
    za, zb = enc(x), enc(y)
    assert torch.equal(za[..., :5], zb[..., :5])  # frames t < 30 // 6 do not see it
    assert not torch.equal(za[..., 5:], zb[..., 5:])
    z2 = za.clone()
    z2[..., 4] += 1.0  # frame 4 decodes into samples >= 24 only
    a, b = dec(za), dec(z2)
    assert torch.equal(a[..., :24], b[..., :24])
    assert not torch.equal(a[..., 24:], b[..., 24:])


def test_non_causal_sees_the_future() -> None:
    torch.manual_seed(0)
    enc = SEANetEncoder(**SMALL, causal=False)
    x = torch.randn(1, 1, 60)
    y = x.clone()
    y[..., 30] += 1.0
    assert not torch.equal(enc(x)[..., :5], enc(y)[..., :5])


def test_snake_against_float64() -> None:
    torch.manual_seed(0)
    act = Snake1d(3)
    with torch.no_grad():
        act.alpha.copy_(torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1))
    x = torch.randn(2, 3, 17, requires_grad=True)
    xd = x.detach().double().requires_grad_()
    a = act.alpha.detach().double()
    ref = xd + torch.sin(a * xd) ** 2 / a
    out = act(x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)
    assert act.alpha.grad is not None and act.alpha.grad.shape == (1, 3, 1)
    # alpha -> 0 stays finite (the 1e-9 guard): x + sin(0)^2 / 1e-9 = x
    torch.testing.assert_close(snake(x, torch.zeros(1, 3, 1)), x)


def test_weight_norm_optional() -> None:
    with_wn = SEANetEncoder(**SMALL, weight_norm=True).state_dict()
    plain = SEANetEncoder(**SMALL, weight_norm=False).state_dict()
    assert any("original0" in k for k in with_wn)
    assert not any("original0" in k for k in plain)


def test_channels_double_per_stage() -> None:
    enc = SEANetEncoder(channels=4, strides=(2, 2, 2), dim=8, weight_norm=False)
    widths = [m.out_channels for m in enc.modules() if isinstance(m, torch.nn.Conv1d)]
    assert widths[0] == 4 and 32 in widths and widths[-1] == 8


@pytest.mark.parametrize(
    "kw", [{"strides": ()}, {"strides": (2, 0)}, {"activation": "relu"}, {"channels": 0}]
)
def test_bad_arguments(kw: dict) -> None:
    with pytest.raises(ValueError):
        SEANetEncoder(**{**SMALL, **kw})


def test_bad_input_shape() -> None:
    with pytest.raises(ValueError, match=r"\(B, 1, L\)"):
        SEANetEncoder(**SMALL)(torch.randn(2, 2, 12))
