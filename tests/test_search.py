import pytest
import torch

from vqkit.search import _tile_sizes, nearest_code, scratch_bytes, squared_distances

from .reference import assert_nearest, sq_distances


@pytest.mark.parametrize(
    "n,d,k",
    [(1, 4, 1), (7, 3, 5), (300, 16, 64), (1000, 64, 512), (513, 8, 1000), (257, 32, 2049)],
)
def test_matches_float64_reference(n, d, k):
    g = torch.Generator().manual_seed(n * 31 + k)
    x = torch.randn(n, d, generator=g)
    e = torch.randn(k, d, generator=g)
    idx, dist = nearest_code(x, e)
    assert idx.dtype == torch.int64 and idx.shape == (n,)
    assert dist.dtype == torch.float32 and dist.shape == (n,)
    assert_nearest(x, e, idx, dist)


@pytest.mark.parametrize("budget", [4 * 7, 4 * 64, 4 * 1000, 4 * 4096 * 3])
def test_tiny_budgets_give_same_answer(budget):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(333, 12, generator=g)
    e = torch.randn(777, 12, generator=g)
    ref_idx, ref_dist = nearest_code(x, e)
    idx, dist = nearest_code(x, e, max_scratch_bytes=budget)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist)


def test_tile_sizes_respect_budget():
    for n, k, budget in [
        (65536, 8192, 32 << 20),
        (32768, 65536, 32 << 20),
        (10, 10, 4),
        (100000, 512, 1 << 20),
        (5, 100000, 64),
    ]:
        tn, tk = _tile_sizes(n, k, budget)
        assert 1 <= tn <= n and 1 <= tk <= k
        assert 4 * tn * tk <= max(budget, 4)
        assert scratch_bytes(n, k, budget) == 4 * tn * tk


def test_ties_resolve_to_lowest_index():
    # duplicated codes: every query ties between copies; lowest index must win
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.5, 0.5]])
    idx, _ = nearest_code(x, e)
    assert idx.tolist() == [0, 1, 0]
    # ties across tiles: code 0 and code 700 identical, tiny budget forces many tiles
    e = torch.randn(1000, 8)
    e[700] = e[0]
    x = e[0:1].clone() + 1e-3
    idx, _ = nearest_code(x, e, max_scratch_bytes=4 * 64)
    assert idx.item() == 0


def test_large_k_two_level_reduction_exact_against_min():
    # exercise the grouped row-min: K a multiple and a non-multiple of 64
    for k in (4096, 4100):
        x = torch.randn(64, 16)
        e = torch.randn(k, 16)
        idx, dist = nearest_code(x, e)
        d = squared_distances(x, e)
        ref_val, ref_idx = d.min(1)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(dist, ref_val)


def test_distances_clamped_nonnegative():
    e = torch.randn(50, 32) * 1e3
    x = e[:10].clone()  # exact hits: cancellation could go negative
    idx, dist = nearest_code(x, e)
    assert torch.equal(idx, torch.arange(10))
    assert (dist >= 0).all()
    assert (squared_distances(x, e) >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 16, generator=g).to(dtype)
    e = torch.randn(100, 16, generator=g).to(dtype)
    idx, dist = nearest_code(x, e)
    assert dist.dtype == torch.float32
    # reference on the same (rounded) values
    assert_nearest(x.double(), e.double(), idx, dist, rel_tie=1e-4)


def test_deterministic():
    x = torch.randn(3000, 32)
    e = torch.randn(3000, 32)
    a = nearest_code(x, e, max_scratch_bytes=1 << 20)
    b = nearest_code(x, e, max_scratch_bytes=1 << 20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_queries():
    idx, dist = nearest_code(torch.empty(0, 5), torch.randn(3, 5))
    assert idx.shape == (0,) and dist.shape == (0,)


def test_squared_distances_matches_reference():
    x, e = torch.randn(20, 7), torch.randn(9, 7)
    torch.testing.assert_close(
        squared_distances(x, e).double(), sq_distances(x, e), rtol=1e-5, atol=1e-5
    )


def test_bad_inputs():
    e = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        nearest_code(torch.randn(3, 4, 1), e)
    with pytest.raises(ValueError, match="D=5"):
        nearest_code(torch.randn(3, 5), e)
    with pytest.raises(TypeError, match="int64"):
        nearest_code(torch.ones(3, 4, dtype=torch.int64), e)
    with pytest.raises(ValueError, match="K >= 1"):
        nearest_code(torch.randn(3, 4), torch.randn(0, 4))
    with pytest.raises(ValueError, match="backend"):
        nearest_code(torch.randn(3, 4), e, backend="annoy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="code_sqnorm"):
        nearest_code(torch.randn(3, 4), e, code_sqnorm=torch.ones(3))
    with pytest.raises(ValueError, match="device"):
        nearest_code(torch.randn(3, 4, device="meta"), e)


def test_precomputed_code_norms():
    x, e = torch.randn(100, 8), torch.randn(40, 8)
    a = nearest_code(x, e)
    b = nearest_code(x, e, code_sqnorm=e.pow(2).sum(1))
    assert torch.equal(a[0], b[0])


def test_faiss_backend_agrees():
    pytest.importorskip("faiss")
    x, e = torch.randn(500, 16), torch.randn(300, 16)
    a = nearest_code(x, e)
    b = nearest_code(x, e, backend="faiss")
    assert_nearest(x, e, b[0], b[1])
    assert (a[0] != b[0]).float().mean() < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, e = torch.randn(5000, 64), torch.randn(1000, 64)
    idx, dist = nearest_code(x.cuda(), e.cuda())
    assert_nearest(x, e, idx.cpu(), dist.cpu())


def test_nan_codebook_in_a_quantizer_layer_is_an_error():
    from vqkit import VectorQuantizer

    q = VectorQuantizer(8, 4)
    with torch.no_grad():
        q.codebook[5] = float("nan")
    with pytest.raises(ValueError, match=r"codebook has NaN or Inf in 1 of 8 codebook rows \(5\)"):
        q(torch.randn(2, 4, 3, 3))


def test_meta_tensors_one_line_error():
    x, cb = torch.empty(4, 3, device="meta"), torch.empty(5, 3, device="meta")
    with pytest.raises(ValueError, match="meta tensor"):
        nearest_code(x, cb)
