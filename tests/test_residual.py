"""Tests of vqkit's residual module."""

import pytest
import torch

from vqkit import ResidualVQ, VectorQuantizerEMA

from .reference import flat_channels_first


def close64(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def _rvq_with_codebooks(q=4, k=16, d=6, stage="vq", zero_code=False, seed=0, **kw):
    rvq = ResidualVQ(q, k, d, stage=stage, **kw)
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(rvq.layers):
        with torch.no_grad():
            # stage i's codes at the scale of its residual (~ 0.6^i)
            layer.codebook.copy_(torch.randn(layer.codebook.shape, generator=g) * 0.6**i)
            if zero_code:
                layer.codebook[0] = 0.0
        if isinstance(layer, VectorQuantizerEMA):
            layer.reset_statistics()
    return rvq


def rvq_reference(flat, codebooks):
    """float64 SoundStream Algorithm 1: (indices (N, Q), per-stage residuals, codes)."""
    r = flat.double()
    idx, residuals, codes = [], [], []
    for e in codebooks:
        e = e.double()
        i = ((r[:, None] - e[None]) ** 2).sum(-1).argmin(1)
        residuals.append(r)
        codes.append(e[i])
        idx.append(i)
        r = r - e[i]
    return torch.stack(idx, 1), residuals, codes


def test_residual_error_never_increases_with_a_zero_code():
    """What nearest-code assignment guarantees: if every stage's codebook holds the zero
    vector, ||r_{i+1}|| = min_k ||r_i - e_k|| <= ||r_i - 0||, for every vector. (Without
    a zero code a stage can make a residual longer.)"""
    torch.manual_seed(0)
    rvq = _rvq_with_codebooks(q=6, zero_code=True).eval()
    x = torch.randn(4, 6, 8, 8)
    flat = flat_channels_first(x)
    codebooks = [rvq.stage(i).codebook.detach() for i in range(6)]
    _, residuals, codes = rvq_reference(flat, codebooks)
    norms = [r.norm(dim=1) for r in residuals] + [(residuals[-1] - codes[-1]).norm(dim=1)]
    for a, b in zip(norms, norms[1:], strict=False):
        assert torch.all(b <= a * (1 + 1e-6))
    # and the library's partial reconstructions follow the same path
    out = rvq(x)
    for q in range(1, 7):
        recon = rvq.decode(out.indices[..., :q]).detach()
        per_vec = flat_channels_first(recon).double() - flat.double()
        close64(per_vec.norm(dim=1), norms[q], rtol=1e-4, atol=1e-5)
    # on this data the mean error also falls strictly at every stage
    mean_err = [float(n.pow(2).mean()) for n in norms]
    assert all(b < a for a, b in zip(mean_err, mean_err[1:], strict=False))


@pytest.mark.parametrize("stage", ["vq", "ema"])
def test_residual_losses_per_stage_match_reference(stage):
    torch.manual_seed(0)
    beta = 0.3
    rvq = _rvq_with_codebooks(q=3, stage=stage, commitment_cost=beta)
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    codebooks = [rvq.stage(i).codebook.detach().clone() for i in range(3)]
    out = rvq.train()(x)
    flat = flat_channels_first(x.detach())
    idx, residuals, codes = rvq_reference(flat, codebooks)
    assert out.indices.shape == (2, 5, 5, 3)
    assert torch.equal(out.indices.reshape(-1, 3), idx)
    total_commit = 0.0
    for i in range(3):
        commit = ((residuals[i] - codes[i]) ** 2).mean()  # stage i's own residual
        close64(out.stages[i].losses["commitment"], commit)
        total_commit = total_commit + commit
    close64(out.losses["commitment"], total_commit)
    close64(flat_channels_first(out.quantized.detach()), sum(codes), atol=1e-5)
    # gradient to x: identity from the output + each stage's commitment through r_i
    g = torch.randn_like(x)
    (out.loss + (out.quantized * g).sum()).backward()
    ref = flat_channels_first(g.double()) + sum(
        2 * beta * (residuals[i] - codes[i]) / residuals[i].numel() for i in range(3)
    )
    close64(flat_channels_first(x.grad), ref, rtol=1e-5, atol=1e-7)
    if stage == "vq":
        close64(
            out.loss,
            beta * total_commit + sum(((residuals[i] - codes[i]) ** 2).mean() for i in range(3)),
        )
        assert all(rvq.stage(i).codebook.grad is not None for i in range(3))
    else:
        assert set(out.losses) == {"commitment"}
        # each EMA stage was updated from its own residual
        assert not torch.equal(rvq.stage(1).codebook, codebooks[1])


def test_residual_decode_encode_and_layout():
    torch.manual_seed(0)
    rvq = _rvq_with_codebooks(q=4, channels_last=True).eval()
    x = torch.randn(2, 3, 5, 6)
    out = rvq(x)
    assert out.indices.shape == (2, 3, 5, 4) and out.counts.shape == (4, 16)
    assert torch.equal(rvq.decode(out.indices), out.quantized)  # bit for bit
    assert torch.equal(rvq.encode(x), out.indices)
    with pytest.raises(ValueError, match="Q'"):
        rvq.decode(torch.zeros(2, 3, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[-1, 16\)"):
        rvq.decode(torch.full((1, 4), 16))


def test_quantizer_dropout_is_seeded_and_exact():
    torch.manual_seed(0)
    x = torch.randn(8, 6, 3, 3)

    def run(seed):
        rvq = _rvq_with_codebooks(
            q=4, quantizer_dropout=1.0, generator=torch.Generator().manual_seed(seed)
        )
        return rvq, rvq.train()(x)

    rvq, a = run(1)
    _, b = run(1)
    assert torch.equal(a.indices, b.indices)
    n_used = (a.indices >= 0).sum(-1)  # (B, 3, 3): per sample, one value
    assert torch.all(n_used == n_used[:, :1, :1]) and n_used.min() >= 1
    # a prefix of stages: no -1 before a used stage
    assert torch.all((a.indices[..., 1:] >= 0) <= (a.indices[..., :-1] >= 0))
    assert len(set(n_used[:, 0, 0].tolist())) > 1
    assert torch.equal(rvq.decode(a.indices), a.quantized.detach())
    # stage 2's commitment is a mean over the samples that used it, on their residuals
    flat = flat_channels_first(x)
    codebooks = [rvq.stage(i).codebook.detach() for i in range(4)]
    _, residuals, codes = rvq_reference(flat, codebooks)
    used = (a.indices[..., 2] >= 0).reshape(-1)
    close64(a.stages[2].losses["commitment"], ((residuals[2] - codes[2])[used] ** 2).mean())
    # eval never drops
    assert torch.all(rvq.eval()(x).indices >= 0)


def test_residual_shared_codebook_and_options():
    rvq = ResidualVQ(3, 8, 4, shared_codebook=True)
    assert len(rvq.layers) == 1 and rvq.stage(0) is rvq.stage(2)
    x = torch.randn(2, 4, 3, requires_grad=True)
    out = rvq(x)
    (out.loss + out.quantized.sum()).backward()
    for kw in (dict(stage="ema", use_cosine=True), dict(codebook_dim=2), dict(gradient="rotation")):
        r = ResidualVQ(2, 8, 4, **kw).eval()
        o = r(x)
        torch.testing.assert_close(r.decode(o.indices), o.quantized.detach())
    with pytest.raises(ValueError):
        ResidualVQ(0, 8, 4)
    with pytest.raises(ValueError):
        ResidualVQ(2, 8, 4, quantizer_dropout=1.5)
    with pytest.raises(ValueError):
        ResidualVQ(2, 8, 4, stage="fsq")


@pytest.mark.parametrize("stage", ["vq", "ema"])
def test_kmeans_init_stage_by_stage_on_each_stages_residual(stage):
    """Stage i is initialised as a lone layer would be on ``r_i``, the residual that the
    already initialised stages 1 .. i-1 leave (float64 reference of the residuals), with
    the one generator drawn in stage order; the residual energy falls stage by stage."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, 40)  # (B, D, T) sequences
    rvq = ResidualVQ(3, 8, 6, stage=stage)
    rvq.init_codebook_kmeans(x, iters=3, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    r = flat_channels_first(x).double()
    energies = [float((r**2).sum())]
    for i in range(3):
        lone = type(rvq.stage(i))(8, 6)
        lone.init_codebook_kmeans(r.float(), iters=3, generator=g)
        close64(rvq.stage(i).codebook, lone.codebook)
        e = rvq.stage(i).codebook.detach().double()
        r = r - e[((r[:, None] - e[None]) ** 2).sum(-1).argmin(1)]
        energies.append(float((r**2).sum()))
    assert all(b < a for a, b in zip(energies, energies[1:], strict=False))
    assert rvq.supports_init and rvq.supports_revival


def test_revival_per_stage_returns_the_stage_masks():
    """Each stage's dead codes (its own usage statistic) take rows of its own residual,
    computed after the earlier stages' revival; the (Q, K) mask's row i is stage i's."""
    torch.manual_seed(0)
    rvq = _rvq_with_codebooks(q=2, k=16, d=6).train()
    x = 0.01 * torch.randn(4, 6, 5)  # near zero: few codes of each stage are picked
    rvq(x)
    dead = [rvq.stage(i).dead_codes(1.0).clone() for i in range(2)]
    assert all(0 < int(d.sum()) < 16 for d in dead)
    before = [rvq.stage(i).codebook.detach().clone() for i in range(2)]
    mask = rvq.revive_dead_codes(x, threshold=1.0, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (2, 16) and torch.equal(mask, torch.stack(dead))
    r = flat_channels_first(x).double()
    for i in range(2):
        e = rvq.stage(i).codebook.detach().double()
        assert torch.equal(e[~mask[i]], before[i][~mask[i]].double())  # the living stay
        for row in e[mask[i]]:  # each revived code is a row of r_i
            assert bool(((r - row).abs().max(1).values < 1e-6).any())
        r = r - e[((r[:, None] - e[None]) ** 2).sum(-1).argmin(1)]
    shared = ResidualVQ(3, 8, 6, shared_codebook=True).train()
    shared(x)
    assert shared.revive_dead_codes(x, threshold=1.0).shape == (8,)
