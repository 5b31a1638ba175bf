"""Tests of vqkit's output module."""

import pytest
import torch

from vqkit import QuantizerOutput, VectorQuantizer, VectorQuantizerEMA

QUANTIZERS = [VectorQuantizer, VectorQuantizerEMA]


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_classic_tuple_unpacking(cls):
    vq = cls(10, 3)
    x = torch.randn(2, 3, 4, 4)
    # one call, unpacked: a second call in training mode would see the codebook an EMA
    # update moved, and may pick other codes (88 of 300 seeds did)
    out = vq(x)
    loss, quantized, perp, encodings = out
    assert loss.dim() == 0 and perp.dim() == 0
    assert quantized.shape == x.shape
    assert encodings.shape == (32, 10) and encodings.dtype == torch.float32
    assert torch.equal(encodings.sum(1), torch.ones(32))
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


def test_output_type():
    out = VectorQuantizer(8, 4)(torch.randn(1, 4, 2, 2))
    assert isinstance(out, QuantizerOutput)
    assert out.counts.shape == (8,) and int(out.counts.sum()) == 4
