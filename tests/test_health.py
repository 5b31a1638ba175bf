"""Tests of vqkit's health module."""

from __future__ import annotations

import torch

from vqkit.training.tokenizer import TrainConfig

SMALL = dict(hidden=32, res_hidden=8, res_layers=1, num_embeddings=32, embedding_dim=8)


def test_trainer_revives_the_gradient_codebook_and_resets_its_adam_rows(tmp_path, monkeypatch):
    from vqkit import codebook as codebook_mod
    from vqkit.training import health as health_mod
    from vqkit.training.tokenizer import Trainer

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


def test_init_defaults_adapt_to_the_codebook_size():
    """``init_iters`` left open resolves to 10 up to 4096 codes and fewer above; the
    default init batch count gives 16 vectors per code up to 4096, 4 at 16384; explicit
    values win."""
    from vqkit.training.health import CodebookHealth

    class Q:
        supports_init = supports_revival = True

        def __init__(self, k: int) -> None:
            self.num_codes = k

    cfg = TrainConfig.build(batch_size=32, progress=False)
    assert cfg.init_iters is None
    for k, iters, batches in ((512, 10, 4), (4096, 10, 32), (16384, 3, 32), (65536, 2, 64)):
        resolved = cfg.with_health_defaults(True, True, 32 * 64, k)
        assert resolved.init_iters == iters
        assert CodebookHealth(resolved, Q(k)).init_batch_count(64, 1) == batches
    explicit = TrainConfig.build(batch_size=32, init_iters=7, init_batches=5, progress=False)
    resolved = explicit.with_health_defaults(True, True, 32 * 64, 65536)
    assert resolved.init_iters == 7
    assert CodebookHealth(resolved, Q(65536)).init_batch_count(64, 1) == 5


def test_per_scale_health_in_the_training_records(tmp_path):
    """A multi-scale run's train records carry ``code_groups``: per scale the window's
    perplexity, usage, codes used and dead codes (by the per-scale usage EMA), each
    scale's window counts adding up to its positions; a vq run's records carry none."""
    import json

    from vqkit.metrics import codebook_health, dead_codes
    from vqkit.training.tokenizer import Trainer

    common = dict(steps=4, batch_size=8, log_every=4, eval_every=4, eval_images=16, progress=False)
    cfg = TrainConfig.build(
        out_dir=str(tmp_path / "ms"), quantizer="multiscale", scales="1,2,4,7", **common, **SMALL
    )
    trainer = Trainer(cfg)
    captured = {}
    real = trainer.health.figures

    def spy(counts, group_counts=None):
        captured["rows"] = None if group_counts is None else group_counts.clone()
        return real(counts, group_counts)

    trainer.health.figures = spy
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "ms" / "metrics.jsonl").open()]
    train = [r for r in records if r.get("kind") == "train"][-1]
    groups = train["code_groups"]
    assert list(groups) == ["1x1", "2x2", "4x4", "7x7"]
    rows = captured["rows"]
    assert rows.shape == (4, 32)
    assert rows.sum(1).tolist() == [4 * 8 * s * s for s in (1, 2, 4, 7)]  # 4 steps x 8 images
    usage = trainer.model.quantizer.group_code_usage()
    for g, name in enumerate(groups):
        want = codebook_health(rows[g])
        assert groups[name]["codes_used"] == want["codes_used"]
        assert groups[name]["window_usage"] == want["window_usage"]
        assert groups[name]["window_perplexity"] == want["perplexity"]
        assert groups[name]["dead"] == int(
            dead_codes(usage[g], trainer.config.dead_threshold).sum()
        )
    # a single-scale run: nothing new
    cfg = TrainConfig.build(out_dir=str(tmp_path / "vq"), quantizer="vq", **common, **SMALL)
    Trainer(cfg).fit()
    records = [json.loads(line) for line in (tmp_path / "vq" / "metrics.jsonl").open()]
    assert not any("code_groups" in r for r in records)


def test_rvq_stages_revive_their_own_adam_rows(tmp_path, monkeypatch):
    """Residual VQ of gradient-trained stages in the image job: the revival's (Q, K)
    mask restarts row i's codes in stage i's codebook only, and the weight average
    restarts the rows revived in any stage."""
    from vqkit import codebook as codebook_mod
    from vqkit.training import health as health_mod
    from vqkit.training.tokenizer import Trainer

    calls, ema_rows = [], []
    real = codebook_mod.reset_optimizer_rows

    def spy(optimizer, param, rows):
        calls.append((param, rows.clone()))
        return real(optimizer, param, rows)

    monkeypatch.setattr(health_mod, "reset_optimizer_rows", spy)
    cfg = TrainConfig.build(
        out_dir=str(tmp_path / "run"), steps=4, batch_size=8, revive_every=4,
        dead_threshold=2.0, log_every=4, eval_every=4, eval_images=16, progress=False,
        quantizer="rvq", stage="vq", num_quantizers=2, weight_ema=0.9, **SMALL,
    )  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.config.init == "kmeans"  # rvq has codebooks: auto -> kmeans
    ema = trainer.runner.ema
    real_rows = ema.reset_rows

    def reset_rows(model, prefix, mask):
        ema_rows.append(mask.clone())
        return real_rows(model, prefix, mask)

    ema.reset_rows = reset_rows
    masks = []
    q = trainer.model.quantizer
    real_revive = q.revive_dead_codes

    def revive(*a, **k):
        masks.append(real_revive(*a, **k))
        return masks[-1]

    q.revive_dead_codes = revive
    trainer.fit()
    assert len(masks) == 1 and masks[0].shape == (2, 32) and bool(masks[0].any())
    assert [p for p, _ in calls] == [q.stage(0).codebook, q.stage(1).codebook]
    for (_, rows), want in zip(calls, masks[0], strict=True):
        assert torch.equal(rows, want)
    assert len(ema_rows) == 1 and torch.equal(ema_rows[0], masks[0].any(0))
