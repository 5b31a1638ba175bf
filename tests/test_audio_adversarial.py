"""Tests of vqkit's audio_adversarial module: the discriminators' shapes on odd lengths,
the hinge / least-squares and feature-matching terms against hand-computed and float64
references, finite gradients; the codec job's loss (AudioAdversarialLoss): its one
forward of real and fake equals separate forwards, the discriminators frozen in the
generator's terms, nothing before disc_start, a non-finite loss in one line."""

from __future__ import annotations

import math

import pytest
import torch

from vqkit.errors import UserError
from vqkit.losses.audio_adversarial import (
    AudioAdversarialLoss,
    AudioAdversarialOptions,
    AudioDiscriminator,
    MultiPeriodDiscriminator,
    MultiScaleSTFTDiscriminator,
    audio_discriminator_loss,
    audio_generator_loss,
    feature_matching_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _ceil3(n: int, times: int) -> int:
    for _ in range(times):
        n = -(-n // 3)
    return n


@pytest.mark.parametrize("length", [1, 7, 101, 777, 1001])
def test_period_discriminator_shapes_on_odd_lengths(length):
    mpd = MultiPeriodDiscriminator(channels=(4, 8))
    out = mpd(torch.randn(2, 1, length))
    assert len(out) == 5
    for p, (logits, feats) in zip((2, 3, 5, 7, 11), out, strict=True):
        rows = -(-length // p)
        assert logits.shape == (2, 1, _ceil3(rows, 2), p)
        assert [f.shape[1] for f in feats] == [4, 8, 8]
        assert all(bool(torch.isfinite(f).all()) for f in [logits, *feats])


@pytest.mark.parametrize("length", [33, 257, 777, 1001])
def test_stft_discriminator_shapes_on_odd_lengths(length):
    msd = MultiScaleSTFTDiscriminator(((64, 16, 64), (128, 32, 100)), channels=4)
    out = msd(torch.randn(3, 1, length))
    for (n_fft, hop), (logits, feats) in zip(((64, 16), (128, 32)), out, strict=True):
        frames, bins = length // hop + 1, n_fft // 2 + 1
        assert feats[0].shape == (3, 4, frames, bins)
        assert logits.shape == (3, 1, frames, _halve(bins, 3))
        assert len(feats) == 5 and bool(torch.isfinite(logits).all())


def _halve(n: int, times: int) -> int:
    for _ in range(times):
        n = (n - 1) // 2 + 1  # kernel 9, padding 4, stride 2
    return n


def test_hinge_and_least_squares_against_hand_computed_values():
    real = [(torch.tensor([0.5, 2.0, -1.0]), []), (torch.tensor([[3.0]]), [])]
    fake = [(torch.tensor([0.5, -2.0, 1.0]), []), (torch.tensor([[-0.5]]), [])]
    # disc 1: mean relu(1 - r) = (0.5 + 0 + 2) / 3, mean relu(1 + f) = (1.5 + 0 + 2) / 3
    # disc 2: relu(1 - 3) = 0, relu(1 - 0.5) = 0.5
    d = ((2.5 + 3.5) / 3 + 0.5) / 2
    assert float(audio_discriminator_loss(real, fake)) == pytest.approx(d)
    # generator: mean relu(1 - f): (0.5 + 3 + 0) / 3 and 1.5
    assert float(audio_generator_loss(fake)) == pytest.approx((3.5 / 3 + 1.5) / 2)
    # least squares: (1 - r)^2 + f^2 per disc
    d1 = (0.25 + 1 + 4) / 3 + (0.25 + 4 + 1) / 3
    d2 = 4 + 0.25
    ls = audio_discriminator_loss(real, fake, "least_squares")
    assert float(ls) == pytest.approx((d1 + d2) / 2)
    g = ((0.25 + 9 + 0) / 3 + 2.25) / 2
    assert float(audio_generator_loss(fake, "least_squares")) == pytest.approx(g)
    with pytest.raises(UserError, match="disc_loss"):
        audio_generator_loss(fake, "wasserstein")


def test_feature_matching_against_references():
    # hand: layer 1 mean|r - f| = 1, mean|r| = 1.5; layer 2: 2 / 3; disc 2: 0.5 / 0.5
    real = [
        (None, [torch.tensor([1.0, -2.0]), torch.tensor([3.0])]),
        (None, [torch.tensor([-0.5])]),
    ]
    fake = [(None, [torch.tensor([0.0, -1.0]), torch.tensor([1.0])]), (None, [torch.tensor([0.0])])]
    assert float(feature_matching_loss(real, fake)) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # float64 reference on random feature maps of two sub-discriminators
    g = torch.Generator().manual_seed(0)
    shapes = [[(2, 4, 5, 3), (2, 8, 2, 3)], [(2, 4, 9, 7)]]
    real = [(None, [torch.randn(s, generator=g) for s in d]) for d in shapes]
    fake = [(None, [torch.randn(s, generator=g) for s in d]) for d in shapes]
    terms = []
    for (_, fr), (_, ff) in zip(real, fake, strict=True):
        for a, b in zip(fr, ff, strict=True):
            a, b = a.double(), b.double()
            terms.append(float((a - b).abs().sum() / a.abs().sum()))
    assert float(feature_matching_loss(real, fake)) == pytest.approx(
        math.fsum(terms) / len(terms), rel=1e-6
    )


def test_gradients_reach_the_waveform_and_the_discriminators():
    torch.manual_seed(0)
    mpd = MultiPeriodDiscriminator(channels=(4, 8))
    msd = MultiScaleSTFTDiscriminator(((64, 16, 64),), channels=4)
    x = 0.3 * torch.randn(2, 1, 401)
    y = (0.3 * torch.randn(2, 1, 401)).requires_grad_()
    real, fake = mpd(x) + msd(x), mpd(y) + msd(y)
    loss = audio_generator_loss(fake) + feature_matching_loss(real, fake)
    loss.backward()
    assert y.grad is not None and bool(torch.isfinite(y.grad).all()) and y.grad.abs().sum() > 0
    for d in (mpd, msd):
        d.zero_grad()
    d_loss = audio_discriminator_loss(mpd(x) + msd(x), mpd(y.detach()) + msd(y.detach()))
    d_loss.backward()
    grads = [p.grad for p in [*mpd.parameters(), *msd.parameters()]]
    assert all(gr is not None and bool(torch.isfinite(gr).all()) for gr in grads)
    with pytest.raises(UserError, match=r"\(B, 1, L\)"):
        mpd(torch.randn(2, 401))


@pytest.mark.parametrize(("kinds", "count"), [("mpd", 5), ("stft", 3), ("mpd+stft", 8)])
def test_audio_discriminator_holds_the_named_kinds(kinds, count):
    d = AudioDiscriminator(kinds, channels=2)
    assert len(d(torch.randn(2, 1, 300))) == count
    with pytest.raises(UserError, match="audio_disc must be one of"):
        AudioDiscriminator("none")


@pytest.mark.parametrize("kind", ["hinge", "least_squares"])
def test_adversarial_loss_equals_separate_forwards_in_float64(kind):
    """One forward of cat([real, fake]) gives the terms of two separate forwards (float64
    reference); the generator's terms leave no gradient in the discriminators and keep
    their requires_grad; nothing before disc_start."""
    torch.manual_seed(0)
    opts = AudioAdversarialOptions(
        audio_disc="mpd+stft", audio_disc_loss=kind, audio_disc_channels=2, disc_start=2,
        adv_weight=0.7, feat_match_weight=1.3,
    )  # fmt: skip
    loss = AudioAdversarialLoss(opts).double()
    x = 0.3 * torch.randn(3, 1, 333, dtype=torch.float64)
    y = (0.3 * torch.randn(3, 1, 333, dtype=torch.float64)).requires_grad_()
    assert loss.generator_loss(x, y, step=1) == {} and loss.discriminator_loss(x, y, 1) is None
    g = loss.generator_loss(x, y, step=2)
    d_net = loss.discriminator
    real, fake = d_net(x), d_net(y)
    want_g = audio_generator_loss(fake, kind)
    want_fm = feature_matching_loss(real, fake)
    torch.testing.assert_close(g["g_adv"], want_g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g["feat_match"], want_fm, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g["loss"], 0.7 * want_g + 1.3 * want_fm)
    g["loss"].backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None and p.requires_grad for p in d_net.parameters())
    d = loss.discriminator_loss(x, y, step=2)
    torch.testing.assert_close(d["d_loss"], audio_discriminator_loss(real, d_net(y.detach()), kind))
    d["loss"].backward()
    assert all(p.grad is not None for p in d_net.parameters())


def test_adversarial_loss_state_and_bad_input():
    opts = AudioAdversarialOptions(audio_disc="stft", audio_disc_channels=2)
    loss = AudioAdversarialLoss(opts)
    assert set(loss.checkpoint_state()) == {"discriminator"}
    other = AudioAdversarialLoss(opts)
    other.load_checkpoint_state(loss.checkpoint_state())
    for a, b in zip(loss.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    assert AudioAdversarialLoss(AudioAdversarialOptions()).discriminator_parameters() == []
    x = torch.randn(2, 1, 300)
    bad = x.clone()
    bad[0, 0, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="discriminator's loss is nan at step 0"):
        loss.discriminator_loss(bad, x, step=0)
    for kw, match in (
        ({"audio_disc": "gan"}, "audio_disc must be one of"),
        ({"audio_disc_loss": "wgan"}, "audio_disc_loss must be one of"),
        ({"audio_disc_channels": 0}, "audio_disc_channels must be a positive int"),
        ({"adv_weight": -1.0}, "adv_weight must be >= 0"),
    ):
        with pytest.raises(UserError, match=match):
            AudioAdversarialOptions(**kw)
