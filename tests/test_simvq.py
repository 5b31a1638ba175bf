"""SimVQ: codes C W^T, the tiled search over them, W trained by the codebook term."""

from __future__ import annotations

import pytest
import torch

from vqkit import SimVQ
from vqkit.quantizers import build_quantizer

from .reference import sq_distances


def test_simvq_search_loss_and_decode():
    torch.manual_seed(0)
    q = SimVQ(300, 8, commitment_cost=0.3, max_scratch_bytes=4096).train()  # many tiles
    with torch.no_grad():
        q.transform.weight.add_(0.1 * torch.randn(8, 8))
    x = torch.randn(2, 8, 5, 3, requires_grad=True)
    out = q(x)
    flat = x.detach().movedim(1, -1).reshape(-1, 8)
    codes = q.codebook.double() @ q.transform.weight.detach().double().t()
    d = sq_distances(flat, codes)
    best = d.min(1)
    assert torch.equal(out.indices.reshape(-1), best.indices)
    torch.testing.assert_close(
        out.distances.reshape(-1).double(), best.values, rtol=1e-4, atol=1e-5
    )
    chosen = codes[best.indices]
    mse = ((flat.double() - chosen) ** 2).mean()
    torch.testing.assert_close(out.loss.double(), 1.3 * mse, rtol=1e-5, atol=1e-6)
    assert torch.equal(q.decode(out.indices), out.quantized)
    assert torch.equal(q.encode(x), out.indices)
    # the codebook term trains W (all codes move), the commitment term the input
    out.loss.backward()
    w_grad = q.transform.weight.grad
    diff = (chosen - flat.double()) / flat.numel() * 2.0  # d codebook / d chosen
    want = diff.t() @ q.codebook.double()[best.indices]
    torch.testing.assert_close(w_grad.double(), want, rtol=1e-4, atol=1e-6)
    assert x.grad is not None and q.codebook.grad is None  # C is a frozen buffer


def test_simvq_contract_and_all_codes_move():
    torch.manual_seed(0)
    q = SimVQ(64, 4)
    assert not q.supports_init and not q.supports_revival
    assert q.codebook_lr_parameters() == [q.transform.weight]
    assert q.code_row_parameters() == []  # W is d x d: no code rows to restart
    assert "codebook" in dict(q.named_buffers())  # frozen, saved with the state
    with pytest.raises(NotImplementedError):
        q.revive_dead_codes(torch.randn(8, 4))
    opt = torch.optim.SGD(q.codebook_lr_parameters(), lr=0.5)
    before = q._search_codebook().detach().clone()
    out = q.train()(torch.randn(16, 4) + 3.0)
    out.loss.backward()
    opt.step()
    moved = (q._search_codebook().detach() - before).norm(dim=1) > 0
    assert moved.all()  # also the codes no input picked
    assert int((out.counts > 0).sum()) < 64
    assert torch.allclose(q.code_usage(), out.counts.float())


def test_simvq_options_cosine_and_projection():
    q = build_quantizer("simvq", 16, num_embeddings=128, codebook_dim=4, use_cosine=True)
    assert isinstance(q, SimVQ) and q.transform.weight.shape == (4, 4)
    x = torch.randn(2, 16, 6)
    out = q.train()(x)
    assert out.quantized.shape == x.shape
    torch.testing.assert_close(q.decode(out.indices), out.quantized)
    q.eval()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(q)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
