"""The VQ-VAE of van den Oord et al. (2017) in its classic CIFAR-10 configuration."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers import QUANTIZER_KINDS, QuantizerOutput, ResidualVQ, build_quantizer
from ..quantizers.factory import parse_levels
from .convnets import Decoder, Encoder, ResidualStack, parse_channel_mult

__all__ = ["VQVAE", "VQVAEConfig", "VQVAEOutput", "ResidualStack", "Encoder", "Decoder"]


@dataclass
class VQVAEConfig:
    """Everything needed to rebuild a :class:`VQVAE` (stored in checkpoints)."""

    in_channels: int = 3
    image_size: int = 32
    hidden: int = 128
    res_hidden: int = 32
    res_layers: int = 2
    num_embeddings: int = 512
    embedding_dim: int = 64
    commitment_cost: float = 0.25
    quantizer: str = "ema"  # one of vqkit.quantizers.QUANTIZER_KINDS: ema, vq, rvq, fsq
    decay: float = 0.99
    epsilon: float = 1e-5
    zero_debias: bool = False
    # rvq: stages (each num_embeddings codes), stage kind, dropout, shared codebook
    num_quantizers: int = 4
    rvq_stage: str = "ema"
    quantizer_dropout: float = 0.0
    shared_codebook: bool = False
    # fsq: levels per channel ("8,5,5,5" or a list); projections embedding_dim <-> len
    levels: Any = "8,5,5,5"
    # codebook options of vq / ema (and rvq stages): a smaller code space with in/out
    # projections (0: embedding_dim), cosine (l2-normalised) codes, the gradient
    # estimator ("ste" or "rotation"), and the affine codebook (vq only)
    codebook_dim: int = 0
    use_cosine: bool = False
    gradient: str = "ste"
    affine_codebook: bool = False
    # resolution: downsampling factor of the encoder (4, 8 or 16) and the channel
    # multipliers of the levels beyond 4 ("2,4"; "": all 1), see models/convnets.py
    downsample: int = 4
    channel_mult: str = ""

    def __post_init__(self) -> None:
        for name in (
            "in_channels",
            "image_size",
            "hidden",
            "res_hidden",
            "num_embeddings",
            "embedding_dim",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if not isinstance(self.res_layers, int) or self.res_layers < 0:
            raise ValueError(f"res_layers must be an int >= 0; got {self.res_layers!r}")
        if self.hidden % 2:
            raise ValueError(f"hidden must be even (first conv: hidden/2); got {self.hidden}")
        mult = parse_channel_mult(self.channel_mult, self.downsample)
        if self.image_size % self.downsample:
            raise ValueError(
                f"image_size must be a multiple of downsample={self.downsample}; "
                f"got {self.image_size}"
            )
        if self.quantizer not in QUANTIZER_KINDS:
            raise ValueError(f"quantizer must be one of {QUANTIZER_KINDS}; got {self.quantizer!r}")
        if not isinstance(self.codebook_dim, int) or self.codebook_dim < 0:
            raise ValueError(f"codebook_dim must be an int >= 0; got {self.codebook_dim!r}")
        if self.gradient not in ("ste", "rotation"):
            raise ValueError(f"gradient must be 'ste' or 'rotation'; got {self.gradient!r}")
        codebook_kinds = ("vq", "ema", "rvq")
        if self.quantizer not in codebook_kinds and (
            self.codebook_dim or self.use_cosine or self.gradient != "ste"
        ):
            raise ValueError(
                f"codebook_dim / use_cosine / gradient apply to {codebook_kinds}, not "
                f"{self.quantizer!r}"
            )
        if self.affine_codebook and not (
            self.quantizer == "vq" or (self.quantizer == "rvq" and self.rvq_stage == "vq")
        ):
            raise ValueError("affine_codebook applies to gradient-trained codebooks (vq)")
        # stored as the canonical string, so configs compare equal after a JSON trip
        self.levels = ",".join(str(v) for v in parse_levels(self.levels))
        self.channel_mult = ",".join(str(m) for m in mult) if self.channel_mult else ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQVAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VQVAE config keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantizer_options(c: VQVAEConfig) -> dict[str, Any]:
    """Constructor options of the configured quantizer kind (see ``build_quantizer``)."""
    if c.quantizer == "fsq":
        return {"levels": c.levels}
    common: dict[str, Any] = {
        "num_embeddings": c.num_embeddings,
        "commitment_cost": c.commitment_cost,
    }
    if c.codebook_dim:
        common["codebook_dim"] = c.codebook_dim
    if c.use_cosine:
        common["use_cosine"] = True
    if c.gradient != "ste":
        common["gradient"] = c.gradient
    vq = {**common, "affine_codebook": True} if c.affine_codebook else common
    if c.quantizer == "vq":
        return vq
    ema = {**common, "decay": c.decay, "epsilon": c.epsilon, "zero_debias": c.zero_debias}
    if c.quantizer == "ema":
        return ema
    opts = ema if c.rvq_stage == "ema" else vq
    return {
        **opts,
        "num_quantizers": c.num_quantizers,
        "stage": c.rvq_stage,
        "quantizer_dropout": c.quantizer_dropout,
        "shared_codebook": c.shared_codebook,
    }


@dataclass
class VQVAEOutput:
    """``recon`` (B, C, H, W) and the quantizer's output ``vq`` (loss, indices, ...)."""

    recon: torch.Tensor
    vq: QuantizerOutput


class VQVAE(nn.Module):
    """Encoder -> 1x1 pre-VQ conv -> vector quantizer -> decoder.

    Training objective (see :meth:`loss`): ``mse(recon, x) / data_variance + vq.loss``.
    Inputs are images scaled to [-0.5, 0.5], shape (B, in_channels, S, S), S = image_size
    (any multiple of f = ``config.downsample`` works at run time; the config's size is
    what the data was). Index maps are (B, S/f, S/f).
    """

    def __init__(self, config: VQVAEConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = VQVAEConfig(**overrides)
        elif overrides:
            config = VQVAEConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        c = config
        levels = {"downsample": c.downsample, "channel_mult": c.channel_mult}
        self.encoder = Encoder(c.in_channels, c.hidden, c.res_hidden, c.res_layers, **levels)
        self.pre_vq = nn.Conv2d(self.encoder.out_channels, c.embedding_dim, 1)
        self.quantizer = build_quantizer(c.quantizer, c.embedding_dim, **_quantizer_options(c))
        self.decoder = Decoder(
            c.embedding_dim, c.hidden, c.in_channels, c.res_hidden, c.res_layers, **levels
        )

    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected images (B, C, H, W); got {shape}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected {self.config.in_channels} image channels; got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        f = self.config.downsample
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"image height and width must be multiples of {f}; got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"expected float images scaled to [-0.5, 0.5]; got dtype {x.dtype}")

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> pre-quantization latents z_e (B, D, H/f, W/f), f = config.downsample."""
        self._check_images(x)
        return self.pre_vq(self.encoder(x))

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        vq = self.quantizer(self.encode_latents(x))
        return VQVAEOutput(recon=self.decoder(vq.quantized), vq=vq)

    @property
    def num_codes(self) -> int:
        """Codes an index can take: K, or the FSQ grid size (per stage for rvq)."""
        return int(self.quantizer.codebook_size)

    @property
    def index_dims(self) -> int:
        """Dimensions of a batch of index maps: 3 (B, h, w), or 4 (B, h, w, Q) for rvq."""
        return 4 if isinstance(self.quantizer, ResidualVQ) else 3

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> code indices (B, H/f, W/f), int64 ((B, H/f, W/f, Q) for rvq).
        Never updates the codebook."""
        return self.quantizer.encode(self.encode_latents(x))

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) ((B, h, w, Q) for rvq) -> images (B, C, f*h, f*w) in
        [-0.5, 0.5] (unclamped)."""
        if indices.dim() != self.index_dims:
            want = "(B, h, w, Q)" if self.index_dims == 4 else "(B, h, w)"
            raise ValueError(f"expected an index map {want}; got shape {tuple(indices.shape)}")
        return self.decoder(self.quantizer.decode(indices))

    @staticmethod
    def loss(out: VQVAEOutput, x: torch.Tensor, data_variance: float) -> dict[str, torch.Tensor]:
        """``{"loss", "recon_nmse", "vq"}``: total = mse(recon, x) / data_variance + vq.loss."""
        if not data_variance > 0:
            raise ValueError(f"data_variance must be > 0; got {data_variance}")
        recon_nmse = F.mse_loss(out.recon, x) / data_variance
        return {"loss": recon_nmse + out.vq.loss, "recon_nmse": recon_nmse, "vq": out.vq.loss}

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
    ) -> VQVAE:
        """Rebuild a model from a training checkpoint (``.pt``) or exported weights
        (``.safetensors`` with the config in its metadata)."""
        from ..checkpoint import load_model

        return load_model(path, map_location=map_location)
