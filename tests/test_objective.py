"""Tests of vqkit's objective module: which parameters each loss term reaches, the
generator/discriminator losses end to end on a small VQ-VAE, and bad input."""

from __future__ import annotations

import pytest
import torch

from vqkit.losses import LossOptions, VQGANLoss, disc_start_warning
from vqkit.models import VQVAE

SMALL = dict(hidden=16, res_hidden=8, res_layers=1, embedding_dim=8, num_embeddings=16)


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def _reached(module, prefix):
    return [
        n
        for n, g in _grads(module).items()
        if n.startswith(prefix) and g is not None and float(g.abs().sum()) > 0
    ]


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = VQVAE(in_channels=3, image_size=16, quantizer="vq", **SMALL)
    x = torch.rand(4, 3, 16, 16) - 0.5
    return model, x


def test_commitment_reaches_the_encoder_only_and_codebook_the_codes_only(setup):
    model, x = setup
    out = model(x)
    out.vq.losses["commitment"].backward(retain_graph=True)
    assert _reached(model, "encoder") and _reached(model, "pre_vq")
    assert not _reached(model, "quantizer") and not _reached(model, "decoder")
    model.zero_grad(set_to_none=True)
    out.vq.losses["codebook"].backward()
    assert _reached(model, "quantizer") == [
        n for n, _ in model.quantizer.named_parameters(prefix="quantizer")
    ]
    assert not _reached(model, "encoder") and not _reached(model, "pre_vq")
    assert not _reached(model, "decoder")
    # the weighted sum: beta on the commitment term (the one that moves the encoder)
    q = model.quantizer
    torch.testing.assert_close(
        out.vq.loss,
        q.codebook_weight * out.vq.losses["codebook"]
        + q.commitment_cost * out.vq.losses["commitment"],
    )


def test_discriminator_loss_never_reaches_the_generator(setup):
    model, x = setup
    loss = VQGANLoss(LossOptions(disc_weight=0.5, lecam_weight=0.1, disc_layers=2), in_channels=3)
    out = model(x)
    d = loss.discriminator_loss(x, out.recon, step=0)
    d["loss"].backward()
    assert all(g is None for g in _grads(model).values())
    assert len(_reached(loss, "discriminator")) == len(loss.discriminator_parameters())
    assert {"d_loss", "lecam", "logits_real", "logits_fake"} <= set(d)


def test_generator_adversarial_loss_never_changes_the_discriminator(setup):
    model, x = setup
    loss = VQGANLoss(LossOptions(disc_weight=0.5, disc_layers=2), in_channels=3)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    out = model(x)
    g = loss.generator_loss(x, out.recon, out.vq.loss, model.last_layer, step=0)
    g["loss"].backward()
    assert all(p.grad is None for p in loss.parameters())
    assert all(torch.equal(before[k], v) for k, v in loss.state_dict().items())
    assert _reached(model, "decoder") and _reached(model, "encoder")
    # the total is nll + lambda * disc_weight * g_loss + vq, lambda the adaptive weight
    torch.testing.assert_close(g["loss"], g["nll"] + g["d_weight"] * g["g_loss"] + out.vq.loss)
    assert float(g["d_weight"]) > 0


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_the_adversarial_gradient_itself_reaches_the_tokenizer(setup, adaptive, kind):
    """The reconstruction term reaches the decoder as well, so "the decoder got a
    gradient" cannot tell whether the adversarial term did: here the adversarial part of
    the loss, ``loss - nll - vq``, is differentiated alone, and its gradient at the
    decoder's last layer must equal ``d_weight * dG/dw`` of a float64 copy (G: -mean D
    for hinge, mean softplus(-D) for the non-saturating loss) and reach the encoder."""
    import copy

    model, x = setup
    loss = VQGANLoss(
        LossOptions(disc_weight=0.5, disc_layers=2, disc_loss=kind, adaptive_disc_weight=adaptive),
        in_channels=3,
    )
    out = model(x)
    g = loss.generator_loss(x, out.recon, out.vq.loss, model.last_layer, step=0)
    adversarial = g["loss"] - g["nll"] - out.vq.loss  # = d_weight * g_loss, d_weight detached
    params = [model.last_layer, *model.encoder.parameters()]
    grads = torch.autograd.grad(adversarial, params, allow_unused=True)
    got, enc = grads[0], grads[1:]
    assert got is not None and float(got.abs().sum()) > 0
    assert any(e is not None and float(e.abs().sum()) > 0 for e in enc)  # straight-through
    # the float64 reference: the same weights, the discriminator in training mode (batch
    # statistics, as frozen() keeps it), the generator's loss written out here
    model64, disc64 = copy.deepcopy(model).double(), copy.deepcopy(loss.discriminator).double()
    logits = disc64(model64(x.double()).recon)
    ref_g = -logits.mean() if kind == "hinge" else torch.nn.functional.softplus(-logits).mean()
    (ref,) = torch.autograd.grad(ref_g, model64.last_layer)
    torch.testing.assert_close(g["g_loss"].double(), ref_g.detach(), rtol=1e-4, atol=1e-6)
    want = float(g["d_weight"]) * ref
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_disc_start_switches_the_adversarial_terms(setup):
    model, x = setup
    loss = VQGANLoss(
        LossOptions(disc_weight=1.0, disc_start=10, rec_loss="l1", disc_layers=2), in_channels=3
    )
    out = model(x)
    assert loss.discriminator_loss(x, out.recon, step=9) is None
    g = loss.generator_loss(x, out.recon, out.vq.loss, model.last_layer, step=9)
    assert set(g) == {"rec", "nll", "loss"}
    torch.testing.assert_close(g["rec"], (out.recon - x).abs().mean())
    assert loss.discriminator_loss(x, out.recon, step=10) is not None
    assert disc_start_warning(loss.options, 10) and "never switches on" in disc_start_warning(
        loss.options, 10
    )
    assert disc_start_warning(loss.options, 11) is None
    assert VQGANLoss(LossOptions(), 1).discriminator_parameters() == []


def test_bad_input_is_one_clear_line(setup, tmp_path):
    model, x = setup
    with pytest.raises(ValueError, match="needs --perceptual-weights FILE"):
        LossOptions(perceptual_weight=1.0)
    opts = LossOptions(perceptual_weight=1.0, perceptual_weights=str(tmp_path / "vgg.pth"))
    with pytest.raises(ValueError, match="needs RGB images; the model has 1 channel"):
        VQGANLoss(opts, in_channels=1)
    with pytest.raises(
        ValueError, match="VGG16 weights file .*vgg.pth not found: .*vgg16-397923af.pth"
    ):
        VQGANLoss(opts, in_channels=3)
    with pytest.raises(ValueError, match="needs images of at least 24 px; .*--disc-layers"):
        VQGANLoss(LossOptions(disc_weight=1.0), 3).discriminator_loss(x, x, step=0)
    loss = VQGANLoss(LossOptions(disc_weight=1.0, disc_layers=2), in_channels=3)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="discriminator's loss is nan at step 3"):
        loss.discriminator_loss(bad, model(x).recon, step=3)
    with pytest.raises(ValueError, match="disc_loss must be one of"):
        LossOptions(disc_loss="wgan")


def test_without_a_discriminator_l2_is_the_classic_loss(setup):
    model, x = setup
    out = model(x)
    loss = VQGANLoss(LossOptions(), in_channels=3)
    got = loss.generator_loss(x, out.recon, out.vq.loss, model.last_layer, 0, rec_scale=1 / 0.06)
    torch.testing.assert_close(got["loss"], model.loss(out, x, 0.06)["loss"])


def test_checkpoint_state_round_trip(setup):
    model, x = setup
    opts = LossOptions(disc_weight=1.0, disc_layers=2, lecam_weight=0.1)
    a, b = VQGANLoss(opts, 3), VQGANLoss(opts, 3)
    a.discriminator_loss(x, model(x).recon, step=0)  # moves BN statistics and anchors
    b.load_checkpoint_state(a.checkpoint_state())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    with pytest.raises(ValueError, match="loss options need"):
        VQGANLoss(LossOptions(), 3).load_checkpoint_state(a.checkpoint_state())
