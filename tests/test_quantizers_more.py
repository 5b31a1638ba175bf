"""FSQ, ResidualVQ, the VQ layer's options (cosine codes, projections, rotation trick),
mixed precision and torch.compile, each against float64 references written here."""

import itertools
import math

import pytest
import torch

from vqkit import FSQ, ResidualVQ, VectorQuantizer, VectorQuantizerEMA

from .reference import flat_channels_first


def close64(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# --- FSQ -------------------------------------------------------------------------------


def fsq_reference(z, levels, eps=1e-3):
    """float64 bound + round + normalise + mixed-radix index, from the module docstring."""
    z = z.double()
    lv = torch.tensor(levels, dtype=torch.float64)
    half_l = (lv - 1) * (1 + eps) / 2
    offset = (lv % 2 == 0).double() * 0.5
    bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
    levels_int = torch.round(bounded)
    hw = torch.floor(lv / 2)
    digits = (levels_int + hw).long()
    radix = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))])
    return levels_int / hw, (digits * radix).sum(-1), levels_int


@pytest.mark.parametrize("levels", [[3], [2, 3], [8, 5, 5, 5], [4, 4, 6]])
def test_fsq_index_code_bijection_over_whole_grid(levels):
    fsq = FSQ(levels)
    k = math.prod(levels)
    idx = torch.arange(k)
    codes = fsq.indices_to_codes(idx)
    assert codes.shape == (k, len(levels))
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    # every code is distinct and lies on the grid of each channel
    assert torch.unique(codes, dim=0).shape[0] == k
    for i, n in enumerate(levels):
        ints = sorted(set((codes[:, i] * (n // 2)).round().long().tolist()))
        assert ints == list(range(-(n // 2), n - n // 2))  # even n: {-n/2, ..., n/2 - 1}
    # the grid enumerated independently, channel 0 least significant
    ref = torch.tensor(list(itertools.product(*[range(n) for n in reversed(levels)])))
    ref = ref.flip(-1)  # (k, d) digits, row r is index r
    hw = torch.tensor([n // 2 for n in levels], dtype=torch.float64)
    close64(codes, (ref - hw) / hw, rtol=1e-7, atol=0)
    # decode is the same map, laid out channels-first
    assert torch.equal(fsq.decode(idx.reshape(1, k)), codes.t().reshape(1, len(levels), k))


def test_fsq_even_levels_use_half_integer_offset():
    fsq = FSQ([8, 5])
    z = torch.tensor([[-50.0, -50.0], [0.0, 0.0], [50.0, 50.0]])
    out = fsq(z)
    # L = 8: levels -4 .. 3 (normalised by 4); L = 5: -2 .. 2 (by 2); bound(0) == 0
    torch.testing.assert_close(out.quantized, torch.tensor([[-1.0, -1.0], [0.0, 0.0], [0.75, 1.0]]))
    torch.testing.assert_close(fsq.bound(torch.zeros(2)), torch.zeros(2), atol=1e-7, rtol=0)
    assert out.indices.tolist() == [0, 4 + 8 * 2, 7 + 8 * 4]


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [7, 6, 2]])
def test_fsq_forward_matches_float64_reference(levels):
    torch.manual_seed(0)
    d = len(levels)
    fsq = FSQ(levels)
    x = (torch.randn(3, d, 6, 5) * 2).requires_grad_(True)
    out = fsq(x)
    flat = flat_channels_first(x.detach())
    q, idx, _ = fsq_reference(flat, levels)
    # near a rounding boundary float32 and float64 may disagree; there are none here
    assert torch.equal(out.indices.reshape(-1), idx)
    close64(flat_channels_first(out.quantized.detach()), q, rtol=0, atol=1e-7)
    assert out.losses == {} and float(out.loss) == 0.0
    assert out.indices.shape == (3, 6, 5)
    k = math.prod(levels)
    counts = torch.bincount(idx, minlength=k).double()
    p = counts / counts.sum()
    close64(out.perplexity, torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    close64(out.usage, (counts > 0).double().mean())
    assert torch.equal(fsq.decode(out.indices), out.quantized.detach())
    # straight-through rounding: the gradient is that of the bound divided by L // 2
    g = torch.randn_like(x)
    (out.quantized * g).sum().backward()
    lv = torch.tensor(levels, dtype=torch.float64)
    half_l = (lv - 1) * (1 + 1e-3) / 2
    shift = torch.atanh(((lv % 2 == 0).double() * 0.5) / half_l)
    dbound = (1 - torch.tanh(flat.double() + shift) ** 2) * half_l / torch.floor(lv / 2)
    close64(flat_channels_first(x.grad), dbound * flat_channels_first(g.double()), rtol=1e-5)


def test_fsq_huge_grid_uses_unique_counts_and_no_codebook():
    levels = [1000] * 6  # 1e18 codes
    fsq = FSQ(levels)
    assert fsq.num_codes == 1000**6
    assert sum(b.numel() for b in fsq.buffers()) < 100 and list(fsq.parameters()) == []
    x = torch.randn(4, 6, 8)
    out = fsq(x)
    assert out.counts is None
    n_unique = torch.unique(out.indices).numel()
    torch.testing.assert_close(out.usage, torch.tensor(n_unique / 1000**6))
    assert torch.equal(fsq.decode(out.indices), out.quantized)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(out.indices)), out.indices)
    with pytest.raises(ValueError, match="2\\*\\*62"):
        FSQ([2**32, 2**31])


def test_fsq_projection_and_channels_last():
    torch.manual_seed(0)
    fsq = FSQ([8, 5, 5, 5], dim=16, channels_last=True)
    x = torch.randn(2, 3, 3, 16, requires_grad=True)
    out = fsq(x)
    assert out.quantized.shape == x.shape and out.indices.shape == (2, 3, 3)
    torch.testing.assert_close(fsq.decode(out.indices), out.quantized.detach())
    out.quantized.sum().backward()
    assert x.grad is not None and fsq.project_in.weight.grad is not None
    assert torch.equal(fsq.encode(x), out.indices)
    with pytest.raises(ValueError):
        FSQ([8, 1])
    with pytest.raises(ValueError):
        FSQ([8, 5], dim=1)
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        FSQ([8, 5]).decode(torch.tensor([40]))


# --- VQ options: cosine codes, projections, rotation trick --------------------------------


def _randn_codebook(vq, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(vq.codebook.shape, generator=g))
    if isinstance(vq, VectorQuantizerEMA):
        vq.reset_statistics()


def test_cosine_search_matches_normalised_float64_reference():
    torch.manual_seed(0)
    k, d = 29, 5
    vq = VectorQuantizer(k, d, use_cosine=True)
    _randn_codebook(vq)
    x = (torch.randn(2, d, 4, 6) * 3).requires_grad_(True)
    out = vq(x)
    flat = flat_channels_first(x.detach().double())
    e = vq.codebook.detach().double()
    xn = flat / flat.norm(dim=1, keepdim=True)
    en = e / e.norm(dim=1, keepdim=True)
    cos = xn @ en.t()
    idx = cos.argmax(1)
    assert torch.equal(out.indices.reshape(-1), idx)
    q = en[idx]
    close64(flat_channels_first(out.quantized.detach()), q)
    close64(out.losses["commitment"], ((xn - q) ** 2).mean())
    close64(out.distances.reshape(-1), 2 - 2 * cos.max(1).values, atol=1e-5)
    assert torch.equal(vq.decode(out.indices), out.quantized.detach())
    # l2_normalize is the same switch
    vq2 = VectorQuantizer(k, d, l2_normalize=True)
    vq2.load_state_dict(vq.state_dict())
    assert torch.equal(vq2(x).indices, out.indices)
    # the codebook term reaches the raw codebook through the normalisation
    out.loss.backward()
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0


def test_low_dimensional_codes_with_projections():
    torch.manual_seed(0)
    vq = VectorQuantizer(40, 16, codebook_dim=4)
    assert vq.codebook.shape == (40, 4)
    _randn_codebook(vq)
    x = torch.randn(2, 16, 3, 5, requires_grad=True)
    out = vq(x)
    z = flat_channels_first(x.detach().double()) @ vq.project_in.weight.double().t()
    z = z + vq.project_in.bias.double()
    e = vq.codebook.detach().double()
    idx = ((z[:, None] - e[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(out.indices.reshape(-1), idx)
    ref = e[idx] @ vq.project_out.weight.double().t() + vq.project_out.bias.double()
    close64(flat_channels_first(out.quantized.detach()), ref, atol=1e-5)
    close64(out.losses["commitment"], ((z - e[idx]) ** 2).mean())
    torch.testing.assert_close(vq.decode(out.indices), out.quantized.detach())
    assert torch.equal(vq.encode(x), out.indices)
    (out.loss + out.quantized.sum()).backward()
    for p in (vq.project_in.weight, vq.project_out.weight, vq.codebook):
        assert p.grad is not None and p.grad.abs().sum() > 0


def rotation_reference_grad(x, q, g):
    """dL/dx of sg[lambda R] x, R built explicitly from two Householder reflections."""
    x, q, g = x.double(), q.double(), g.double()
    u, v = x / x.norm(), q / q.norm()
    r = (u + v) / (u + v).norm()
    eye = torch.eye(x.numel(), dtype=torch.float64)
    rot = (eye - 2 * torch.outer(v, v)) @ (eye - 2 * torch.outer(r, r))
    torch.testing.assert_close(rot @ u, v)  # R takes x's direction to q's
    torch.testing.assert_close(rot @ rot.t(), eye)
    return (q.norm() / x.norm()) * rot.t() @ g


def test_rotation_trick_gradient_matches_closed_form():
    from vqkit.quantizers.estimators import rotation_trick

    torch.manual_seed(0)
    x = torch.randn(6, 5, requires_grad=True)
    q = torch.randn(6, 5) * 2
    g = torch.randn(6, 5)
    out = rotation_trick(x, q)
    assert torch.equal(out, q)
    out.backward(g)
    ref = torch.stack([rotation_reference_grad(x[i].detach(), q[i], g[i]) for i in range(6)])
    close64(x.grad, ref, rtol=1e-5, atol=1e-6)
    # the gradient preserves the angle between g and x, scaled by ||q|| / ||x||: a
    # gradient along q's direction maps to one along x's direction
    x2 = x.detach().clone().requires_grad_(True)
    rotation_trick(x2, q).backward(q)
    close64(
        x2.grad,
        (q.norm(dim=1, keepdim=True) ** 2 / x.detach().norm(dim=1, keepdim=True))
        * x.detach()
        / x.detach().norm(dim=1, keepdim=True),
        rtol=1e-5,
        atol=1e-5,
    )


def test_vq_layer_with_rotation_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, gradient="rotation")
    _randn_codebook(vq)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(x)
    assert torch.equal(vq.decode(out.indices), out.quantized.detach())
    g = torch.randn_like(x)
    (out.quantized * g).sum().backward()
    flat = flat_channels_first(x.detach())
    q = vq.codebook.detach()[out.indices.reshape(-1)]
    gf = flat_channels_first(g)
    ref = torch.stack([rotation_reference_grad(flat[i], q[i], gf[i]) for i in range(len(flat))])
    close64(flat_channels_first(x.grad), ref, rtol=1e-5, atol=1e-6)
    assert vq.codebook.grad is None  # no codebook gradient through the output path
    with pytest.raises(ValueError, match="gradient"):
        VectorQuantizer(8, 4, gradient="bogus")


@pytest.mark.parametrize(
    "options",
    [
        dict(use_cosine=True),
        dict(codebook_dim=3),
        dict(gradient="rotation"),
        dict(use_cosine=True, codebook_dim=3, gradient="rotation"),
    ],
)
def test_ema_options(options):
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(12, 6, **options)
    vq.train()
    x = torch.randn(3, 6, 4, 4, requires_grad=True)
    out = vq(x)
    (out.loss + out.quantized.sum()).backward()
    assert x.grad is not None
    vq.eval()
    out = vq(x)
    torch.testing.assert_close(vq.decode(out.indices), out.quantized.detach())


# --- ResidualVQ -----------------------------------------------------------------------------


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


# --- factory, VQ-VAE and CLI ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, options, index_shape",
    [
        ("vq", {}, (2, 4, 4)),
        ("ema", {}, (2, 4, 4)),
        ("rvq", {"num_quantizers": 3, "rvq_stage": "vq", "quantizer_dropout": 0.5}, (2, 4, 4, 3)),
        ("rvq", {"num_quantizers": 2, "shared_codebook": True}, (2, 4, 4, 2)),
        ("fsq", {"levels": "8,5,5,5"}, (2, 4, 4)),
    ],
)
def test_vqvae_with_each_quantizer(kind, options, index_shape):
    from vqkit.models import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    cfg = VQVAEConfig(
        in_channels=1,
        image_size=16,
        hidden=16,
        res_hidden=8,
        res_layers=1,
        embedding_dim=8,
        quantizer=kind,
        **({} if kind == "fsq" else {"num_embeddings": 32}),
        **options,
    )
    model = VQVAE(cfg)
    x = torch.rand(2, 1, 16, 16) - 0.5
    out = model.train()(x)
    terms = VQVAE.loss(out, x, data_variance=0.1)
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    model.eval()
    idx = model.encode(x)
    assert idx.shape == index_shape and model.index_dims == len(index_shape)
    recon = model.decode(idx)
    torch.testing.assert_close(recon, model(x).recon)
    # the config survives a dict (JSON) round trip and old configs still load
    assert VQVAEConfig.from_dict(cfg.to_dict()) == cfg
    assert VQVAEConfig.from_dict({"quantizer": "ema"}).num_quantizers == 4


def test_build_quantizer_and_cli_options():
    from vqkit.cli import build_parser
    from vqkit.quantizers import build_quantizer

    assert isinstance(build_quantizer("fsq", 4, levels="8,5,5,5"), FSQ)
    rvq = build_quantizer("rvq", 6, num_embeddings=16, num_quantizers=3, rvq_stage="ema")
    assert isinstance(rvq, ResidualVQ) and rvq.num_quantizers == 3
    assert isinstance(build_quantizer("vq", 6, num_embeddings=8, use_cosine=True), VectorQuantizer)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        build_quantizer("pq", 4)
    with pytest.raises(ValueError, match="unknown options"):
        build_quantizer("fsq", 4, num_embeddings=8)
    args = build_parser().parse_args(
        [
            "train",
            "--quantizer",
            "rvq",
            "--num-quantizers",
            "6",
            "--rvq-stage",
            "vq",
            "--quantizer-dropout",
            "0.5",
            "--levels",
            "8,8,8",
        ]
    )
    assert (args.quantizer, args.num_quantizers, args.rvq_stage) == ("rvq", 6, "vq")
    assert args.quantizer_dropout == 0.5 and args.levels == "8,8,8"


# --- mixed precision and torch.compile ------------------------------------------------------


def _all_kinds():
    torch.manual_seed(0)
    return {
        "vq": (VectorQuantizer(32, 8), 8),
        "ema": (VectorQuantizerEMA(32, 8), 8),
        "vq-options": (
            VectorQuantizer(32, 8, use_cosine=True, codebook_dim=4, gradient="rotation"),
            8,
        ),
        "rvq": (ResidualVQ(3, 32, 8), 8),
        "rvq-ema": (ResidualVQ(3, 32, 8, stage="ema"), 8),
        "fsq": (FSQ([8, 5, 5, 5]), 4),
        "fsq-proj": (FSQ([8, 5, 5, 5], dim=8), 8),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_half_inputs(dtype):
    x32 = torch.randn(2, 8, 4, 4)
    for name, (q, d) in _all_kinds().items():
        q.eval()
        x = x32[:, :d]
        ref = q(x)
        for inp in (x, x.to(dtype)):
            inp = inp.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=dtype):
                out = q(inp)
            assert out.quantized.dtype == inp.dtype, name
            assert out.loss.dtype == torch.float32, name
            (out.loss + out.quantized.float().sum()).backward()
            assert inp.grad is not None and inp.grad.dtype == inp.dtype, name
            if inp.dtype == torch.float32 and "options" not in name and "proj" not in name:
                # no projection: the search / rounding runs in float32 despite autocast
                assert torch.equal(out.indices, ref.indices), name
    # nearest_code itself is excluded from autocast
    from vqkit import nearest_code

    a, b = torch.randn(50, 8), torch.randn(300, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_code(a, b)
    want = nearest_code(a, b)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_compile_without_graph_breaks():
    """Eval-mode forward of every quantizer traces to ONE graph (fullgraph): the
    NaN check and the decode range check are skipped while compiling, the search
    and the counts have traceable forms. (Training mode adds the quantizer-dropout
    draws (data-dependent row selection) and, for FSQ grids above max_bincount,
    torch.unique: graph breaks there.)"""
    x32 = torch.randn(2, 8, 4, 4)
    for name, (q, d) in _all_kinds().items():
        q.eval()
        x = x32[:, :d]
        torch._dynamo.reset()
        explained = torch._dynamo.explain(q)(x)
        assert explained.graph_break_count == 0, (name, explained.break_reasons)
        ref = q(x)
        out = torch.compile(q, backend="eager", fullgraph=True)(x)
        assert torch.equal(out.indices, ref.indices), name
        torch.testing.assert_close(out.quantized, ref.quantized)
        torch.testing.assert_close(out.perplexity, ref.perplexity)
    # through AOT autograd too (inductor's code generation takes ~30 s on 2 CPU cores;
    # tests/test_quantizers.py runs it for the VQ layers)
    for name in ("fsq", "rvq"):
        q, d = _all_kinds()[name]
        q.eval()
        torch._dynamo.reset()
        x = x32[:, :d]
        out = torch.compile(q, backend="aot_eager", fullgraph=True)(x)
        ref = q(x)
        assert torch.equal(out.indices, ref.indices)
        torch.testing.assert_close(out.quantized, ref.quantized)
