"""Codebook health for every codebook quantizer: the usage buffer, k-means init,
dead-code revival of a gradient-trained codebook with its optimizer state, presets."""

from __future__ import annotations

import pytest
import torch

from vqkit import VectorQuantizer, VectorQuantizerEMA
from vqkit.codebook import reset_optimizer_rows
from vqkit.quantizers import ResidualVQ
from vqkit.train import PRESETS, TrainConfig

K, D = 16, 4


def clusters(k: int, n_per: int, d: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` well-separated clusters: (centres (k, d), shuffled points (k * n_per, d))."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    centres = 8.0 * centres / centres.norm(dim=1, keepdim=True) + 3.0 * torch.arange(k)[:, None]
    pts = centres.repeat_interleave(n_per, 0) + 0.05 * torch.randn(k * n_per, d, generator=g)
    return centres, pts[torch.randperm(k * n_per, generator=g)]


# -- usage buffer ------------------------------------------------------------------------


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


# -- k-means init --------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [False, True])
def test_kmeans_init_finds_every_cluster_for_the_gradient_codebook(affine):
    centres, pts = clusters(K, 30)
    q = VectorQuantizer(K, D, affine_codebook=affine)
    if affine:
        with torch.no_grad():  # a non-trivial affine map must be inverted
            q.codebook_scale.fill_(2.0)
            q.codebook_shift.fill_(-1.0)
    q.init_codebook_kmeans(pts, iters=10, generator=torch.Generator().manual_seed(0))
    codes = q.effective_codebook().detach()
    # every cluster has a code within its spread, and every code sits on a cluster
    d = torch.cdist(centres, codes)
    assert (d.min(dim=1).values < 0.2).all()
    assert (d.min(dim=0).values < 0.2).all()
    assert int(q.usage_updates) == 0


# -- revival and the optimizer ---------------------------------------------------------------


def collapsed_vq(optimizer_cls=torch.optim.Adam, **opt):
    """A gradient codebook trained on clustered data from a collapsed start (every code
    at one point), so one code takes everything and the optimizer has momentum."""
    torch.manual_seed(0)
    _, pts = clusters(K, 20)
    q = VectorQuantizer(K, D, usage_decay=0.5).train()
    with torch.no_grad():
        q.codebook.fill_(50.0)  # far away: every point picks code 0 (ties: lowest)
    optim = optimizer_cls(q.parameters(), lr=0.05, **opt)
    for _ in range(5):
        out = q(pts)
        optim.zero_grad()
        out.loss.backward()
        optim.step()
    return q, optim, pts


def test_collapsed_codebook_is_detected():
    q, _, pts = collapsed_vq()
    out = q(pts)
    assert int((out.counts > 0).sum()) == 1
    assert int(q.dead_codes(1.0).sum()) == K - 1


@pytest.mark.parametrize(
    "optimizer_cls, opt",
    [
        (torch.optim.Adam, {}),
        (torch.optim.SGD, {"momentum": 0.9}),
        (torch.optim.RMSprop, {"momentum": 0.9}),
    ],
)
def test_reset_optimizer_rows_stops_momentum_pulling_revived_codes_back(optimizer_cls, opt):
    q, optim, pts = collapsed_vq(optimizer_cls, **opt)
    # the dead codes received no gradient, but SGD momentum / Adam moments from the
    # shared start would still move them; give every row some history to make sure
    for state in optim.state[q.codebook].values():
        if isinstance(state, torch.Tensor) and state.shape == q.codebook.shape:
            state.add_(0.5)
    mask = q.revive_dead_codes(pts, threshold=1.0, generator=torch.Generator().manual_seed(0))
    assert int(mask.sum()) == K - 1
    revived = q.codebook.detach()[mask].clone()
    # revived codes are points of the batch
    assert (revived[:, None, :] == pts[None]).all(-1).any(1).all()
    touched = reset_optimizer_rows(optim, q.codebook, mask)
    assert touched >= 1
    # a step in which the revived rows get no gradient leaves them exactly in place
    optim.zero_grad()
    q.codebook.grad = torch.zeros_like(q.codebook)
    optim.step()
    assert torch.equal(q.codebook.detach()[mask], revived)
    # control: without the reset, the same step moves them (old momentum)
    q2, optim2, _ = collapsed_vq(optimizer_cls, **opt)
    for state in optim2.state[q2.codebook].values():
        if isinstance(state, torch.Tensor) and state.shape == q2.codebook.shape:
            state.add_(0.5)
    q2.revive_dead_codes(pts, threshold=1.0, generator=torch.Generator().manual_seed(0))
    optim2.zero_grad()
    q2.codebook.grad = torch.zeros_like(q2.codebook)
    optim2.step()
    assert not torch.equal(q2.codebook.detach()[mask], revived)


def test_revival_makes_dead_codes_used_within_a_few_steps():
    q, optim, pts = collapsed_vq()
    g = torch.Generator().manual_seed(0)
    mask = q.revive_dead_codes(pts, threshold=1.0, generator=g)
    reset_optimizer_rows(optim, q.codebook, mask)
    for _ in range(3):
        out = q(pts)
        optim.zero_grad()
        out.loss.backward()
        optim.step()
    assert int((out.counts > 0).sum()) >= K - 3
    assert int(q.dead_codes(1.0).sum()) <= 3
    # the codebook loss keeps the revived codes on the data instead of dragging them away
    used = out.counts > 0
    assert torch.cdist(q.codebook.detach()[used], pts).min(dim=1).values.max() < 1.0


def test_revival_validates_threshold():
    q = VectorQuantizer(K, D)
    with pytest.raises(ValueError, match="threshold"):
        q.revive_dead_codes(torch.randn(8, D), threshold=0.0)


def test_affine_codebook_forward_decode_and_gradients():
    torch.manual_seed(0)
    q = VectorQuantizer(K, D, affine_codebook=True).train()
    x = torch.randn(2, D, 3, 3, requires_grad=True)
    out = q(x)
    assert torch.equal(q.decode(out.indices), out.quantized.detach())
    out.loss.backward()
    # the shared scale and shift learn from every assigned vector
    assert q.codebook_scale.grad.abs().sum() > 0 and q.codebook_shift.grad.abs().sum() > 0
    assert "affine_codebook=True" in repr(q)


# -- presets and trainer wiring ------------------------------------------------------------


def test_preset_sets_defaults_and_explicit_values_win():
    cfg = TrainConfig.build(preset="vq-healthy")
    for key, value in PRESETS["vq-healthy"].items():
        assert getattr(cfg, key) == value
    cfg = TrainConfig.build(preset="vq-healthy", revive_every=7)
    assert cfg.revive_every == 7 and cfg.init == "kmeans"
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.build(preset="nope")
    with pytest.raises(ValueError, match="preset"):
        TrainConfig(preset="nope")


def test_preset_from_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"preset": "ema-healthy", "dead_threshold": 0.5}')
    cfg = TrainConfig.from_file(path, steps=3)
    assert cfg.quantizer == "ema" and cfg.init == "kmeans" and cfg.dead_threshold == 0.5
    assert cfg.steps == 3


SMALL = dict(hidden=32, res_hidden=8, res_layers=1, num_embeddings=32, embedding_dim=8)


def test_trainer_revives_the_gradient_codebook_and_resets_its_adam_rows(tmp_path, monkeypatch):
    from vqkit import codebook as codebook_mod
    from vqkit import health as health_mod
    from vqkit.train import Trainer

    calls = []
    real = codebook_mod.reset_optimizer_rows

    def spy(optimizer, param, rows):
        calls.append((param, int(rows.sum())))
        return real(optimizer, param, rows)

    monkeypatch.setattr(health_mod, "reset_optimizer_rows", spy)
    cfg = TrainConfig.build(
        preset="vq-healthy",
        out_dir=str(tmp_path / "run"),
        steps=12,
        batch_size=8,
        revive_every=4,
        dead_threshold=2.0,  # most of 32 codes are below 2 uses per batch of 392
        log_every=4,
        eval_every=12,
        eval_images=16,
        progress=False,
        **SMALL,
    )
    trainer = Trainer(cfg)
    assert trainer.health.init_batch_count(7 * 7, 1) == 2  # 16 x 32 codes / (8 images x 7 x 7)
    trainer.fit()
    q = trainer.model.quantizer
    assert len(calls) == 3 and all(p is q.codebook for p, _ in calls)
    assert sum(n for _, n in calls) > 0
    import json

    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train_logs = [r for r in logs if r["kind"] == "train"]
    assert sum(r["revived"] for r in train_logs) == sum(n for _, n in calls)
    assert all("dead" in r and "codes_used" in r for r in train_logs)
    assert int(q.usage_updates) == 12


def test_codebook_lr_scale_makes_a_second_param_group(tmp_path):
    from vqkit.train import Trainer

    cfg = TrainConfig(
        quantizer="vq",
        affine_codebook=True,
        codebook_lr_scale=0.1,
        out_dir=str(tmp_path / "r"),
        steps=0,
        progress=False,
        **SMALL,
    )
    trainer = Trainer(cfg)
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2
    q = trainer.model.quantizer
    assert {id(p) for p in groups[1]["params"]} == {
        id(q.codebook),
        id(q.codebook_scale),
        id(q.codebook_shift),
    }
    assert groups[1]["lr"] == pytest.approx(cfg.lr * 0.1)
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(trainer.model.parameters()))


def test_model_config_rejects_codebook_options_for_fsq():
    from vqkit.models import VQVAEConfig

    with pytest.raises(ValueError, match="codebook_dim"):
        VQVAEConfig(quantizer="fsq", codebook_dim=4)
    with pytest.raises(ValueError, match="affine_codebook"):
        VQVAEConfig(quantizer="ema", affine_codebook=True)
    cfg = VQVAEConfig(quantizer="ema", codebook_dim=4, use_cosine=True)
    from vqkit.models import VQVAE

    m = VQVAE(cfg)
    assert m.quantizer.codebook_dim == 4 and m.quantizer.use_cosine


def test_fsq_tracks_usage_for_small_grids_only():
    from vqkit.quantizers import FSQ

    q = FSQ([3, 3], usage_decay=0.5).train()
    x = torch.randn(4, 2, 3, 3)
    counts = q(x).counts
    torch.testing.assert_close(q.code_usage(), counts.float())  # debiased after one step
    assert "usage_ema" in q.state_dict()
    big = FSQ([8, 8], max_bincount=10).train()
    big(torch.randn(2, 2, 3, 3))
    assert not big.tracks_usage and big.code_usage() is None
    with pytest.raises(RuntimeError, match="usage"):
        big.dead_codes()


def test_preset_on_the_command_line_beats_the_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"quantizer": "ema", "steps": 10}')
    cfg = TrainConfig.from_file(path, preset="vq-healthy")
    assert cfg.quantizer == "vq" and cfg.init == "kmeans" and cfg.steps == 10
    cfg = TrainConfig.from_file(path, preset="vq-healthy", quantizer="ema")
    assert cfg.quantizer == "ema" and cfg.revive_every == PRESETS["vq-healthy"]["revive_every"]
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.from_file(path, preset="nope")


def test_reset_optimizer_rows_rejects_a_mask_of_the_wrong_length():
    q, optim, _ = collapsed_vq()
    with pytest.raises(ValueError, match="row mask"):
        reset_optimizer_rows(optim, q.codebook, torch.ones(K + 1, dtype=torch.bool))


@pytest.mark.parametrize("cls", [VectorQuantizer, VectorQuantizerEMA])
def test_init_and_revival_reject_bad_vectors(cls):
    q = cls(K, D).train()
    bad = torch.randn(32, D)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        q.init_codebook_kmeans(bad)
    with pytest.raises(ValueError, match="NaN"):
        q.revive_dead_codes(bad, threshold=1.0)
    with pytest.raises(ValueError, match="channels"):
        q.revive_dead_codes(torch.randn(32, D + 1), threshold=1.0)
    with pytest.raises(TypeError, match="floating"):
        q.init_codebook_kmeans(torch.ones(32, D, dtype=torch.int64))
