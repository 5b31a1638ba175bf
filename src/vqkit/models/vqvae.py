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
        if self.image_size % 4:
            raise ValueError(
                f"image_size must be a multiple of 4 (two stride-2 convs); got {self.image_size}"
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


class ResidualBlock(nn.Module):
    """``x + Conv1x1(ReLU(Conv3x3(ReLU(x))))``, convolutions without bias."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


class ResidualStack(nn.Module):
    """``layers`` residual blocks, each with its own weights, then a ReLU."""

    def __init__(self, channels: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(channels, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return F.relu(x)


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, hidden, H/4, W/4)."""

    def __init__(self, in_channels: int, hidden: int, res_hidden: int, res_layers: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden // 2, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.res = ResidualStack(hidden, res_hidden, res_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.res(self.conv3(x))


class Decoder(nn.Module):
    """(B, D, h, w) -> (B, C, 4h, 4w)."""

    def __init__(
        self, embedding_dim: int, hidden: int, out_channels: int, res_hidden: int, res_layers: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(embedding_dim, hidden, 3, padding=1)
        self.res = ResidualStack(hidden, res_hidden, res_layers)
        self.up1 = nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(hidden // 2, out_channels, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.res(self.conv1(z))
        return self.up2(F.relu(self.up1(x)))


@dataclass
class VQVAEOutput:
    """``recon`` (B, C, H, W) and the quantizer's output ``vq`` (loss, indices, ...)."""

    recon: torch.Tensor
    vq: QuantizerOutput


class VQVAE(nn.Module):
    """Encoder -> 1x1 pre-VQ conv -> vector quantizer -> decoder.

    Training objective (see :meth:`loss`): ``mse(recon, x) / data_variance + vq.loss``.
    Inputs are images scaled to [-0.5, 0.5], shape (B, in_channels, S, S), S = image_size
    (any multiple of 4 works at run time; the config's size is what the data was).
    """

    def __init__(self, config: VQVAEConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = VQVAEConfig(**overrides)
        elif overrides:
            config = VQVAEConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        c = config
        self.encoder = Encoder(c.in_channels, c.hidden, c.res_hidden, c.res_layers)
        self.pre_vq = nn.Conv2d(c.hidden, c.embedding_dim, 1)
        self.quantizer = build_quantizer(c.quantizer, c.embedding_dim, **_quantizer_options(c))
        self.decoder = Decoder(c.embedding_dim, c.hidden, c.in_channels, c.res_hidden, c.res_layers)

    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected images (B, C, H, W); got {shape}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected {self.config.in_channels} image channels; got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        if x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"image height and width must be multiples of 4; got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected float images scaled to [-0.5, 0.5]; got dtype {x.dtype}")

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> pre-quantization latents z_e (B, D, H/4, W/4)."""
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
        """Images -> code indices (B, H/4, W/4), int64 ((B, H/4, W/4, Q) for rvq).
        Never updates the codebook."""
        return self.quantizer.encode(self.encode_latents(x))

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) ((B, h, w, Q) for rvq) -> images (B, C, 4h, 4w) in
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
