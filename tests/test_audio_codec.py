"""AudioCodec: lengths, bitrate, fewer stages, quantizer dropout, options, state dict,
pretrained directory, a tiny overfit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vqkit.errors import UserError
from vqkit.models import AudioCodec, AudioCodecConfig

# hop 8, 2 kHz: 250 frames/s; 3 stages of K = 32 (5 bits)
SMALL = {
    "sample_rate": 2000, "seanet_channels": 4, "strides": "2,4", "embedding_dim": 8,
    "num_quantizers": 3, "num_embeddings": 32,
}  # fmt: skip


def small(**kw: object) -> AudioCodec:
    torch.manual_seed(0)
    return AudioCodec(**{**SMALL, **kw})


def test_defaults_are_a_cpu_codec() -> None:
    m = AudioCodec()
    c = m.config
    assert (c.sample_rate, c.strides, c.quantizer, c.num_quantizers) == (8000, "2,4,5,8", "rvq", 8)
    assert c.quantizer_dropout == 0.5 and c.embedding_dim == 64
    assert m.hop == 320 and m.frames_per_second == 25.0
    assert m.bitrate() == 25 * 8 * math.log2(512) == 1800.0
    assert sum(p.numel() for p in m.parameters()) < 3_000_000


@pytest.mark.parametrize("length", [8, 64, 100, 1, 7, 333])
def test_lengths(length: int) -> None:
    m = small().eval()
    x = torch.randn(2, 1, length) * 0.1
    out = m(x)
    frames = -(-length // 8)
    assert out.recon.shape == x.shape
    assert out.vq.indices.shape == (2, frames, 3)
    codes = m.encode(x)
    assert codes.shape == (2, frames, 3) and codes.dtype == torch.int64
    assert m.decode(codes).shape == (2, 1, frames * 8)
    y = m.decode(codes, length=length)
    assert y.shape == x.shape
    torch.testing.assert_close(y, out.recon)  # eval forward = encode -> decode


def test_bitrate_arithmetic() -> None:
    m = small()
    assert m.frames_per_second == 250.0
    assert [m.bitrate(n) for n in (1, 2, 3)] == [1250.0, 2500.0, 3750.0]
    assert m.bitrate() == m.bitrate(3)
    net = {k: v for k, v in SMALL.items() if k not in ("num_quantizers", "num_embeddings")}
    fsq = AudioCodec(**net, quantizer="fsq", levels="8,5,5,5")
    assert fsq.num_stages == 1 and fsq.bitrate() == pytest.approx(250 * math.log2(1000))
    for bad in (0, 4, 1.5, True):
        with pytest.raises(UserError, match="num_stages"):
            m.bitrate(bad)


def test_fewer_stages_lower_bitrate_and_decode() -> None:
    m = small().eval()
    x = torch.randn(1, 1, 80) * 0.1
    full = m.encode(x)
    errs = []
    for n in (1, 2, 3):
        codes = m.encode(x, num_stages=n)
        assert codes.shape == (1, 10, n)
        assert torch.equal(codes, full[..., :n])  # leading stages of the full code
        y = m.decode(codes, length=80)
        assert y.shape == x.shape and torch.isfinite(y).all()
        errs.append(m.bitrate(n))
    assert errs == sorted(errs) and len(set(errs)) == 3
    # fewer stages decode differently (a coarser reconstruction), not silently the same
    assert not torch.equal(m.decode(full[..., :1]), m.decode(full))


def test_quantizer_dropout_only_in_training() -> None:
    m = small(quantizer_dropout=1.0)
    x = torch.randn(16, 1, 32) * 0.1
    torch.manual_seed(1)
    m.train()
    idx = m(x).vq.indices
    assert (idx == -1).any()  # some clips used fewer stages
    assert (idx[..., 0] >= 0).all()  # the first stage always runs
    m.eval()
    assert (m(x).vq.indices >= 0).all()


def test_padding_mask_from_lengths() -> None:
    m = small()
    mask = m.frame_mask(torch.tensor([8, 9, 64]), 8)
    assert mask.sum(1).tolist() == [7, 6, 0]
    out = m(torch.randn(3, 1, 64) * 0.1, lengths=torch.tensor([8, 9, 64]))
    assert out.recon.shape == (3, 1, 64)


def test_state_dict_round_trip(tmp_path) -> None:
    a = small(activation="snake", causal=True).eval()
    x = torch.randn(1, 1, 50) * 0.1
    with torch.no_grad():  # move the snake alphas off their init
        for p in a.parameters():
            p.add_(0.01)
    b = AudioCodec(AudioCodecConfig.from_dict(a.config.to_dict()))
    b.load_state_dict(a.state_dict())
    b.eval()
    torch.testing.assert_close(b(x).recon, a(x).recon)
    a.save_pretrained(tmp_path / "codec")
    c = AudioCodec.from_pretrained(tmp_path / "codec")
    assert c.config.to_dict() == a.config.to_dict()
    assert torch.equal(c.encode(x), a.encode(x))
    torch.testing.assert_close(c.decode(c.encode(x), 50), a.decode(a.encode(x), 50))
    assert "kbit/s" in (tmp_path / "codec" / "README.md").read_text()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"strides": "2,0"}, "strides"),
        ({"strides": ""}, "strides"),
        ({"activation": "relu"}, "activation"),
        ({"sample_rate": 0}, "sample_rate"),
        ({"quantizer": "multiscale"}, "frame"),
        ({"quantizer": "fsq", "quantizer_dropout": 0.0}, "quantizer_dropout"),
        ({"seanet_channels": 1024, "strides": "2,2,2,2,2,2"}, "8192"),
        ({"num_quantizers": 0}, "num_quantizers"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_bad_options_one_line(kw: dict, match: str) -> None:
    with pytest.raises((UserError, TypeError)) as e:
        AudioCodec(**kw)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_bad_input_one_line() -> None:
    m = small().eval()
    cases = [
        (lambda: m.encode(torch.randn(2, 80)), "(B, 1, L)"),
        (lambda: m.encode(torch.zeros(1, 1, 8, dtype=torch.int16)), "float"),
        (lambda: m.encode(torch.randn(1, 1, 8), num_stages=4), "num_stages"),
        (lambda: m.decode(torch.zeros(1, 5, 3, dtype=torch.long), length=41), "length"),
        (lambda: m.decode(torch.zeros(1, 5, dtype=torch.long)), "(B, T, n)"),
        (lambda: m.decode(torch.full((1, 5, 3), 32)), "32"),
    ]
    for fn, match in cases:
        with pytest.raises(UserError) as e:
            fn()
        assert match in str(e.value) and "\n" not in str(e.value)


def test_tiny_overfit() -> None:
    # one 0.1 s clip (two tones at 2 kHz); 40 Adam steps must cut the L1 error by > 2x
    torch.manual_seed(0)
    m = AudioCodec(**{**SMALL, "quantizer_dropout": 0.0, "seanet_channels": 8})
    t = torch.arange(200) / 2000
    x = 0.4 * torch.sin(2 * math.pi * 110 * t) + 0.2 * torch.sin(2 * math.pi * 330 * t)
    x = x.view(1, 1, -1)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = m(x)
        l1 = F.l1_loss(out.recon, x)
        opt.zero_grad()
        (l1 + out.vq.loss).backward()
        opt.step()
        losses.append(l1.item())
    m.eval()
    final = F.l1_loss(m.decode(m.encode(x), 200), x).item()
    print(f"L1 {losses[0]:.4f} -> {final:.4f} (eval, encode -> decode)")
    assert final < losses[0] / 2, (losses[0], final)
