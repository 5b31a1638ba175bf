"""MultiScaleVQ (VAR's multi-scale residual quantizer) against an independent float64
reference of VAR's ``VectorQuantizer2.forward``: codes, quantized value, progressive
decoding, gradients; per-scale statistics, empty batch, bad scales, state dict, k-means
init and revival, and the memory bound of the search (no N x K tensor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vqkit import MultiScaleVQ
from vqkit.errors import UserError
from vqkit.quantizers import build_quantizer
from vqkit.quantizers.multiscale import MultiScaleOptions, parse_scales, phi_assignment
from vqkit.quantizers.scales import revival_quota

C = 6
K = 24


def var_phi_index(i: int, num_scales: int, num_convs: int) -> int:
    """VAR's PhiPartiallyShared / PhiNonShared pick, with numpy as VAR writes it."""
    p = num_convs
    a = 1 / 3 / p if p == 4 else 1 / 2 / p
    ticks = np.linspace(a, 1 - a, p)
    return int(np.argmin(np.abs(ticks - i / (num_scales - 1))).item())


def reference(q: MultiScaleVQ, f: torch.Tensor) -> dict:
    """VAR's algorithm in float64 with dense distances, on ``q``'s weights (copied)."""
    scales, S = q.scales, len(q.scales)
    book = q.codebook.detach().double().requires_grad_(True)
    convs = [
        tuple(t.detach().double().requires_grad_(True) for t in (c.weight, c.bias)) for c in q.phis
    ]
    f = f.detach().double().requires_grad_(True)
    b, _, side, _ = f.shape
    f_ng = f.detach()
    rest = f_ng.clone()
    f_hat = torch.zeros_like(f_ng)
    loss = 0.0
    codes, hats = [], []
    for i, s in enumerate(scales):
        r = rest if i == S - 1 else F.interpolate(rest, size=(s, s), mode="area")
        v = r.permute(0, 2, 3, 1).reshape(-1, C)
        idx = ((v[:, None, :] - book.detach()[None]) ** 2).sum(-1).argmin(1)
        h = book[idx].reshape(b, s, s, C).permute(0, 3, 1, 2)
        if i != S - 1:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        if convs:
            w, bias = convs[var_phi_index(i, S, len(convs)) if S > 1 else 0]
            h = h * (1 - q.phi_ratio) + F.conv2d(h, w, bias, padding=1) * q.phi_ratio
        f_hat = f_hat + h
        rest = rest - h.detach()
        loss = loss + q.commitment_cost * F.mse_loss(f_hat.detach(), f)
        loss = loss + q.codebook_weight * F.mse_loss(f_hat, f_ng)
        codes.append(idx.reshape(b, s * s))
        hats.append(f_hat.detach())
    return {
        "loss": loss / S,
        "quantized": f + (f_hat - f).detach(),
        "codes": torch.cat(codes, 1),
        "hats": hats,
        "f": f,
        "book": book,
        "convs": convs,
    }


def make(scales, phi_convs=4, seed=0, **kw) -> MultiScaleVQ:
    torch.manual_seed(seed)
    q = MultiScaleVQ(K, C, scales=scales, phi_convs=phi_convs, **kw)
    with torch.no_grad():  # codes on the data's scale, so every scale picks among many
        q.codebook.normal_(0, 0.7)
    return q


CASES = [((1,), 0), ((5,), 2), ((1, 2, 4), 4), ((1, 2, 3, 4, 5, 6, 8), 4), ((2, 3, 5), 1)]


@pytest.mark.parametrize(("num_scales", "num_convs"), [(7, 4), (10, 4), (10, 3), (4, 2), (3, 1)])
def test_phi_assignment_is_vars(num_scales, num_convs):
    want = [var_phi_index(i, num_scales, num_convs) for i in range(num_scales)]
    assert phi_assignment(num_scales, num_convs) == want
    assert phi_assignment(num_scales, 0) == [None] * num_scales


@pytest.mark.parametrize(("scales", "phi_convs"), CASES)
def test_codes_quantized_and_loss_equal_the_float64_reference(scales, phi_convs):
    q = make(scales, phi_convs).train()
    for seed in range(3):
        x = torch.randn(3, C, scales[-1], scales[-1], generator=torch.Generator().manual_seed(seed))
        ref = reference(q, x)
        out = q(x)
        assert out.indices.shape == (3, sum(s * s for s in scales))
        assert torch.equal(out.indices, ref["codes"])
        assert torch.equal(q.encode(x), ref["codes"])
        torch.testing.assert_close(out.quantized.double(), ref["quantized"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss.double(), ref["loss"], rtol=1e-5, atol=1e-6)
        # decode of the full codes is the forward's value, bit for bit
        assert torch.equal(q.decode(out.indices), out.quantized.detach())


def test_single_scale_without_phi_is_plain_vq():
    from vqkit import VectorQuantizer

    q = make((4,), phi_convs=0)
    vq = VectorQuantizer(K, C, codebook_weight=1.0)
    with torch.no_grad():
        vq.codebook.copy_(q.codebook)
    x = torch.randn(2, C, 4, 4)
    a, b = q(x), vq(x)
    assert torch.equal(a.indices.reshape(2, 4, 4), b.indices)
    assert torch.equal(a.quantized, b.quantized)
    torch.testing.assert_close(a.loss, b.loss)


@pytest.mark.parametrize(("scales", "phi_convs"), CASES[2:])
def test_decoding_the_first_n_scales_equals_the_references_f_hat(scales, phi_convs):
    q = make(scales, phi_convs).eval()
    x = torch.randn(2, C, scales[-1], scales[-1], generator=torch.Generator().manual_seed(5))
    ref = reference(q, x)
    codes = q.encode(x)
    maps = q.split_codes(codes)
    assert [tuple(m.shape) for m in maps] == [(2, s, s) for s in scales]
    for n in range(1, len(scales) + 1):
        prefix = codes[:, : sum(s * s for s in scales[:n])]
        got = q.decode(prefix)
        assert got.shape == x.shape
        torch.testing.assert_close(got.double(), ref["hats"][n - 1], rtol=1e-5, atol=1e-5)
        assert torch.equal(q.decode(codes, num_scales=n), got)


def test_gradients_equal_the_float64_references_autograd():
    q = make((1, 2, 3, 5), phi_convs=2).train()
    x = torch.randn(2, C, 5, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    g = torch.randn(2, C, 5, 5, generator=torch.Generator().manual_seed(2))
    out = q(x)
    (out.loss + (out.quantized * g).sum()).backward()
    ref = reference(q, x)
    (ref["loss"] + (ref["quantized"] * g.double()).sum()).backward()
    # straight-through: the input gets g plus the commitment term's gradient
    torch.testing.assert_close(x.grad.double(), ref["f"].grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q.codebook.grad.double(), ref["book"].grad, rtol=1e-4, atol=1e-7)
    assert ref["book"].grad.abs().sum() > 0  # the loss moves the codebook
    for conv, (w, b) in zip(q.phis, ref["convs"], strict=True):
        torch.testing.assert_close(conv.weight.grad.double(), w.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(conv.bias.grad.double(), b.grad, rtol=1e-4, atol=1e-7)


def test_per_scale_statistics():
    q = make((1, 2, 4)).train()
    x = torch.randn(4, C, 4, 4)
    out = q(x)
    assert out.counts.shape == (3, K) and out.counts.dtype == torch.int64
    assert out.counts.sum(1).tolist() == [4 * 1, 4 * 4, 4 * 16]
    assert len(out.stages) == 3
    for i, (s, st) in enumerate(zip(q.scales, out.stages, strict=True)):
        assert st.indices.shape == (4, s, s) and st.distances.shape == (4, s, s)
        assert torch.equal(st.counts, out.counts[i])
        assert torch.equal(st.counts, torch.bincount(st.indices.reshape(-1), minlength=K))
        assert st.quantized.shape == x.shape
    pooled = out.counts.sum(0).double()
    p = pooled / pooled.sum()
    want = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    torch.testing.assert_close(out.perplexity.double(), want, rtol=1e-5, atol=0)
    assert float(out.usage) == pytest.approx(float((pooled > 0).double().mean()), rel=1e-6)
    # the first step's EMA, debiased, is that step's counts (pooled and per scale)
    torch.testing.assert_close(q.code_usage(), pooled.float())
    torch.testing.assert_close(q.scale_code_usage(), out.counts.float())
    q.eval()(torch.randn(4, C, 4, 4))  # eval forwards change no statistic
    torch.testing.assert_close(q.scale_code_usage(), out.counts.float())


def test_channels_last_equals_channels_first():
    a, b = make((1, 2, 4)), make((1, 2, 4), channels_last=True)
    x = torch.randn(2, C, 4, 4)
    oa, ob = a(x), b(x.movedim(1, -1))
    assert torch.equal(oa.indices, ob.indices)
    assert torch.equal(oa.quantized.movedim(1, -1), ob.quantized)
    assert torch.equal(b.decode(ob.indices), ob.quantized)


def test_empty_batch():
    q = make((1, 2, 4))
    for training in (True, False):
        q.train(training)
        x = torch.randn(0, C, 4, 4, requires_grad=True)
        out = q(x)
        assert out.quantized.shape == x.shape and out.indices.shape == (0, 21)
        assert out.loss.dim() == 0 and bool(torch.isfinite(out.loss))
        (out.loss + out.quantized.sum()).backward()
        assert x.grad is not None and x.grad.shape == x.shape
    assert q.encode(torch.randn(0, C, 4, 4)).shape == (0, 21)
    assert q.decode(torch.zeros(0, 21, dtype=torch.long)).shape == (0, C, 4, 4)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("scales", ["1,3,2", "1,2,2", "0,1,2", "", "a,b", "2,-4"])
def test_bad_scales_are_refused_in_one_line(scales):
    with pytest.raises(UserError) as exc:
        parse_scales(scales)
    assert "strictly increasing" in one_line(exc) or "comma-separated" in one_line(exc)
    with pytest.raises(UserError) as exc:
        build_quantizer("multiscale", C, scales=scales)
    assert "scales" in one_line(exc)


def test_a_grid_that_is_not_the_last_scale_is_refused_naming_both():
    q = make((1, 2, 4))
    for shape in [(2, C, 8, 8), (2, C, 4, 3), (2, C, 16)]:
        with pytest.raises(UserError) as exc:
            q(torch.randn(*shape))
        msg = one_line(exc)
        assert "last scale (4)" in msg and "1,2,4" in msg
        with pytest.raises(UserError):
            q.encode(torch.randn(*shape))
    with pytest.raises(ValueError, match="one of \\[1, 5, 21\\]"):
        q.decode(torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="num_scales"):
        q.decode(torch.zeros(2, 5, dtype=torch.long), num_scales=3)
    with pytest.raises(ValueError, match="no padding mask"):
        q(torch.randn(2, C, 4, 4), mask=torch.zeros(2, 4, 4, dtype=torch.bool))
    for kw in ({"codebook_dim": 3}, {"use_cosine": True}, {"gradient": "rotation"}):
        with pytest.raises(ValueError):
            MultiScaleVQ(K, C, scales=(1, 2), **kw)
    for kw in ({"phi_convs": -1}, {"phi_ratio": 0.0}, {"phi_ratio": 1.5}):
        with pytest.raises(UserError):
            build_quantizer("multiscale", C, **kw)


def test_options_build_and_canonical_scales():
    opts = MultiScaleOptions.from_dict({"scales": " 1, 2,4", "num_embeddings": 8, "phi_convs": 1})
    assert opts.scales == "1,2,4"
    q = opts.build(C)
    assert isinstance(q, MultiScaleVQ) and q.scales == [1, 2, 4] and len(q.phis) == 1
    assert (
        q.num_codes == 8 and q.codes_per_position == 1 and q.code_shape((8, 8)) == (q.code_length,)
    )
    default = build_quantizer("multiscale", C)
    assert default.scales == [1, 2, 3, 4, 5, 6, 8] and len(default.phis) == 4
    assert default.phi_ratio == 0.5 and default.commitment_cost == 0.25
    assert default.codebook_lr_parameters() == [default.codebook]


def test_state_dict_round_trip():
    q = make((1, 2, 4)).train()
    q(torch.randn(3, C, 4, 4))  # statistics away from their init
    r = make((1, 2, 4), seed=9)
    r.load_state_dict(q.state_dict())
    assert q.state_dict().keys() == r.state_dict().keys()
    assert "scale_usage_ema" in q.state_dict()
    for k, v in q.state_dict().items():
        assert torch.equal(v, r.state_dict()[k]), k
    x = torch.randn(2, C, 4, 4)
    q.eval(), r.eval()
    assert torch.equal(q(x).quantized, r(x).quantized)


def test_kmeans_init_and_revival():
    q = make((1, 2, 4)).train()
    x = torch.randn(16, C, 4, 4)
    q.init_codebook_kmeans(x, iters=3, generator=torch.Generator().manual_seed(0))
    assert q.code_usage().sum() == 0 and q.scale_code_usage().sum() == 0  # restarted
    # every code is a k-means centre of the input's vectors: inside their hull's box
    flat = x.movedim(1, -1).reshape(-1, C)
    assert (q.codebook >= flat.min(0).values - 1e-5).all()
    assert (q.codebook <= flat.max(0).values + 1e-5).all()
    q(x)
    threshold = 4.0  # some codes are dead at this threshold, some alive
    usage = q.scale_code_usage().double()  # (S, K)
    sides = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    share = sides**2 / (sides**2).sum()
    expect = (usage < threshold * share[:, None]).all(0)
    dead = q.dead_codes(threshold)
    assert torch.equal(dead, expect) and dead.any() and not dead.all()
    residuals = q.scale_residuals(x)
    assert [r.shape for r in residuals] == [(16, C), (64, C), (256, C)]
    revived = q.revive_dead_codes(x, threshold, generator=torch.Generator().manual_seed(1))
    assert torch.equal(revived, dead)
    pool = torch.cat(residuals)
    rows = q.codebook[revived]
    assert all((pool == r).all(1).any() for r in rows)  # each revived code is a residual row
    assert (q.code_usage()[revived] >= threshold - 1e-4).all()
    per_scale = q.scale_code_usage()[:, revived].double()
    assert torch.allclose(per_scale, (threshold * share)[:, None].expand_as(per_scale), rtol=1e-5)
    assert not q.dead_codes(threshold)[revived].any()  # one usage horizon to be picked


def test_revival_feeds_the_scales_by_their_deficit():
    """All K codes dead and no scale using any: each scale gets its share (K / S) of the
    revived codes, as rows of its own residuals; the 1 x 1 scale's 16 rows (one per
    image) get as many codes as the 4 x 4 scale's 256 rows."""
    q = make((1, 2, 4)).train()
    x = torch.randn(16, C, 4, 4)
    q(x)
    residuals = q.scale_residuals(x)  # before the revival: what each scale searched
    revived = q.revive_dead_codes(x, 1e6, generator=torch.Generator().manual_seed(0))
    assert revived.all()
    quota = revival_quota(q.num_embeddings, torch.full((3,), q.num_embeddings))
    assert sum(quota) == q.num_embeddings and max(quota) - min(quota) <= 1
    at = 0
    for rows, n in zip(residuals, quota, strict=True):
        mine = q.codebook[at : at + n]  # the dead codes are dealt out in index order
        assert all(bool((rows == r).all(1).any()) for r in mine)
        at += n


def test_revival_quota_against_a_reference():
    cases = [(10, [3, 1, 0]), (7, [1, 1, 1]), (5, [0, 0, 0]), (0, [4, 2]), (100, [500, 30, 0, 2])]
    for n, deficit in cases:
        q = revival_quota(n, torch.tensor(deficit))
        d = [float(v) for v in deficit] if sum(deficit) else [1.0] * len(deficit)
        exact = [n * v / sum(d) for v in d]
        assert sum(q) == n and all(abs(a - b) < 1 for a, b in zip(q, exact, strict=True))
    assert revival_quota(10, torch.tensor([3, 1, 0])) == [8, 2, 0]
    assert revival_quota(2, torch.tensor([1, 1, 1])) == [1, 1, 0]  # ties: the coarser


def test_a_code_one_coarse_scale_uses_is_alive():
    """Pooled, a code used only at 1 x 1 (1 of 21 positions per map) at its uniform rate
    falls below a threshold of 1; per scale it is alive."""
    q = make((1, 2, 4)).train()
    k = q.num_embeddings
    counts = torch.zeros(3, k)
    counts[0, 0] = 0.5  # code 0: half a use per batch at 1 x 1 (share 1/21 of 1.0)
    counts[2, 1:] = 10.0
    q.scale_usage_ema.copy_(counts)
    q.usage_ema.copy_(counts.sum(0))
    q.usage_updates.fill_(10**6)  # debias factor 1
    assert bool(q.code_usage()[0] < 1.0)  # dead by the pooled rule
    assert not q.dead_codes(1.0)[0]
    counts[0, 0] = 0.04  # below 1/21: dead at every scale
    q.scale_usage_ema.copy_(counts)
    assert q.dead_codes(1.0)[0]


def test_the_search_builds_no_n_by_k_tensor():
    """K = 2**16 codes, 8 x 8 grid: an N x K float32 distance matrix at the last scale
    would be 2 * 64 * 2**16 * 4 = 32 MiB; no single allocation of the forward comes near."""
    big = 2**16
    torch.manual_seed(0)
    q = MultiScaleVQ(big, 4, scales=(1, 2, 4, 8), max_scratch_bytes=2**20).train()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, profile_memory=True) as prof:
        out = q(x)
        out.loss.backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    n_by_k = 2 * 64 * big * 4
    assert 0 < largest < n_by_k / 4, largest
    assert out.indices.shape == (2, 1 + 4 + 16 + 64)


def test_compiles_to_one_graph_and_runs_in_bf16():
    q = make((1, 2, 4)).eval()
    x = torch.randn(2, C, 4, 4)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(q)(x)
    assert explain.graph_count == 1 and explain.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(q.train(), backend="aot_eager", fullgraph=True)
    xc = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the residual pass stays float32
        out = compiled(xc)
    out.loss.backward()
    eager = q(x)
    assert torch.equal(out.indices, eager.indices) and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    xb = x.bfloat16().requires_grad_(True)
    ob = q(xb)
    (ob.loss + ob.quantized.float().sum()).backward()
    assert ob.quantized.dtype == xb.grad.dtype == torch.bfloat16
    assert torch.equal(ob.indices, q(xb.detach().float()).indices)


def test_code_groups_counts_equal_a_direct_count_of_split_codes():
    """The contract's per-group view: ``code_groups`` names the scales, the rows of
    ``counts`` are each scale's bincount of its ``split_codes`` map, in training and in
    eval; ``group_code_usage`` is the per-scale EMA; ``code_prefix`` keeps the first n
    scales' codes, and single-group quantizers have none of it."""
    q = make((1, 2, 4))
    assert q.code_groups == ("1x1", "2x2", "4x4")
    x = torch.randn(5, C, 4, 4)
    for mode in (True, False):
        out = q.train(mode)(x)
        direct = torch.stack(
            [torch.bincount(m.reshape(-1), minlength=K) for m in q.split_codes(out.indices)]
        )
        assert torch.equal(out.counts, direct)
    torch.testing.assert_close(q.group_code_usage(), q.scale_code_usage())
    codes = q.encode(x)
    assert torch.equal(q.code_prefix(codes, 2), codes[:, :5])
    assert torch.equal(q.code_prefix(codes, 3), codes)
    torch.testing.assert_close(q.decode(q.code_prefix(codes, 2)), q.decode(codes, num_scales=2))
    for n in (0, 4, 1.5, True):
        with pytest.raises(UserError, match=r"in \[1, 3\]"):
            q.code_prefix(codes, n)
    with pytest.raises(UserError, match=r"in \[1, 2\]"):  # a prefix holds fewer scales
        q.code_prefix(codes[:, :5], 3)
    with pytest.raises(UserError, match="first N scales"):
        q.code_prefix(codes[:, :4], 1)
    vq = build_quantizer("vq", C, num_embeddings=K)
    assert vq.code_groups is None and vq.group_code_usage() is None
    with pytest.raises(UserError, match="multi-scale tokenizer"):
        vq.code_prefix(torch.zeros(2, 4, 4, dtype=torch.long), 1)
    rvq = build_quantizer("rvq", C, num_embeddings=K)
    assert rvq.code_groups is None  # its stages stay pooled in the health figures


# -- distributed: 2 processes (gloo, CPU) under the harness of test_distributed.py ---------

MS_RUN = dict(
    steps=4, batch_size=8, log_every=2, eval_every=4, eval_images=16, progress=False, seed=3,
    quantizer="multiscale", scales="1,2,4,7", phi_convs=2, init="kmeans", init_batches=1,
    revive_every=2, dead_threshold=30.0, hidden=32, res_hidden=8, res_layers=1,
    num_embeddings=32, embedding_dim=8,
)  # fmt: skip


def _ms_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a 2-process multiscale ``Trainer`` run (k-means init, revival every 2
    steps): saves its model's state and, per training step, the quantizer's local and
    global (S, K) counts."""
    import os

    from vqkit.training.tokenizer import TrainConfig, Trainer

    torch.set_num_threads(1)
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
    trainer = Trainer(TrainConfig.build(out_dir=out, dist_timeout=60.0, **MS_RUN))
    q = trainer.model.quantizer
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = q._global_counts

    def spy(counts: torch.Tensor) -> torch.Tensor:
        summed = real(counts)
        steps.append((counts.clone(), summed.clone()))
        return summed

    q._global_counts = spy
    revivals: list[tuple[int, torch.Tensor]] = []
    real_revive = q.revive_dead_codes

    def spy_revive(*args, **kwargs) -> torch.Tensor:
        mask = real_revive(*args, **kwargs)
        revivals.append((len(steps), mask.clone()))
        return mask

    q.revive_dead_codes = spy_revive
    trainer.finish = lambda: {"step": trainer.step}  # no final evaluation, pictures
    trainer.fit()
    res = {
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "local": torch.stack([a for a, _ in steps]),
        "global": torch.stack([b for _, b in steps]),
        "scale_usage": q.scale_code_usage().clone(),
        "group_usage": q.group_code_usage().clone(),
        "decay": q.usage_decay,
        "revived_after": torch.tensor([t for t, _ in revivals]),
        "revived": torch.stack([m for _, m in revivals]),
    }
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_processes_hold_identical_codebooks_phis_and_per_scale_statistics(tmp_path):
    """2-rank multiscale training (gloo, each rank under the harness's deadline), k-means
    init and revival on: every rank ends with the same codebook, phi convs and usage
    statistics (pooled and per scale); each step's (S, K) counts are the sum of the ranks'
    own; the per-scale usage EMA is that of those global counts; the records' per-scale
    health is that of the global batches' counts."""
    import json

    from tests.test_distributed import run_ranks
    from vqkit.metrics import codebook_health

    run_ranks(_ms_rank, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["model"].keys() == r1["model"].keys()
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    assert any(k.startswith("quantizer.phis.") for k in r0["model"])
    assert torch.equal(r0["scale_usage"], r1["scale_usage"])
    assert torch.equal(r0["group_usage"], r0["scale_usage"])
    # the counts: 4 steps x (S, K); global = rank 0's + rank 1's, the same on both ranks
    assert r0["global"].shape == (4, 4, 32)
    assert torch.equal(r0["global"], r1["global"])
    assert torch.equal(r0["global"], r0["local"] + r1["local"])
    assert not torch.equal(r0["local"], r1["local"])  # the shards differ
    sides = torch.tensor([1, 2, 4, 7])
    assert torch.equal(r0["global"].sum(-1), (2 * 8 * sides**2).expand(4, 4))
    # the per-scale usage EMA (since the k-means init restarted it) of the global counts,
    # a revived code's restarted at its scale's share of the threshold (30) at every scale
    decay = r0["decay"]
    share = sides.double() ** 2 / (sides.double() ** 2).sum()
    revived = dict(zip(r0["revived_after"].tolist(), r0["revived"], strict=True))
    assert r0["revived"].any() and torch.equal(r0["revived"], r1["revived"])
    ema = torch.zeros(4, 32, dtype=torch.float64)
    for t, c in enumerate(r0["global"], start=1):
        ema = ema * decay + c.double() * (1 - decay)
        if t in revived:
            start = (30.0 * share * (1 - decay**t))[:, None].expand_as(ema)
            ema = torch.where(revived[t], start, ema)
    torch.testing.assert_close(
        r0["scale_usage"].double(), ema / (1 - decay**4), rtol=1e-5, atol=1e-5
    )
    # the records (rank 0's) give the health of the global counts of their window
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    assert sum(r["revived"] for r in train) > 0  # revival ran (and changed the codebook)
    for rec, window in zip(train, (r0["global"][:2].sum(0), r0["global"][2:].sum(0)), strict=True):
        groups = rec["code_groups"]
        assert list(groups) == ["1x1", "2x2", "4x4", "7x7"]
        for g, name in enumerate(groups):
            want = codebook_health(window[g])
            assert groups[name]["codes_used"] == want["codes_used"], name
            assert groups[name]["window_perplexity"] == want["perplexity"], name
        assert rec["codes_used"] == codebook_health(window.sum(0))["codes_used"]
