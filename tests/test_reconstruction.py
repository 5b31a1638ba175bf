"""Tests of vqkit's reconstruction module: usage counted without K-sized buffers for
huge implicit codebooks (LFQ with 30 bits), checked under an address-space limit."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from vqkit.evaluation.reconstruction import SparseCounts


def test_sparse_counts_match_bincount():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 50, (300,), generator=g), torch.randint(20, 90, (200,), generator=g)
    s = SparseCounts(100)
    s.add(a)
    s.add(b.reshape(10, 20))
    dense = torch.bincount(torch.cat((a, b)), minlength=100)
    assert torch.equal(s.codes, dense.nonzero().reshape(-1))
    assert torch.equal(s.used, dense[dense > 0])


_HUGE = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # 2^30 int64 counts: 8 GiB
import torch
torch.set_num_threads(1)
from vqkit.data import load_builtin
from vqkit.evaluation.plots import plot_usage
from vqkit.evaluation.reconstruction import SparseCounts, evaluate
from vqkit.models import VQVAE, VQVAEConfig
from vqkit.runtime.window import Window
cfg = VQVAEConfig(in_channels=1, image_size=28, hidden=16, res_hidden=4, res_layers=1,
                  embedding_dim=30, quantizer="lfq", num_bits=30, entropy_weight=0.0)
model = VQVAE(cfg)
res = evaluate(model, load_builtin("test").subset(slice(0, 40)), data_variance=0.1)
assert isinstance(res["counts"], SparseCounts) and res["counts"].num_codes == 2**30
assert 1 <= res["codes_used"] <= 40 * 49 and res["perplexity"] >= 1
plot_usage(res["counts"], sys.argv[1])
w = Window(2**30)
w.add({"loss": 1.0}, None, 8)
assert w.counts is None and w.summary()["window_usage"] is None
print("ok")
"""


@pytest.mark.timeout(120)
def test_huge_implicit_codebook_allocates_no_k_sized_buffers(tmp_path):
    """``--num-bits 30``: evaluation, the usage plot and the training window stay within
    a 6 GiB address space (a dense count tensor alone would be 8 GiB)."""
    code = "import sys\n" + textwrap.dedent(_HUGE)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "usage.png")],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
    assert (tmp_path / "usage.png").stat().st_size > 0


def test_per_scale_figures_and_progressive_reconstructions():
    """evaluate() of a multi-scale tokenizer adds ``code_groups``: each scale's
    figures from a direct count of its ``split_codes`` maps over the split; a vq
    tokenizer's result has no new key. progressive_reconstructions decodes the first
    n scales' codes, the last one the full reconstruction."""
    from vqkit.data import load_builtin, normalize
    from vqkit.errors import UserError
    from vqkit.evaluation.reconstruction import evaluate, progressive_reconstructions
    from vqkit.metrics import perplexity
    from vqkit.models import VQVAE, VQVAEConfig

    small = dict(in_channels=1, image_size=28, hidden=16, res_hidden=4, res_layers=1)
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(**small, quantizer="multiscale", scales="1,2,4,7"))
    data = load_builtin("test").subset(slice(0, 40))
    res = evaluate(model, data, data_variance=0.1, batch_size=16, batch_perplexity_size=8)
    q = model.quantizer
    with torch.no_grad():
        maps = q.split_codes(model.encode(normalize(data.images)))
    assert list(res["code_groups"]) == ["1x1", "2x2", "4x4", "7x7"]
    k = model.num_codes
    for m, fig in zip(maps, res["code_groups"].values(), strict=True):
        direct = torch.bincount(m.reshape(-1), minlength=k)
        assert fig["codes_used"] == int((direct > 0).sum())
        assert fig["dead"] == k - fig["codes_used"]
        assert fig["usage"] == fig["codes_used"] / k
        assert fig["perplexity"] == pytest.approx(float(perplexity(direct)), rel=1e-6)
    vq = VQVAE(VQVAEConfig(**small, quantizer="vq"))
    plain = evaluate(vq, data, data_variance=0.1, batch_size=16, batch_perplexity_size=8)
    assert set(res) - set(plain) == {"code_groups"}
    x = normalize(data.images[:3])
    recons = progressive_reconstructions(model, x)
    assert len(recons) == 4
    codes = model.encode(x)
    for n, r in enumerate(recons, 1):
        prefix = codes[:, : sum(s * s for s in (1, 2, 4, 7)[:n])]
        torch.testing.assert_close(r, model.decoder(q.decode(prefix)))
    torch.testing.assert_close(recons[-1], model(x).recon)
    with pytest.raises(UserError, match="multi-scale"):
        progressive_reconstructions(vq, x)
