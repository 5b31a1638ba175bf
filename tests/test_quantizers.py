import copy
import io

import pytest
import torch
import torch.nn.functional as F

from vqkit import QuantizerOutput, VectorQuantizer, VectorQuantizerEMA

from .reference import ema_reference, flat_channels_first, perplexity, sq_distances

QUANTIZERS = [VectorQuantizer, VectorQuantizerEMA]


def close64(actual, expected, rtol=1e-5, atol=1e-6):
    """float32 result against a float64 reference."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def _spread_codebook(vq, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(vq.codebook.shape, generator=g) * scale)
    if isinstance(vq, VectorQuantizerEMA):
        vq.reset_statistics()


# --- the plain quantizer against float64 -------------------------------------------------


def test_vq_forward_losses_and_gradients_match_reference():
    torch.manual_seed(0)
    k, d, beta = 37, 6, 0.25
    vq = VectorQuantizer(k, d, commitment_cost=beta)
    _spread_codebook(vq)
    x = torch.randn(3, d, 5, 4, requires_grad=True)
    out = vq(x)

    # reference, float64, from scratch
    xr = x.detach().double().requires_grad_(True)
    er = vq.codebook.detach().double().requires_grad_(True)
    flat = flat_channels_first(xr)
    idx = sq_distances(flat, er).argmin(1)
    onehot = F.one_hot(idx, k).double()
    q = onehot @ er
    codebook_loss = ((q - flat.detach()) ** 2).mean()
    commitment_loss = ((q.detach() - flat) ** 2).mean()
    loss = codebook_loss + beta * commitment_loss
    st = flat + (q - flat).detach()

    assert torch.equal(out.indices.reshape(-1), idx)
    assert out.indices.shape == (3, 5, 4)
    close64(out.losses["codebook"], codebook_loss)
    close64(out.losses["commitment"], commitment_loss)
    close64(out.loss, loss)
    torch.testing.assert_close(
        flat_channels_first(out.quantized).double(), st, rtol=1e-5, atol=1e-5
    )
    close64(out.perplexity, perplexity(idx, k))
    close64(out.usage, (onehot.sum(0) > 0).double().mean())
    torch.testing.assert_close(
        out.distances.reshape(-1).double(),
        sq_distances(flat.detach(), er.detach()).min(1).values,
        rtol=1e-4,
        atol=1e-5,
    )

    # gradients: a downstream loss on the output plus the VQ loss
    w = torch.randn_like(x)
    (out.loss + (out.quantized * w).sum()).backward()
    w_flat = flat_channels_first(w.double())
    (loss + (st * w_flat).sum()).backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(vq.codebook.grad.double(), er.grad, rtol=1e-5, atol=1e-7)


def test_straight_through_is_identity_gradient():
    vq = VectorQuantizer(16, 4)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    vq(x).quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_separate_weights():
    vq = VectorQuantizer(16, 4, commitment_cost=0.5, codebook_weight=2.0)
    out = vq(torch.randn(2, 4, 3, 3))
    torch.testing.assert_close(
        out.loss, 2.0 * out.losses["codebook"] + 0.5 * out.losses["commitment"]
    )


def test_default_init_is_uniform_over_1_over_k():
    vq = VectorQuantizer(512, 64)
    assert vq.codebook.abs().max() <= 1 / 512
    assert vq.codebook.std() > 0.2 / 512


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_classic_tuple_unpacking(cls):
    vq = cls(10, 3)
    x = torch.randn(2, 3, 4, 4)
    loss, quantized, perp, encodings = vq(x)
    assert loss.dim() == 0 and perp.dim() == 0
    assert quantized.shape == x.shape
    assert encodings.shape == (32, 10) and encodings.dtype == torch.float32
    assert torch.equal(encodings.sum(1), torch.ones(32))
    out = vq(x)
    assert torch.equal(encodings.argmax(1), out.indices.reshape(-1))


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_default_path_allocates_no_dense_one_hot(cls):
    # the one-hot is lazy: building the output must not call one_hot
    from vqkit.quantizers import output as base

    calls = []
    orig = base.one_hot

    def spy(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    base.one_hot = spy
    try:
        out = cls(64, 8)(torch.randn(4, 8, 6, 6))
        assert calls == []
        _ = out.encodings
        assert calls == [1]
    finally:
        base.one_hot = orig


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_decode_matches_quantized(cls):
    vq = cls(20, 5)
    _spread_codebook(vq)
    x = torch.randn(2, 5, 3, 7)
    out = vq.eval()(x)
    assert torch.equal(vq.decode(out.indices), out.quantized)  # bit for bit
    assert torch.equal(vq.lookup(out.indices), out.quantized)


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_channels_last_and_other_ranks(cls):
    vq = cls(20, 5)
    _spread_codebook(vq)
    x = torch.randn(2, 5, 3, 7)
    ref = vq.eval()(x)
    vql = copy.deepcopy(vq)
    vql.channels_last = True
    out = vql(x.permute(0, 2, 3, 1).contiguous())
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.quantized, ref.quantized.permute(0, 2, 3, 1))
    torch.testing.assert_close(vql.decode(out.indices), out.quantized)
    # (B, C), (B, C, L), (B, C, T, H, W)
    for shape in [(6, 5), (2, 5, 9), (1, 5, 2, 3, 4)]:
        o = vq(torch.randn(shape))
        assert o.quantized.shape == shape
        assert o.indices.shape == (shape[0], *shape[2:])
        torch.testing.assert_close(vq.decode(o.indices), o.quantized)


@pytest.mark.parametrize("cls", QUANTIZERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(cls, dtype):
    vq = cls(32, 8)
    _spread_codebook(vq)
    x = torch.randn(2, 8, 4, 4).to(dtype).requires_grad_(True)
    out = vq(x)
    assert out.quantized.dtype == dtype
    assert out.loss.dtype == torch.float32
    flat = flat_channels_first(x.detach().double())
    d = sq_distances(flat, vq.codebook.detach().double())
    chosen = d.gather(1, out.indices.reshape(-1, 1)).squeeze(1)
    assert torch.all(chosen - d.min(1).values <= 1e-3 * d.min(1).values.clamp(min=1))
    (out.loss + out.quantized.float().sum()).backward()
    assert x.grad is not None and x.grad.dtype == dtype


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_empty_batch(cls):
    vq = cls(16, 4)
    before = vq.codebook.detach().clone()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    out = vq(x)
    assert out.quantized.shape == (0, 4, 5, 5)
    assert out.indices.shape == (0, 5, 5)
    assert out.loss.item() == 0.0
    assert out.perplexity.item() == 1.0
    assert out.usage.item() == 0.0
    out.loss.backward()
    assert vq.decode(out.indices).shape == (0, 4, 5, 5)
    assert torch.equal(vq.codebook.detach(), before)
    # no information, no change: EMA statistics and step count stay as they were
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_bad_inputs_are_clear_errors(cls):
    vq = cls(16, 4)
    with pytest.raises(ValueError, match=r"expected 4 channels.*got 3"):
        vq(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="at least 2 dims"):
        vq(torch.randn(4))
    with pytest.raises(TypeError, match="floating-point.*int64"):
        vq(torch.ones(2, 4, 3, 3, dtype=torch.int64))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 4, 3, 3)
        x[1, 2, 0, 1] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            vq(x)
    with pytest.raises(ValueError, match="device"):
        vq(torch.randn(2, 4, 3, 3, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        vq([[1.0]])
    # the switch turns the finiteness check off (documented cost trade-off)
    vq_nocheck = cls(16, 4, check_finite=False)
    vq_nocheck(torch.full((1, 4, 1, 1), float("nan")))
    # decode
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        vq.decode(torch.tensor([[16]]))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        vq.decode(torch.tensor([[-1]]))
    with pytest.raises(TypeError, match="integer"):
        vq.decode(torch.zeros(2, 2))


def test_constructor_validation():
    for bad in [
        dict(num_embeddings=0, embedding_dim=4),
        dict(num_embeddings=4, embedding_dim=0),
        dict(num_embeddings=4.5, embedding_dim=4),
        dict(num_embeddings=4, embedding_dim=4, commitment_cost=-1),
        dict(num_embeddings=4, embedding_dim=4, max_scratch_bytes=0),
        dict(num_embeddings=4, embedding_dim=4, search_backend="x"),
    ]:
        with pytest.raises(ValueError):
            VectorQuantizer(**bad)
    for bad in [
        dict(decay=1.5),
        dict(decay=-0.1),
        dict(epsilon=0.0),
        dict(commitment_cost=-1.0),
        dict(decay=1.0, zero_debias=True),
    ]:
        with pytest.raises(ValueError):
            VectorQuantizerEMA(8, 4, **bad)


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_state_dict_round_trip(cls):
    a = cls(24, 6)
    a.train()
    for _ in range(3):
        a(torch.randn(4, 6, 3, 3))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = cls(24, 6)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(2, 6, 4, 4)
    a.eval()
    b.eval()
    assert torch.equal(a(x).indices, b(x).indices)


def test_repr():
    assert "num_embeddings=8, embedding_dim=4, commitment_cost=0.25" in repr(VectorQuantizer(8, 4))
    r = repr(VectorQuantizerEMA(8, 4, zero_debias=True))
    assert "decay=0.99" in r and "zero_debias=True" in r


def test_output_type():
    out = VectorQuantizer(8, 4)(torch.randn(1, 4, 2, 2))
    assert isinstance(out, QuantizerOutput)
    assert out.counts.shape == (8,) and int(out.counts.sum()) == 4


# --- EMA --------------------------------------------------------------------------------


def test_ema_state_is_buffers_not_parameters():
    vq = VectorQuantizerEMA(16, 4)
    assert list(vq.parameters()) == []
    names = dict(vq.named_buffers())
    assert set(names) == {
        "codebook",
        "cluster_size",
        "embed_sum",
        "num_updates",
    }
    # the same tensor objects survive training steps (no re-created parameters)
    ids = {n: id(b) for n, b in vq.named_buffers()}
    vq.train()
    vq(torch.randn(2, 4, 3, 3))
    assert ids == {n: id(b) for n, b in vq.named_buffers()}


@pytest.mark.parametrize("debias", [False, True])
def test_ema_matches_reference_over_several_steps(debias):
    torch.manual_seed(0)
    k, d, decay, eps = 12, 3, 0.9, 1e-5
    vq = VectorQuantizerEMA(k, d, decay=decay, epsilon=eps, zero_debias=debias)
    _spread_codebook(vq, seed=3)
    e0 = vq.codebook.clone()
    batches = [torch.randn(2, d, 4, 4) + 0.3 * t for t in range(6)]
    vq.train()
    for x in batches:
        before = vq.codebook.clone()
        out = vq(x)
        # the output uses the pre-update codebook
        torch.testing.assert_close(
            vq.decode(out.indices) * 0 + before[out.indices].movedim(-1, 1), out.quantized
        )
    e, n_ema, m_ema = ema_reference(
        e0, [flat_channels_first(x) for x in batches], decay, eps, debias, k
    )
    torch.testing.assert_close(vq.codebook.double(), e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vq.cluster_size.double(), n_ema, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vq.embed_sum.double(), m_ema, rtol=1e-5, atol=1e-5)
    assert int(vq.num_updates) == 6


def test_ema_loss_is_commitment_only():
    vq = VectorQuantizerEMA(8, 4, commitment_cost=0.7)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(x)
    flat = flat_channels_first(x.detach())
    q = vq.decode(out.indices)  # after the update: recompute from the pre-update codes instead
    assert set(out.losses) == {"commitment"}
    torch.testing.assert_close(out.loss, 0.7 * out.losses["commitment"])
    qf = flat_channels_first(out.quantized.detach())
    torch.testing.assert_close(out.losses["commitment"], ((qf - flat) ** 2).mean())
    out.loss.backward()
    assert x.grad is not None
    del q


def test_zero_debias_effect_at_step_one():
    """After one update, debiased statistics equal the batch's exactly: each used code
    becomes the mean of its vectors. Without debiasing the code moves only part way."""
    k, d = 4, 2
    codebook = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]])
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [9.0, 11.0], [11.0, 9.0]])
    xin = x.t().reshape(1, d, 5)  # (B=1, D, L=5)
    for debias in (True, False):
        vq = VectorQuantizerEMA(k, d, decay=0.99, zero_debias=debias)
        with torch.no_grad():
            vq.codebook.copy_(codebook)
        vq.reset_statistics()
        vq.train()(xin)
        mean0 = x[:3].mean(0)
        mean1 = x[3:].mean(0)
        if debias:
            # Laplace smoothing shifts sizes by ~eps only
            torch.testing.assert_close(vq.codebook[0], mean0, atol=1e-4, rtol=0)
            torch.testing.assert_close(vq.codebook[1], mean1, atol=1e-4, rtol=0)
            torch.testing.assert_close(vq.codebook[2], torch.zeros(2), atol=1e-4, rtol=0)
        else:
            # N = 0.99 + 0.01 n, m = 0.99 e + 0.01 s  (n, s: batch count and sum)
            exp1 = (0.99 * codebook[1] + 0.01 * x[3:].sum(0)) / (0.99 + 0.01 * 2)
            torch.testing.assert_close(vq.codebook[1], exp1, atol=1e-3, rtol=0)
            # unused codes stay where they were
            torch.testing.assert_close(vq.codebook[2], codebook[2], atol=1e-3, rtol=0)


def test_ema_eval_never_changes_codebook():
    vq = VectorQuantizerEMA(16, 4)
    vq.eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    for _ in range(3):
        vq(torch.randn(3, 4, 5, 5))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_ema_decay_one_freezes_codebook():
    vq = VectorQuantizerEMA(16, 4, decay=1.0)
    before = vq.codebook.clone()
    vq.train()(torch.randn(3, 4, 5, 5))
    torch.testing.assert_close(vq.codebook, before)


# --- compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_torch_compile_forward(cls):
    torch._dynamo.reset()
    vq = cls(32, 8)
    _spread_codebook(vq)
    vq.eval()
    x = torch.randn(2, 8, 4, 4)
    ref = vq(x)
    compiled = torch.compile(vq)
    out = compiled(x)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.quantized, ref.quantized)
    torch.testing.assert_close(out.loss, ref.loss)
