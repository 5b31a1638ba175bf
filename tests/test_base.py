"""Tests of vqkit's base module."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from vqkit import FSQ, ResidualVQ, VectorQuantizer, VectorQuantizerEMA

from .reference import flat_channels_first, sq_distances

QUANTIZERS = [VectorQuantizer, VectorQuantizerEMA]


def _spread_codebook(vq, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(vq.codebook.shape, generator=g) * scale)
    if isinstance(vq, VectorQuantizerEMA):
        vq.reset_statistics()


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


K, D = 16, 4


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
    torch.manual_seed(0)
    vq = cls(32, 8)
    _spread_codebook(vq)
    # the codebook the search saw: an EMA quantizer moves its codes in a training forward
    codebook = vq.codebook.detach().double().clone()
    x = torch.randn(2, 8, 4, 4).to(dtype).requires_grad_(True)
    out = vq(x)
    assert out.quantized.dtype == dtype
    assert out.loss.dtype == torch.float32
    flat = flat_channels_first(x.detach().double())
    d = sq_distances(flat, codebook)
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


def test_usage_ema_matches_float64_reference():
    torch.manual_seed(0)
    q = VectorQuantizer(K, D, usage_decay=0.8).train()
    g = torch.Generator().manual_seed(1)
    ref = torch.zeros(K, dtype=torch.float64)
    batches = [torch.randn(3, D, 2, 2, generator=g) for _ in range(5)]
    batches.insert(2, torch.randn(0, D, 2, 2))  # an empty batch changes nothing
    t = 0
    for x in batches:
        counts = q(x).counts
        if x.shape[0]:
            ref = 0.8 * ref + 0.2 * counts.to(torch.float64)
            t += 1
    assert int(q.usage_updates) == t == 5
    torch.testing.assert_close(q.usage_ema.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.code_usage().double(), ref / (1 - 0.8**t), rtol=1e-6, atol=1e-6)
    # eval never changes it
    before = q.usage_ema.clone()
    q.eval()(batches[0])
    assert torch.equal(q.usage_ema, before)


def test_usage_buffer_is_a_buffer_and_survives_state_dict():
    q = VectorQuantizer(K, D).train()
    q(torch.randn(4, D, 3, 3))
    assert "usage_ema" in dict(q.named_buffers())
    assert "usage_ema" not in dict(q.named_parameters())
    state = q.state_dict()
    assert {"usage_ema", "usage_updates"} <= set(state)
    fresh = VectorQuantizer(K, D)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.code_usage(), q.code_usage())
    assert torch.equal(fresh.dead_codes(0.5), q.dead_codes(0.5))
    # residual stages carry their own
    r = ResidualVQ(2, K, D, stage="vq").train()
    r(torch.randn(2, D, 3, 3))
    assert all(int(r.stage(i).usage_updates) == 1 for i in range(2))


def test_usage_decay_validated():
    with pytest.raises(ValueError, match="usage_decay"):
        VectorQuantizer(K, D, usage_decay=1.0)


@pytest.mark.parametrize(
    "kind, args, name",
    [
        ("VectorQuantizer", (8, 4), "commitment_cost"),
        ("VectorQuantizerEMA", (8, 4), "commitment_cost"),
        ("SimVQ", (8, 4), "codebook_weight"),
        ("IBQ", (8, 4), "double_quant_weight"),
        ("LFQ", (4,), "entropy_weight"),
    ],
)
@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan"), "0.25"])
def test_every_quantizer_refuses_a_negative_or_non_finite_loss_weight(kind, args, name, bad):
    import vqkit

    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
        getattr(vqkit, kind)(*args, **{name: bad})


@pytest.mark.parametrize("bad", [0.0, float("inf")])
def test_temperatures_and_epsilon_must_be_finite_and_positive(bad):
    from vqkit import IBQ, LFQ, VectorQuantizerEMA

    for build in (
        lambda: LFQ(4, temperature=bad),
        lambda: IBQ(8, 4, entropy_temperature=bad),
        lambda: VectorQuantizerEMA(8, 4, epsilon=bad),
    ):
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            build()


# -- layers with a projection: any float dtype, NaN weights refused (BaseQuantizer._project)


def _projected():
    from vqkit import BSQ, IBQ, LFQ, SimVQ

    torch.manual_seed(0)
    return {
        "lfq": LFQ(8, 16),
        "bsq": BSQ(8, 16),
        "vq": VectorQuantizer(16, 16, codebook_dim=4),
        "ema": VectorQuantizerEMA(16, 16, codebook_dim=4),
        "simvq": SimVQ(16, 16, codebook_dim=4),
        "ibq": IBQ(16, 16, codebook_dim=4),
        "fsq": FSQ([4, 3, 3], dim=16),
    }


@pytest.mark.parametrize("kind", ["lfq", "bsq", "vq", "ema", "simvq", "ibq", "fsq"])
def test_projection_accepts_every_float_dtype(kind):
    """fp16 / bf16 / float64 inputs outside autocast: the output keeps the input's dtype
    and equals the float32 result (the projection runs in the layer's float32)."""
    q = _projected()[kind].eval()
    x = torch.randn(2, 16, 3, dtype=torch.float64)
    ref = q(x.float())
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        xi = x.to(dtype)
        out = q(xi)
        assert out.quantized.dtype == dtype
        want = q(xi.float())  # the same values, rounded to dtype, through float32
        assert torch.equal(out.indices, want.indices)
        torch.testing.assert_close(out.quantized.float(), want.quantized.to(dtype).float())
        assert torch.equal(q.encode(xi), want.indices)
    assert torch.equal(q(x).indices, ref.indices)  # float64: the same codes as float32
    xg = x.clone().requires_grad_(True)
    q.train()(xg).quantized.sum().backward()
    assert xg.grad is not None and xg.grad.dtype == torch.float64


@pytest.mark.parametrize("kind", ["lfq", "bsq", "vq", "ema", "simvq", "ibq", "fsq"])
def test_nan_projection_is_refused(kind):
    """A NaN in the in-projection would give finite codes from NaN logits: refused."""
    q = _projected()[kind].eval()
    with torch.no_grad():
        q.project_in.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="projection .* NaN or Inf"):
        q.encode(torch.randn(2, 16, 3))
    with pytest.raises(ValueError, match="projection .* NaN or Inf"):
        q(torch.randn(2, 16, 3))


def test_sizes_refuse_bools():
    from vqkit import BSQ, LFQ

    for make in (
        lambda: LFQ(True),
        lambda: BSQ(True),
        lambda: VectorQuantizer(True, 4),
        lambda: VectorQuantizer(4, True),
        lambda: VectorQuantizer(4, 8, codebook_dim=True),
    ):
        with pytest.raises(ValueError, match="int"):
            make()


@pytest.mark.parametrize(
    "kind, options, rows",
    [
        ("vq", {"num_embeddings": 8}, ["codebook"]),
        ("vq", {"num_embeddings": 8, "affine_codebook": True}, ["codebook"]),
        ("ema", {"num_embeddings": 8}, []),  # a buffer: no gradient, no optimizer state
        ("ibq", {"num_embeddings": 8}, ["codebook"]),
        ("simvq", {"num_embeddings": 8}, []),  # K == d: W's shape alone would mislead
        ("gvq", {"num_embeddings": 8, "groups": 2, "shared_groups": True}, ["layers.0.codebook"]),
        ("rvq", {"num_embeddings": 8, "num_quantizers": 2, "stage": "vq"}, None),
        ("fsq", {"levels": "3,3"}, []),
        ("lfq", {"num_bits": 3}, []),
    ],
)
def test_codebook_lr_and_code_row_parameters_say_what_they_are(kind, options, rows):
    from vqkit.quantizers import build_quantizer

    q = build_quantizer(kind, 8, **options)
    names = {id(p): n for n, p in q.named_parameters()}
    lr = q.codebook_lr_parameters()
    code_rows = q.code_row_parameters()
    assert all(id(p) in names for p in lr)  # trainable parameters of this module
    assert {id(p) for p in code_rows} <= {id(p) for p in lr}
    for p in code_rows:  # row k is code k
        assert p.shape[0] == q.num_codes
    if rows is not None:
        assert [names[id(p)] for p in code_rows] == rows
    if kind == "vq" and options.get("affine_codebook"):
        assert sorted(names[id(p)] for p in lr) == ["codebook", "codebook_scale", "codebook_shift"]
    if kind == "simvq":
        assert [names[id(p)] for p in lr] == ["transform.weight"]
