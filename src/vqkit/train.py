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

Distributed (``torchrun --nproc_per_node=N -m vqkit train ...``): the process group
is initialised from torchrun's environment (gloo on CPU, NCCL on GPU, one GPU per
process by LOCAL_RANK); the model is wrapped in DistributedDataParallel; each rank
reads its own shard of every epoch (``batch_size`` is per rank, the global batch is
``batch_size * world_size``); the logged metrics are global (all-reduced every step,
together with the Ctrl-C flag so that all ranks stop at the same step); only rank 0
writes files and shows the progress bar. Evaluation runs on rank 0 alone, on the
unwrapped model in eval mode, which calls no collective (the EMA quantizer syncs
only in training mode), so the other ranks cannot hang on it: they simply wait at
the next step's collectives. A checkpoint resumes under any world size (the data
position is mapped to the same point of the global epoch).

Codebook health: ``init="kmeans"`` sets the codebook by k-means++ and ``init_iters``
Lloyd iterations on the initial encoder's latents of ``init_batches`` batches of all
ranks (once, at step 0); ``revive_every=N`` replaces, every N steps, the codes whose
EMA count (the EMA quantizer's cluster size, the plain quantizer's ``usage_ema``) is
below ``dead_threshold`` assignments per global batch by latents of the current
global batch, and for the gradient-trained codebook restarts the optimizer's state of
those rows (:func:`vqkit.codebook.reset_optimizer_rows`). Every log record carries
``dead`` (codes below ``dead_threshold``), ``codes_used``, ``window_perplexity`` and
``revived``. ``preset`` picks a named set of these options (:data:`PRESETS`).
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
import torch.distributed as dist

from . import distributed
from .checkpoint import CheckpointError, export_safetensors, load_checkpoint, save_checkpoint
from .codebook import reset_optimizer_rows
from .data import BatchLoader, ImageData, data_variance, load_dataset, normalize
from .evaluate import evaluate
from .metrics import codebook_health, perplexity, usage_fraction
from .models import VQVAE, VQVAEConfig
from .quantizers import VectorQuantizerEMA

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
    codebook_dim: int = 0  # vq/ema/rvq: code space with in/out projections; 0: embedding_dim
    use_cosine: bool = False  # vq/ema/rvq: l2-normalised codes and inputs
    gradient: str = "ste"  # vq/ema/rvq: "ste" or "rotation" (rotation trick)
    affine_codebook: bool = False  # vq: affine re-parameterised codebook (Huh et al. 2023)
    # optimisation
    batch_size: int = 32
    steps: int = 1500
    lr: float = 3e-4
    seed: int = 0
    device: str = "auto"
    codebook_lr_scale: float = 1.0  # learning rate of codebook parameters = lr * this
    # codebook health
    init: str = "random"  # "random" (the quantizer's own init) or "kmeans"
    init_iters: int = 10
    init_batches: int = 0  # batches of latents for k-means; 0: enough for 16 vectors/code
    revive_every: int = 0  # 0: no revival
    dead_threshold: float = 1.0  # EMA assignments per global batch below which a code is dead
    # bookkeeping
    out_dir: str = "runs/vqkit"
    log_every: int = 50
    eval_every: int = 500
    eval_images: int = 1000
    progress: bool = True
    # a named set of defaults (PRESETS) applied before the file and the flags
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {self.preset!r}")
        if not self.codebook_lr_scale > 0:
            raise ValueError(f"codebook_lr_scale must be > 0; got {self.codebook_lr_scale}")
        for name in ("batch_size", "log_every", "eval_every", "eval_images"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an int >= 0; got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if self.init not in ("random", "kmeans"):
            raise ValueError(f"init must be 'random' or 'kmeans'; got {self.init!r}")
        for name in ("init_iters", "revive_every", "init_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0; got {v!r}")
        if not self.dead_threshold > 0:
            raise ValueError(f"dead_threshold must be > 0; got {self.dead_threshold}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
        """Options from a JSON file, then ``overrides`` on top. A ``preset`` among the
        ``overrides`` (named on the command line) applies over the file's values (and under
        the other overrides); a ``preset`` in the file applies under the file's values."""
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
        preset = overrides.get("preset")
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {preset!r}")
            return cls(**{**values, **PRESETS[preset], **overrides})
        return cls.build(**{**values, **overrides})

    @classmethod
    def build(cls, **values: Any) -> TrainConfig:
        """A config from ``values`` on top of the named ``preset`` among them (if any),
        on top of the defaults: explicit values always win over the preset's."""
        name = values.get("preset")
        if name is not None and name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
        return cls(**{**(PRESETS[name] if name else {}), **values})

    def model_config(self, in_channels: int, image_size: int) -> VQVAEConfig:
        return VQVAEConfig(
            in_channels=in_channels,
            image_size=image_size,
            **{k: getattr(self, k) for k in MODEL_KEYS},
        )


# Named option sets (``--preset``), chosen from the CIFAR-10 runs in docs/results.md.
# dead_threshold is in assignments per global batch: 0.25 is 1/16 of a uniform code's
# share at K = 512 and 32 images of 8 x 8 latents (2048 vectors per batch).
PRESETS: dict[str, dict[str, Any]] = {
    # the gradient-trained codebook that uses its whole codebook: k-means init on the
    # first latents, dead-code revival every 20 steps (often enough to catch the
    # encoder's early growth, when the classic layer collapses) and a 10x codebook
    # learning rate so the codes keep up with the encoder (best of the measured options)
    "vq-healthy": {
        "quantizer": "vq",
        "init": "kmeans",
        "revive_every": 20,
        "dead_threshold": 0.25,
        "codebook_lr_scale": 10.0,
    },
    # the EMA codebook with the same init and revival
    "ema-healthy": {
        "quantizer": "ema",
        "init": "kmeans",
        "revive_every": 20,
        "dead_threshold": 0.25,
    },
}


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
        self.revived = 0

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
        out["revived"] = self.revived
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
        if distributed.env_world_size() > 1 and self.device.type == "cuda":
            if self.device.index is None:  # one GPU per process, by LOCAL_RANK
                self.device = torch.device("cuda", distributed.local_rank())
            torch.cuda.set_device(self.device)
        self.resume = resume
        self._owns_group = distributed.init_from_env(self.device)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        if self.world > 1 and not self.is_main:
            dist.barrier()  # rank 0 loads first (and fills the decode cache)
        self._load_data(config)
        if self.world > 1 and self.is_main:
            dist.barrier()

        torch.manual_seed(config.seed)
        size = self.train_data.images.shape[-1]
        self.model_config = config.model_config(self.train_data.channels, size)
        self.model = VQVAE(self.model_config).to(self.device)
        quantizer = self.model.quantizer
        if config.init == "kmeans" and not hasattr(quantizer, "init_codebook_kmeans"):
            raise ValueError(f"init='kmeans' is not supported by {type(quantizer).__name__}")
        if config.revive_every and not hasattr(quantizer, "revive_dead_codes"):
            raise ValueError(
                f"revive_every is not supported by {type(quantizer).__name__} (the vq and "
                "ema quantizers revive dead codes)"
            )
        self.optimizer = torch.optim.Adam(self._param_groups(), lr=config.lr)
        self.loader = BatchLoader(
            self.train_data,
            config.batch_size,
            seed=config.seed,
            device=self.device,
            rank=self.rank,
            world_size=self.world,
        )
        self.step = 0
        self.best_nmse = math.inf
        if resume:
            self._restore(load_checkpoint(self.last_path, map_location=self.device))
        self.ddp: torch.nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # broadcast_buffers=False: DDP would otherwise copy rank 0's buffers to every
            # rank before each forward. The EMA codebook and statistics are buffers that
            # are already identical on every rank, because every update is computed from
            # statistics all-reduced inside the quantizer; the broadcast would only cost
            # a collective per step. (At construction DDP still syncs parameters and
            # buffers from rank 0 once.)
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )

    def _param_groups(self) -> list[dict[str, Any]]:
        """One group for everything, a second at ``lr * codebook_lr_scale`` for the
        quantizer's codebook parameters when the scale is not 1."""
        if self.config.codebook_lr_scale == 1.0:
            return [{"params": list(self.model.parameters())}]
        names = ("codebook", "codebook_scale", "codebook_shift")
        codebook = [
            p for n, p in self.model.quantizer.named_parameters() if n.split(".")[-1] in names
        ]
        ids = {id(p) for p in codebook}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        groups: list[dict[str, Any]] = [{"params": rest}]
        if codebook:
            groups.append(
                {"params": codebook, "lr": self.config.lr * self.config.codebook_lr_scale}
            )
        return groups

    def _load_data(self, config: TrainConfig) -> None:
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
            "world_size": self.world,
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
        """Write ``checkpoints/last.pt`` (rank 0 only; the other ranks hold the same state)."""
        if self.is_main:
            save_checkpoint(self.last_path, self._payload())

    # -- loop -------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def train_step(self, x: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        self.model.train()
        out = self.ddp(x)
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
        """Train to ``steps``; returns the final evaluation (rank 0; ``{"step": ...}``
        on the other ranks). Tears down a process group it created."""
        try:
            return self._fit()
        finally:
            if self._owns_group:
                distributed.teardown()

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        if self.is_main:
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
            "world_size": self.world,
            "global_batch_size": cfg.batch_size * self.world,
            "torch": torch.__version__,
        }
        if self.is_main:
            (self.out / "config.json").write_text(json.dumps(run_info, indent=2))
        window = _Window(self.model.num_codes)
        bar = None
        if cfg.progress and self.is_main:
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
            if self.is_main:
                print(
                    f"\ninterrupted at step {self.step}: saved {self.last_path}; "
                    "continue with --resume"
                )
            raise
        if bar is not None:
            bar.close()
        if not self.is_main:
            return {"step": self.step}
        return self.finish()

    def _generator(self, *tag: int) -> torch.Generator:
        """A CPU generator seeded by (seed, *tag): the same on every rank, no state to save,
        and the global RNG is left alone."""
        g = torch.Generator()
        g.manual_seed(hash((self.config.seed, *tag)) & ((1 << 62) - 1))
        return g

    @torch.no_grad()
    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_latents(x)

    def init_batch_count(self) -> int:
        """Batches (per rank) whose latents feed the k-means init: ``init_batches``, or
        (0) enough for about 16 vectors per code, at least one."""
        if self.config.init_batches:
            return self.config.init_batches
        positions = (self.model_config.image_size // 4) ** 2
        per_batch = self.config.batch_size * self.world * positions
        return max(1, math.ceil(16 * self.model.num_codes / per_batch))

    def init_codebook(self) -> None:
        """``init="kmeans"``: k-means on the initial encoder's latents of
        :meth:`init_batch_count` batches of every rank. The batches come from a loader
        of their own (another seed, same shards), so the training stream is the same
        with and without the init."""
        loader = BatchLoader(
            self.train_data,
            self.config.batch_size,
            seed=self.config.seed + 7919,
            device=self.device,
            rank=self.rank,
            world_size=self.world,
        )
        latents = [self._latents(loader.next_batch()[0]) for _ in range(self.init_batch_count())]
        q = self.model.quantizer
        flat = torch.cat([q.to_flat(z) for z in latents])
        q.init_codebook_kmeans(  # type: ignore[operator]
            flat, iters=self.config.init_iters, generator=self._generator(0)
        )

    def revive(self, x: torch.Tensor) -> int:
        """Replace dead codes by latents of this step's global batch (same on all ranks);
        for a gradient-trained codebook, the optimizer's state of the revived rows is
        restarted too, so momentum cannot pull them back."""
        q = self.model.quantizer
        mask = q.revive_dead_codes(  # type: ignore[operator]
            self._latents(x),
            threshold=self.config.dead_threshold,
            generator=self._generator(1, self.step),
        )
        codebook = getattr(q, "codebook", None)
        if isinstance(codebook, torch.nn.Parameter):
            reset_optimizer_rows(self.optimizer, codebook, mask)
        return int(mask.sum())

    def _global(
        self, values: dict[str, float], counts: torch.Tensor | None, stop: bool
    ) -> tuple[dict[str, float], torch.Tensor | None, bool]:
        """Step figures of the global batch, and whether ANY rank asked to stop, by one
        all-reduce (identity in one process): the ranks' losses are averaged, the per-code
        counts summed (the EMA quantizer's are global already) and, for one codebook,
        perplexity and usage recomputed from the global counts (otherwise averaged)."""
        if self.world == 1:
            return values, counts, stop
        # quantizers that track usage (codebooks, also as residual stages, and small FSQ
        # grids) return training counts summed over ranks already
        leaves = [
            m
            for m in self.model.quantizer.modules()
            if isinstance(getattr(m, "usage_ema", None), torch.Tensor)
        ]
        counts_global = bool(leaves) and all(m.sync_stats for m in leaves)
        reduce_counts = counts is not None and not counts_global
        keys = list(values)
        parts = [torch.tensor([values[k] for k in keys] + [float(stop)], dtype=torch.float64)]
        if reduce_counts:
            parts.append(counts.detach().reshape(-1).cpu().to(torch.float64))
        buf = torch.cat(parts).to(self.device)
        dist.all_reduce(buf)
        buf = buf.cpu()
        out = {k: float(buf[i]) / self.world for i, k in enumerate(keys)}
        stop_any = bool(buf[len(keys)] > 0)
        if reduce_counts:
            counts = buf[len(keys) + 1 :].round().to(torch.int64).reshape(counts.shape)
        if counts is not None and counts.dim() == 1:
            out["perplexity"] = float(perplexity(counts))
            out["usage"] = float(usage_fraction(counts))
        return out, counts, stop_any

    def _health(self, window: _Window) -> dict[str, float]:
        q = self.model.quantizer
        ema = None
        if isinstance(q, VectorQuantizerEMA):
            ema = q.cluster_size / max(q._debias(), 1e-30)
        elif isinstance(getattr(q, "usage_ema", None), torch.Tensor):
            ema = q.code_usage()
        h = codebook_health(window.counts, ema_counts=ema, threshold=self.config.dead_threshold)
        return {
            "dead": h["dead"],
            "codes_used": h["codes_used"],
            "window_perplexity": h["perplexity"],
        }

    def _loop(self, bar: Any, window: _Window, stop: _DeferredInterrupt) -> None:
        cfg = self.config
        while self.step < cfg.steps:
            stop.completed_step = False
            self._loader_state = self.loader.state_dict()
            x, _ = self.loader.next_batch()
            if self.step == 0 and cfg.init == "kmeans":
                self.init_codebook()
            values, counts = self.train_step(x)
            values, counts, stop_any = self._global(values, counts, stop.requested)
            self.step += 1
            if cfg.revive_every and self.step % cfg.revive_every == 0:
                window.revived += self.revive(x)
            stop.completed_step = True
            window.add(values, counts, x.shape[0] * self.world)
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
                        **self._health(window),
                    }
                )
                window.reset()
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                if self.is_main:  # no collective inside: the other ranks go on
                    self._periodic_eval()
                self.save()
            if stop_any if self.world > 1 else stop.requested:
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
        # evenly strided over the split, so class-sorted data shows every class
        pick = torch.linspace(0, len(self.eval_data) - 1, n).round().long()
        x = normalize(self.eval_data.images[pick].to(self.device))
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
        config = TrainConfig.build(**overrides)
    elif overrides:
        config = TrainConfig(**{**asdict(config), **overrides})
    return Trainer(config, resume=resume, overwrite=overwrite).fit()
