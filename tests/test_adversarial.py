"""Tests of vqkit's adversarial module: the PatchGAN discriminator, GAN losses against
their formulas, the adaptive weight against a hand computation, LeCAM, frozen."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from vqkit.losses.adversarial import (
    LeCAM,
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    frozen,
    generator_loss,
)


def test_patch_discriminator_layout():
    torch.manual_seed(0)
    d = PatchDiscriminator(3, 8, 3)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules()) == 3
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # pix2pix's 70x70 patches
    assert d.min_size == 24
    with pytest.raises(ValueError, match="needs images of at least 24 px"):
        d(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="needs >= 1 layer"):
        PatchDiscriminator(3, 8, 0)


def test_gan_losses_match_their_formulas():
    r = torch.tensor([2.0, 0.5, -1.0])
    f = torch.tensor([-2.0, 0.0, 1.5])
    hinge = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 2.5) / 3)
    assert float(discriminator_loss(r, f, "hinge")) == pytest.approx(hinge)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    ns = 0.5 * (sum(sp(-v) for v in r.tolist()) / 3 + sum(sp(v) for v in f.tolist()) / 3)
    assert float(discriminator_loss(r, f, "non_saturating")) == pytest.approx(ns)
    assert float(generator_loss(f, "hinge")) == pytest.approx(-sum(f.tolist()) / 3)
    assert float(generator_loss(f, "non_saturating")) == pytest.approx(
        sum(sp(-v) for v in f.tolist()) / 3
    )
    with pytest.raises(ValueError, match="disc_loss must be one of"):
        generator_loss(f, "wgan")


def test_adaptive_weight_against_a_hand_computation():
    # last layer W (2x3), recon = W h; L_rec = sum (recon - x)^2, L_G = -a . recon
    w = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], requires_grad=True)
    h = torch.tensor([1.0, 2.0, -1.0])
    x = torch.tensor([0.3, -0.7])
    a = torch.tensor([0.2, -0.4])
    recon = w @ h
    l_rec = (recon - x).pow(2).sum()
    l_g = -(a * recon).sum()
    lam = adaptive_weight(l_rec, l_g, w)
    # by hand: dL_rec/dW = 2 (Wh - x) h^T, dL_G/dW = -a h^T; norms factor through ||h||
    r = [0.5 * 1 - 1.0 * 2 + 2.0 * -1 - 0.3, 1.5 * 1 + 0.25 * 2 - 0.5 * -1 + 0.7]
    hn = math.sqrt(1 + 4 + 1)
    want = 2 * math.hypot(*r) * hn / (math.hypot(0.2, 0.4) * hn + 1e-4)
    assert float(lam) == pytest.approx(want, rel=1e-6)
    assert not lam.requires_grad and w.grad is None  # detached; nothing accumulated
    # the clamp: a vanishing adversarial gradient gives taming's ceiling 1e4
    lam = adaptive_weight((w @ h).pow(2).sum(), 1e-12 * (w @ h).sum(), w)
    assert float(lam) == 1e4
    with pytest.raises(ValueError, match="carry gradients"):
        adaptive_weight(l_rec.detach(), l_g, w)


def test_frozen_leaves_the_discriminator_untouched():
    torch.manual_seed(1)
    d = PatchDiscriminator(3, 8, 2)
    before = {k: v.clone() for k, v in d.state_dict().items()}
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    with frozen(d):
        out = d(x)
    out.sum().backward()
    assert x.grad is not None
    assert all(p.grad is None for p in d.parameters())
    after = d.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats too
    assert all(p.requires_grad for p in d.parameters())
    d(x)  # outside the block the running statistics update again
    assert not torch.equal(before["main.3.running_mean"], d.state_dict()["main.3.running_mean"])


def test_lecam():
    reg = LeCAM(decay=0.5)
    r1, f1 = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    # first batch sets the anchors: ema_real = 2, ema_fake = -0.5
    v = reg(r1, f1)
    want = F.relu(r1 + 0.5).pow(2).mean() + F.relu(2.0 - f1).pow(2).mean()
    torch.testing.assert_close(v, want)
    reg(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert float(reg.ema_real) == pytest.approx(1.0) and float(reg.ema_fake) == pytest.approx(0.25)
    reg.eval()
    reg(r1, f1)
    assert float(reg.ema_real) == pytest.approx(1.0)  # eval: anchors kept
    assert set(reg.state_dict()) == {"ema_real", "ema_fake", "steps"}
    with pytest.raises(ValueError):
        LeCAM(1.0)


# -- LeCAM under DDP: 2 gloo processes ------------------------------------------------------

LECAM_SIZES = (3, 5)  # rank 0's and rank 1's logits per step (uneven)


def lecam_logits(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's (real, fake) logits of one step, rank 0's rows first."""
    g = torch.Generator().manual_seed(step)
    n = sum(LECAM_SIZES)
    return torch.randn(n, generator=g) + 1.0, torch.randn(n, generator=g) - 1.0


def rank_rows(x: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(LECAM_SIZES[:rank])
    return x[start : start + LECAM_SIZES[rank]]


def _lecam_rank(rank: int, world: int, port: int, out: str) -> None:
    from .test_distributed import _init

    _init(rank, world, port)
    reg, values = LeCAM(decay=0.5), []
    for step in range(4):
        real, fake = lecam_logits(step)
        values.append(reg(rank_rows(real, rank), rank_rows(fake, rank)))
        if step == 1:  # the checkpoint: rank 0's anchors, as Trainer saves them
            saved = [{k: v.clone() for k, v in reg.state_dict().items()} if rank == 0 else None]
            torch.distributed.broadcast_object_list(saved, src=0)
    resumed = LeCAM(decay=0.5)  # every rank resumes from rank 0's saved anchors
    resumed.load_state_dict(saved[0])
    again = []
    for step in range(2, 4):
        real, fake = lecam_logits(step)
        again.append(resumed(rank_rows(real, rank), rank_rows(fake, rank)))
    torch.save(
        {"state": reg.state_dict(), "values": values, "resumed": resumed.state_dict(),
         "again": again},
        os.path.join(out, f"lecam{rank}.pt"),
    )  # fmt: skip
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_lecam_anchors_are_the_global_batch_on_every_rank_and_resume(tmp_path):
    """2 gloo processes with different (uneven) logits: the anchors are the EMAs of the
    GLOBAL batch's means, identical on every rank and equal to one process fed the whole
    batch, so rank 0's saved anchors resume every rank exactly."""
    from .test_distributed import run_ranks

    run_ranks(_lecam_rank, str(tmp_path), deadline=90.0)
    r0, r1 = (torch.load(tmp_path / f"lecam{r}.pt") for r in range(2))
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    one = LeCAM(decay=0.5)
    for step in range(4):
        one(*lecam_logits(step))
    for k in ("ema_real", "ema_fake"):
        torch.testing.assert_close(r0["state"][k], one.state_dict()[k])
    for r in (r0, r1):  # resumed from rank 0's checkpoint = uninterrupted, on every rank
        for k in r["state"]:
            assert torch.equal(r["resumed"][k], r["state"][k]), k
        for a, b in zip(r["again"], r["values"][2:], strict=True):
            assert torch.equal(a, b)
