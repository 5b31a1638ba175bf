"""Training loop for the VQ-VAE: data, model, optimizer, metrics, checkpoints, pictures.

A run directory holds::

    config.json          the resolved configuration
    metrics.jsonl        one JSON object per log interval ("kind": "train") and per
                         evaluation ("kind": "eval")
    checkpoints/last.pt  written atomically every ``ckpt_every`` steps, at the end,
    checkpoints/best.pt  and on Ctrl-C; best = lowest eval NMSE
    model.safetensors    final weights + model config (for ``VQVAE.from_checkpoint``)
    recon.png            originals (odd rows) above reconstructions (even rows)
    curves.png           loss, NMSE, perplexity, usage against step
    usage.png            codebook-usage histogram on the eval split
    eval.json            final evaluation on the eval split

``resume=True`` continues from ``checkpoints/last.pt``: model, optimizer, EMA
buffers, RNG and data position are restored, so the resumed run produces the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, export_safetensors, load_checkpoint, save_checkpoint
from .data import BatchLoader, ImageData, data_variance, load_dataset, normalize
from .evaluate import evaluate
from .models import VQVAE, VQVAEConfig

__all__ = ["TrainConfig", "Trainer", "train"]

MODEL_KEYS = tuple(
    f.name for f in fields(VQVAEConfig) if f.name not in ("in_channels", "image_size")
)


@dataclass
class TrainConfig:
    """All options of ``vqkit train``; defaults train on the built-in dataset in a few
    minutes on 2 CPU cores."""

    data: str | None = None  # None / "builtin": the shipped Fashion-MNIST subset
    data_format: str = "auto"
    image_size: int | None = None
    channels: int | None = None
    cache_dir: str | None = None
    eval_split: str = "test"
    # model
    hidden: int = 128
    res_hidden: int = 32
    res_layers: int = 2
    num_embeddings: int = 512
    embedding_dim: int = 64
    commitment_cost: float = 0.25
    quantizer: str = "ema"
    decay: float = 0.99
    epsilon: float = 1e-5
    zero_debias: bool = False
    num_quantizers: int = 4  # rvq
    rvq_stage: str = "ema"  # rvq: vq or ema stages
    quantizer_dropout: float = 0.0  # rvq
    shared_codebook: bool = False  # rvq
    levels: str = "8,5,5,5"  # fsq
    # optimisation
    batch_size: int = 32
    steps: int = 1500
    lr: float = 3e-4
    seed: int = 0
    device: str = "auto"
    # bookkeeping
    out_dir: str = "runs/vqkit"
    log_every: int = 50
    eval_every: int = 500
    eval_images: int = 1000
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "log_every", "eval_every", "eval_images"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an int >= 0; got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
        """Options from a JSON file, then ``overrides`` on top."""
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from e
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"config file {path}: unknown keys {sorted(unknown)}")
        return cls(**{**values, **overrides})

    def model_config(self, in_channels: int, image_size: int) -> VQVAEConfig:
        return VQVAEConfig(
            in_channels=in_channels,
            image_size=image_size,
            **{k: getattr(self, k) for k in MODEL_KEYS},
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


class _Window:
    """Averages of the per-step figures over one log interval."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.counts = torch.zeros(self.k, dtype=torch.int64)
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, values: dict[str, float], counts: torch.Tensor, images: int) -> None:
        for key, v in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + v
        self.n += 1
        if counts is not None:  # (K,), (Q, K) for rvq (pooled); None: a huge FSQ grid
            self.counts += counts.reshape(-1, self.k).sum(0).cpu()
        self.images += images

    def summary(self) -> dict[str, float]:
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        out["window_usage"] = float((self.counts > 0).float().mean())
        out["images_per_s"] = self.images / max(time.perf_counter() - self.t0, 1e-9)
        return out


class _DeferredInterrupt:
    """Within the block, the first SIGINT only sets ``requested`` (the loop stops at
    the next step boundary); a second one interrupts at once. Only in the main
    thread, where Python delivers signals."""

    def __init__(self) -> None:
        self.requested = False
        self.completed_step = True
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class Trainer:
    """Owns one training run. ``Trainer(config).fit()``; see the module docstring."""

    def __init__(
        self, config: TrainConfig, *, resume: bool = False, overwrite: bool = False
    ) -> None:
        self.config = config
        self.out = Path(config.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.last_path = self.ckpt_dir / "last.pt"
        self.best_path = self.ckpt_dir / "best.pt"
        if not resume and self.last_path.exists() and not overwrite:
            raise FileExistsError(
                f"{self.out} already holds a run; pass resume=True (--resume) to continue it "
                "or overwrite=True (--overwrite) to start again"
            )
        if resume and not self.last_path.exists():
            raise CheckpointError(f"nothing to resume: {self.last_path} does not exist")
        self.device = resolve_device(config.device)
        self.resume = resume

        self.train_data = load_dataset(
            config.data,
            "train",
            image_size=config.image_size,
            channels=config.channels,
            cache_dir=config.cache_dir,
            format=config.data_format,
        )  # type: ignore[arg-type]
        try:
            self.eval_data: ImageData = load_dataset(
                config.data,
                config.eval_split,
                image_size=config.image_size,
                channels=self.train_data.channels,
                cache_dir=config.cache_dir,
                format=config.data_format,
            )  # type: ignore[arg-type]
        except (FileNotFoundError, ValueError):
            # a source without that split: evaluate on the last 5% of train instead
            n_eval = max(1, len(self.train_data) // 20)
            self.eval_data = self.train_data.subset(slice(len(self.train_data) - n_eval, None))
            self.train_data = self.train_data.subset(slice(0, len(self.train_data) - n_eval))
        self.data_variance = data_variance(self.train_data)

        torch.manual_seed(config.seed)
        size = self.train_data.images.shape[-1]
        self.model_config = config.model_config(self.train_data.channels, size)
        self.model = VQVAE(self.model_config).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.loader = BatchLoader(
            self.train_data, config.batch_size, seed=config.seed, device=self.device
        )
        self.step = 0
        self.best_nmse = math.inf
        if resume:
            self._restore(load_checkpoint(self.last_path, map_location=self.device))

    # -- state ------------------------------------------------------------------
    def _payload(self) -> dict[str, Any]:
        return {
            "model_config": self.model_config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "loader": self.loader.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "train_config": asdict(self.config),
            "data_variance": self.data_variance,
            "best_nmse": self.best_nmse,
        }

    def _restore(self, ckpt: dict[str, Any]) -> None:
        # from_dict: a checkpoint written before a config key existed gets its default
        if VQVAEConfig.from_dict(ckpt["model_config"]).to_dict() != self.model_config.to_dict():
            raise CheckpointError(
                f"{self.last_path}: the checkpoint's model config {ckpt['model_config']} "
                f"does not match this run's {self.model_config.to_dict()}"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.loader.load_state_dict(ckpt["loader"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.step = int(ckpt["step"])
        self.best_nmse = float(ckpt.get("best_nmse", math.inf))

    def save(self) -> None:
        save_checkpoint(self.last_path, self._payload())

    # -- loop -------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def train_step(self, x: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        self.model.train()
        out = self.model(x)
        terms = VQVAE.loss(out, x, self.data_variance)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        values = {k: float(v.detach()) for k, v in terms.items()}
        values["perplexity"] = float(out.vq.perplexity)
        values["usage"] = float(out.vq.usage)
        return values, out.vq.counts

    def evaluate(self, limit: int | None = None) -> dict[str, Any]:
        return evaluate(
            self.model,
            self.eval_data,
            data_variance=self.data_variance,
            device=self.device,
            limit=limit,
        )

    def fit(self) -> dict[str, Any]:
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        run_info = {
            "train": asdict(cfg),
            "model": self.model_config.to_dict(),
            "data": {
                "train": self.train_data.describe(),
                "eval": self.eval_data.describe(),
                "data_variance": self.data_variance,
            },
            "device": str(self.device),
            "torch": torch.__version__,
        }
        (self.out / "config.json").write_text(json.dumps(run_info, indent=2))
        window = _Window(self.model.num_codes)
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True
            )
        stop = _DeferredInterrupt()
        self._loader_state = self.loader.state_dict()
        try:
            with stop:
                self._loop(bar, window, stop)
        except KeyboardInterrupt:
            # Ctrl-C is deferred to a step boundary, so model, optimizer and loader
            # agree. A hard interrupt inside a step (second Ctrl-C) rewinds the
            # loader to before that step's draw, so the batch is drawn again on resume.
            if not stop.completed_step:
                self.loader.load_state_dict(self._loader_state)
            self.save()
            if bar is not None:
                bar.close()
            print(
                f"\ninterrupted at step {self.step}: saved {self.last_path}; continue with --resume"
            )
            raise
        if bar is not None:
            bar.close()
        return self.finish()

    def _loop(self, bar: Any, window: _Window, stop: _DeferredInterrupt) -> None:
        cfg = self.config
        while self.step < cfg.steps:
            stop.completed_step = False
            self._loader_state = self.loader.state_dict()
            x, _ = self.loader.next_batch()
            values, counts = self.train_step(x)
            self.step += 1
            stop.completed_step = True
            window.add(values, counts, x.shape[0])
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(
                    f"loss became {values['loss']} at step {self.step}; lower the learning rate"
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{values['loss']:.4f}",
                    nmse=f"{values['recon_nmse']:.4f}",
                    ppl=f"{values['perplexity']:.1f}",
                    used=f"{values['usage']:.2f}",
                    refresh=False,
                )
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log(
                    {
                        "kind": "train",
                        "step": self.step,
                        "epoch": self.loader.epoch,
                        **window.summary(),
                    }
                )
                window.reset()
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self._periodic_eval()
                self.save()
            if stop.requested:
                raise KeyboardInterrupt

    def _periodic_eval(self) -> None:
        result = self.evaluate(limit=self.config.eval_images)
        result.pop("counts")
        self._log({"kind": "eval", "step": self.step, **result})
        if result["nmse"] < self.best_nmse:
            self.best_nmse = result["nmse"]
            save_checkpoint(self.best_path, self._payload())

    def finish(self) -> dict[str, Any]:
        """Final evaluation on the whole eval split, weights export and pictures."""
        from .plots import plot_curves, plot_usage, save_recon_grid

        result = self.evaluate()
        counts = result.pop("counts")
        result["step"] = self.step
        (self.out / "eval.json").write_text(json.dumps(result, indent=2))
        export_safetensors(self.model, self.out / "model.safetensors")
        n = min(32, len(self.eval_data))
        x = normalize(self.eval_data.images[:n].to(self.device))
        self.model.eval()
        with torch.no_grad():
            recon = self.model(x).recon
        save_recon_grid(x, recon, self.out / "recon.png")
        if (self.out / "metrics.jsonl").exists():
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        plot_usage(counts, self.out / "usage.png", title=f"{self.eval_data.split}:")
        return result


def train(
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a VQ-VAE; returns the final evaluation dict."""
    if config is None:
        config = TrainConfig(**overrides)
    elif overrides:
        config = TrainConfig(**{**asdict(config), **overrides})
    return Trainer(config, resume=resume, overwrite=overwrite).fit()
