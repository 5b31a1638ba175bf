"""Tests of vqkit's step module: precision, channels-last, compile, clipping."""

from __future__ import annotations

import pytest
import torch

from vqkit.models import VQVAE
from vqkit.training.step import StepRunner
from vqkit.training.tokenizer import TrainConfig

SMALL = dict(hidden=32, res_hidden=8, res_layers=1, num_embeddings=32, embedding_dim=8)


def _runner(**options) -> StepRunner:
    torch.manual_seed(0)
    cfg = TrainConfig(**SMALL, **options)
    model = VQVAE(cfg.model_config(3, 16))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return StepRunner(
        model, model, opt, cfg.step_options, torch.device("cpu"), grad_clip=cfg.grad_clip
    )


def _batches(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(4, 3, 16, 16, generator=g) - 0.5 for _ in range(n)]


def _losses(runner: StepRunner, batches: list[torch.Tensor]) -> list[float]:
    return [runner(x, 0.08)[0]["loss"] for x in batches]


def test_gradient_norm_is_clipped_to_the_bound():
    runner = _runner(grad_clip=1e-3)
    seen = []
    real = runner.optimizer.step

    def step(*a, **k):
        grads = [p.grad for p in runner.model.parameters() if p.grad is not None]
        seen.append(
            float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            )
        )
        return real(*a, **k)

    runner.optimizer.step = step  # type: ignore[method-assign]
    values, _ = runner(_batches(1)[0], 0.08)
    assert values["grad_norm"] > 1e-3  # the norm before clipping is logged
    assert seen[0] <= 1e-3 * (1 + 1e-5)
    assert "grad_norm" not in _runner()(_batches(1)[0], 0.08)[0]  # off by default


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_tracks_fp32(precision):
    batches = _batches()
    ref = _losses(_runner(), batches)
    low = _runner(precision=precision)
    got = _losses(low, batches)
    assert got == pytest.approx(ref, rel=0.05)
    if precision == "fp16":  # the scaler's state is part of the checkpoint
        assert low.scaler is not None
        state = low.state_dict()["grad_scaler"]
        fresh = _runner(precision="fp16")
        assert fresh.load_state_dict(low.state_dict()) == []
        assert fresh.scaler is not None and fresh.scaler.get_scale() == state["scale"]
        notes = fresh.load_state_dict({})
        assert notes and "scaler" in notes[0]


def test_channels_last_gives_the_same_losses():
    batches = _batches()
    ref = _losses(_runner(), batches)
    runner = _runner(channels_last=True)
    assert runner.model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert _losses(runner, batches) == pytest.approx(ref, rel=1e-4)


def test_compiled_step_matches_eager():
    # the one compile of the suite (~30-60 s on a small CPU)
    batches = _batches()
    eager, compiled = _runner(), _runner(compile=True)
    assert _losses(compiled, batches) == pytest.approx(_losses(eager, batches), rel=1e-4)
    for (k, a), b in zip(
        eager.model.state_dict().items(), compiled.model.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5), k
