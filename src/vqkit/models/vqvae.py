"""The VQ-VAE of van den Oord et al. (2017) in its classic CIFAR-10 configuration, or with
the VQGAN-class encoder/decoder (``arch='vqgan'``, :mod:`.vqgan`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, user_values
from ..options import Options, compose, nonneg_int, option, positive_int
from ..quantizers import QuantizerOptions, QuantizerOutput, get_kind, quantizer_kinds
from .convnets import Decoder, Encoder, parse_channel_mult
from .hub import PretrainedMixin, measured_section
from .vqgan import GROUPS, VQGANDecoder, VQGANEncoder, parse_attn_resolutions, parse_vqgan_ch_mult

# the figures of a run's eval.json that a tokenizer's model card shows
_CARD_FIGURES = (
    "split", "num_images", "step", "mse", "nmse", "psnr", "perplexity", "codes_used", "usage"
)  # fmt: skip

__all__ = [
    "QUANTIZER_GROUPS",
    "RENAMED_OPTIONS",
    "VQVAE",
    "ModelOptions",
    "QuantizerChoice",
    "QuantizerFlags",
    "ShapeOptions",
    "VQVAEConfig",
    "VQVAEOutput",
    "upgrade_options",
]  # Encoder, Decoder, ResidualStack: vqkit.models.convnets


@dataclass
class ShapeOptions(Options):
    """What the data decides: image channels and size (stored with the model)."""

    in_channels: int = option(3, "image channels", check=positive_int)
    image_size: int = option(32, "image height and width", check=positive_int)


ARCHS = ("classic", "vqgan")


@dataclass
class ModelOptions(Options):
    """The network around the quantizer; the quantizer's own options live in its module."""

    arch: str = option(
        "classic",
        "encoder/decoder: classic (van den Oord et al. 2017) or vqgan (taming-transformers' "
        "ResNet blocks with GroupNorm and SiLU, self-attention at the lowest resolution)",
        choices=ARCHS,
    )
    hidden: int = option(
        128,
        "channels of the encoder/decoder convolutions (vqgan: of the first level, a multiple "
        "of 32)",
        check=positive_int,
    )
    res_hidden: int = option(
        32, "hidden channels of the residual blocks (classic only)", check=positive_int
    )
    res_layers: int = option(
        2, "residual blocks in encoder and decoder (vqgan: per level)", check=nonneg_int
    )
    embedding_dim: int = option(
        64, "D, channels of the latents that are quantized", check=positive_int
    )
    downsample: int = option(
        4,
        "downsampling factor of the encoder (latents are image_size / this)",
        choices=(4, 8, 16),
    )
    channel_mult: str = option(
        "",
        "channel multipliers, comma-separated. classic: of the levels beyond factor 4 (e.g. "
        "'2,4'; '': every level keeps --hidden channels); vqgan: one per level, 3/4/5 values "
        "for downsample 4/8/16 ('': 1,2,4 / 1,1,2,4 / 1,1,2,2,4)",
    )
    attn_resolutions: str = option(
        "",
        "vqgan only: feature-map sizes (px) whose blocks get self-attention, comma-separated "
        "('': the lowest, image_size / downsample; the middle block always has it)",
    )
    quantizer: str = option(
        "ema",
        "quantizer kind: " + "; ".join(f"{k} ({get_kind(k).help})" for k in quantizer_kinds()),
        choices=quantizer_kinds(),
    )


class QuantizerChoice:
    """Base of the flat configurations that hold every kind's options: the options of
    the chosen ``quantizer`` are validated by that kind's option group, the others must
    keep their defaults (so a flag that would be ignored is an error instead)."""

    quantizer: str

    def __post_init__(self) -> None:
        Options.__post_init__(self)  # type: ignore[arg-type]
        kind = get_kind(self.quantizer)
        own = kind.option_names()
        # this config's own defaults: a model may take a kind's options with other
        # defaults (the audio codec's rvq, options.with_defaults), still one declaration
        defaults = type(self).defaults()  # type: ignore[attr-defined]
        # sorted: the report must not depend on set order (hash randomisation)
        stray = sorted(
            n for n in QUANTIZER_OPTION_NAMES - own if getattr(self, n) != defaults[n]
        )  # one default per name: compose refuses two declarations that differ
        if stray:
            where = "; ".join(
                f"{n}: {', '.join(k for k in quantizer_kinds() if n in get_kind(k).option_names())}"
                for n in stray
            )
            raise UserError(
                f"{', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not apply to "
                f"quantizer {self.quantizer!r} (they apply to {where})"
            )
        opts = self.quantizer_options()
        for name in own:  # canonical values (e.g. fsq levels as a string)
            setattr(self, name, getattr(opts, name))

    def quantizer_options(self) -> QuantizerOptions:
        """The chosen kind's option group (validated; cross-option checks included)."""
        kind = get_kind(self.quantizer)
        with user_values():
            return kind.options(**{n: getattr(self, n) for n in kind.option_names()})


QUANTIZER_GROUPS = tuple(get_kind(k).options for k in quantizer_kinds())
# every kind's options, flat: one field (one default) per name
QuantizerFlags = compose("QuantizerFlags", QUANTIZER_GROUPS, bases=(Options,))
QUANTIZER_DEFAULTS = QuantizerFlags.defaults()
QUANTIZER_OPTION_NAMES = frozenset(QUANTIZER_DEFAULTS)
# {old name: (kind, new name)}: options renamed by the kinds (their ``renamed``)
RENAMED_OPTIONS = {
    old: (k, new) for k in quantizer_kinds() for old, new in get_kind(k).options.renamed.items()
}
# what older flat configs stored for an option of a kind not chosen, where it is not
# today's default: the flat default of an option that became shared with a None default
# (the kind's own), by its old and its new name
_FORMER_DEFAULTS = {"entropy_weight": 0.1, "ibq_entropy_weight": 0.05}


def upgrade_options(values: dict[str, Any], *, stored: bool = False) -> dict[str, Any]:
    """Options written by an older vqkit (a checkpoint, ``config.json``, a config file)
    in today's names: a renamed option (``RENAMED_OPTIONS``, e.g. ibq's
    ``ibq_entropy_weight`` -> ``entropy_weight``) takes its new name when its kind is the
    chosen one and is dropped otherwise (older flat configs stored every kind's options);
    an option of another kind that holds its default (or the flat default it had before
    it became shared) is dropped. ``stored``: a config vqkit wrote itself (checkpoints),
    whose options of other kinds had no effect: all of them are dropped."""
    chosen = values.get("quantizer", ModelOptions.quantizer)
    if chosen not in quantizer_kinds():
        return dict(values)  # the config's own check names the bad kind
    own = get_kind(chosen).option_names()
    out = {}
    for name, v in values.items():
        if name in RENAMED_OPTIONS:
            kind, new = RENAMED_OPTIONS[name]
            if kind != chosen:
                if stored or v == _FORMER_DEFAULTS.get(name, QUANTIZER_DEFAULTS[new]):
                    continue
                raise UserError(f"{name} does not apply to quantizer {chosen!r} (only {kind})")
            name = new
        elif name in QUANTIZER_OPTION_NAMES and name not in own:
            former = name in _FORMER_DEFAULTS and v == _FORMER_DEFAULTS[name]
            if stored or former or v == QUANTIZER_DEFAULTS[name]:
                continue
        out[name] = v
    for old, (kind, new) in RENAMED_OPTIONS.items():  # the renamed value wins
        if kind == chosen and old in values:
            out[new] = values[old]
    return out


def _check_vqgan_widths(hidden: int, mult: tuple[int, ...]) -> None:
    bad = [hidden * m for m in mult if (hidden * m) % GROUPS]
    if bad:
        raise UserError(
            f"the vqgan network's level widths (hidden x channel_mult) must be multiples of "
            f"{GROUPS} (GroupNorm groups); got {bad}"
        )


def network_bytes(
    channels: int,
    hidden: int,
    channel_mult: str,
    downsample: int,
    arch: str = "classic",
    *,
    res_hidden: int = 1,
    res_layers: int = 0,
    embedding_dim: int = 1,
) -> int:
    """The float32 bytes of the encoder's and decoder's weights, counted on networks
    built on the meta device (no memory is allocated, whatever the sizes). The defaults
    of the keyword sizes give a lower bound; vqgan's attention blocks are not counted."""
    with torch.device("meta"):
        if arch == "vqgan":
            mult = parse_vqgan_ch_mult(channel_mult, downsample)
            _check_vqgan_widths(hidden, mult)  # GroupNorm's own error is not one line
            net = {"res_layers": res_layers, "ch_mult": mult, "image_size": 1}
            nets = [
                VQGANEncoder(channels, hidden, **net, attn_resolutions=()),
                VQGANDecoder(embedding_dim, hidden, channels, **net, attn_resolutions=()),
            ]
        else:
            levels = {"downsample": downsample, "channel_mult": channel_mult}
            nets = [
                Encoder(channels, hidden, res_hidden, res_layers, **levels),
                Decoder(embedding_dim, hidden, channels, res_hidden, res_layers, **levels),
            ]
    return 4 * sum(p.numel() for n in nets for p in n.parameters())


def check_size_fits(
    image_size: int,
    channels: int,
    hidden: int,
    channel_mult: str,
    downsample: int,
    arch: str = "classic",
    **sizes: int,
) -> None:
    """Refuse, before any data is read or weight allocated, an ``image_size``, ``hidden``
    or ``channel_mult`` whose tensors cannot fit in this machine's memory: the network's
    float32 weights (:func:`network_bytes`, exact for the sizes given in ``sizes``:
    ``res_hidden``, ``res_layers``, ``embedding_dim``) plus one image's largest float32
    activation among the levels (width x side², per image). A lower bound of what
    training needs (no gradients, optimizer state or batch); the message gives both."""
    from ..quantizers.base import check_network_memory

    if arch == "vqgan":
        mult = parse_vqgan_ch_mult(channel_mult, downsample)
        levels = [(hidden * m, image_size >> i) for i, m in enumerate(mult)]
    else:
        mult = parse_channel_mult(channel_mult, downsample)
        half = (image_size + 1) // 2
        levels = [(max(hidden // 2, channels), half), (hidden, half // 2)]
        levels += [(hidden * m, half >> (i + 2)) for i, m in enumerate(mult)]
    activation = 4 * max(w * max(1, side) ** 2 for w, side in levels)
    weights = network_bytes(channels, hidden, channel_mult, downsample, arch, **sizes)
    check_network_memory(
        f"image_size {image_size} with hidden {hidden} and channel_mult "
        f"{channel_mult or 'default'}",
        weights,
        activation,
        "use a smaller --image-size, --hidden or --channel-mult",
    )


_VQVAEConfigBase = compose(
    "VQVAEConfig", (ShapeOptions, ModelOptions, *QUANTIZER_GROUPS), bases=(QuantizerChoice,)
)


class VQVAEConfig(_VQVAEConfigBase, Options):  # type: ignore[misc, valid-type]
    """Everything needed to rebuild a :class:`VQVAE` (stored in checkpoints): the
    shape of the data, the network (:class:`ModelOptions`) and the options of every
    quantizer kind (declared in the quantizer modules; only the chosen kind's may
    differ from their defaults)."""

    def __post_init__(self) -> None:
        QuantizerChoice.__post_init__(self)
        if self.image_size % self.downsample:
            raise UserError(
                f"image_size must be a multiple of downsample={self.downsample}; "
                f"got {self.image_size}"
            )
        if self.arch == "vqgan":
            self._check_vqgan()
            check_size_fits(
                self.image_size, self.in_channels, self.hidden, self.channel_mult,
                self.downsample, "vqgan", res_layers=self.res_layers,
                embedding_dim=self.embedding_dim,
            )  # fmt: skip
            return
        if self.attn_resolutions:
            raise UserError("attn_resolutions applies to arch 'vqgan' only")
        if self.hidden % 2:
            raise UserError(f"hidden must be even (first conv: hidden/2); got {self.hidden}")
        mult = parse_channel_mult(self.channel_mult, self.downsample)
        self.channel_mult = ",".join(str(m) for m in mult) if self.channel_mult else ""
        check_size_fits(
            self.image_size, self.in_channels, self.hidden, self.channel_mult, self.downsample,
            res_hidden=self.res_hidden, res_layers=self.res_layers,
            embedding_dim=self.embedding_dim,
        )  # fmt: skip

    def _check_vqgan(self) -> None:
        if self.res_hidden != ModelOptions.res_hidden:
            raise UserError(
                "res_hidden applies to arch 'classic' only (vqgan blocks are full width)"
            )
        mult = parse_vqgan_ch_mult(self.channel_mult, self.downsample)
        _check_vqgan_widths(self.hidden, mult)
        attn = parse_attn_resolutions(self.attn_resolutions, self.image_size, self.downsample)
        if self.channel_mult:
            self.channel_mult = ",".join(map(str, mult))
        if self.attn_resolutions:
            self.attn_resolutions = ",".join(map(str, attn))

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "VQVAE config") -> VQVAEConfig:
        """A stored config (:func:`upgrade_options`: renamed options take today's names,
        options of other quantizer kinds are dropped: configs written before they were
        errors stored every kind's options, which had no effect)."""
        return super().from_dict(upgrade_options(d, stored=True), where=where)


@dataclass
class VQVAEOutput:
    """``recon`` (B, C, H, W) and the quantizer's output ``vq`` (loss, indices, ...)."""

    recon: torch.Tensor
    vq: QuantizerOutput


class VQVAE(nn.Module, PretrainedMixin):
    """Encoder -> 1x1 pre-VQ conv -> vector quantizer -> decoder.

    Training objective (see :meth:`loss`): ``mse(recon, x) / data_variance + vq.loss``.
    Inputs are images scaled to [-0.5, 0.5], shape (B, in_channels, S, S), S = image_size
    (any multiple of 4 works at run time; the config's size is what the data was).
    ``save_pretrained(dir)`` / ``VQVAE.from_pretrained(dir_or_repo_id)``: see
    :mod:`vqkit.models.hub`.
    """

    config_class = VQVAEConfig
    pretrained_kind = "tokenizer"

    def __init__(self, config: VQVAEConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = VQVAEConfig(**overrides)
        elif overrides:
            config = VQVAEConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        c = config
        if c.arch == "vqgan":
            self._build_vqgan(c)
            return
        levels = {"downsample": c.downsample, "channel_mult": c.channel_mult}
        self.encoder = Encoder(c.in_channels, c.hidden, c.res_hidden, c.res_layers, **levels)
        self.pre_vq = nn.Conv2d(self.encoder.out_channels, c.embedding_dim, 1)
        with user_values():  # the constructor's checks of the config's values
            self.quantizer = c.quantizer_options().build(c.embedding_dim)
        self.decoder = Decoder(
            c.embedding_dim, c.hidden, c.in_channels, c.res_hidden, c.res_layers, **levels
        )

    def _build_vqgan(self, c: VQVAEConfig) -> None:
        net = {
            "res_layers": c.res_layers,
            "ch_mult": parse_vqgan_ch_mult(c.channel_mult, c.downsample),
            "image_size": c.image_size,
            "attn_resolutions": parse_attn_resolutions(
                c.attn_resolutions, c.image_size, c.downsample
            ),
        }
        self.encoder = VQGANEncoder(c.in_channels, c.hidden, **net)
        self.pre_vq = nn.Conv2d(self.encoder.out_channels, c.embedding_dim, 1)
        self.quantizer = c.quantizer_options().build(c.embedding_dim)
        self.decoder = VQGANDecoder(c.embedding_dim, c.hidden, c.in_channels, **net)

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's last weight: where the adaptive GAN weight compares gradient norms
        (classic: the final transposed conv; vqgan: conv_out)."""
        if self.config.arch == "vqgan":
            return self.decoder.last_layer
        return self.decoder.up2.weight

    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UserError(f"expected images (B, C, H, W); got {shape}")
        if x.shape[1] != self.config.in_channels:
            raise UserError(
                f"expected {self.config.in_channels} image channels; got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        f = self.config.downsample
        if x.shape[2] % f or x.shape[3] % f:
            raise UserError(
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

    def latent_positions(self) -> int:
        """Latent positions (codes per stage) of one image of the configured size."""
        return (self.config.image_size // self.config.downsample) ** 2

    @property
    def num_codes(self) -> int:
        """Codes an index can take: K, or the FSQ grid size (per stage for rvq)."""
        return int(self.quantizer.num_codes)

    @property
    def code_shape(self) -> tuple[int, ...]:
        """One image's indices: (h, w), (h, w, Q) when the quantizer gives several codes
        per position (rvq), (L,) for multiscale's concatenated scales."""
        side = self.config.image_size // self.config.downsample
        return self.quantizer.code_shape((side, side))

    @property
    def index_dims(self) -> int:
        """Dimensions of a batch of index maps: ``1 + len(code_shape)``."""
        return 1 + len(self.code_shape)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> code indices (B, H/f, W/f), int64 ((B, H/f, W/f, Q) for rvq).
        Never updates the codebook."""
        return self.quantizer.encode(self.encode_latents(x))

    @torch.no_grad()
    def decode(self, indices: torch.Tensor, num_scales: int | None = None) -> torch.Tensor:
        """Code indices (B, h, w) ((B, h, w, Q) for rvq, (B, L) for multiscale) -> images
        (B, C, f*h, f*w) in [-0.5, 0.5] (unclamped). ``num_scales`` N: a multi-scale
        tokenizer's reconstruction from its first N scales (the quantizer's
        ``code_prefix``; UserError for a single-scale tokenizer or N out of range)."""
        if indices.dim() != self.index_dims:
            want = {2: "(B, L)", 3: "(B, h, w)", 4: "(B, h, w, Q)"}[self.index_dims]
            raise UserError(f"expected an index map {want}; got shape {tuple(indices.shape)}")
        if num_scales is not None:
            indices = self.quantizer.code_prefix(indices, num_scales)
        return self.decoder(self.quantizer.decode(indices))

    @staticmethod
    def loss(out: VQVAEOutput, x: torch.Tensor, data_variance: float) -> dict[str, torch.Tensor]:
        """``{"loss", "recon_nmse", "vq"}``: total = mse(recon, x) / data_variance + vq.loss."""
        if not data_variance > 0:
            raise UserError(f"data_variance must be > 0; got {data_variance}")
        recon_nmse = F.mse_loss(out.recon, x) / data_variance
        return {"loss": recon_nmse + out.vq.loss, "recon_nmse": recon_nmse, "vq": out.vq.loss}

    # -- model card (save_pretrained) ---------------------------------------------------
    def card_tags(self) -> list[str]:
        return ["image-tokenizer", "vq-vae", f"quantizer-{self.config.quantizer}"]

    def model_card_body(
        self,
        *,
        evaluation: dict[str, Any] | None = None,
        data: str | None = None,
        source: str | None = None,
        **_: Any,
    ) -> str:
        """The tokenizer's card: quantizer, K, code grid, data, and the measured test
        figures ``evaluation`` (a run's ``eval.json``; "not measured" when None)."""
        c = self.config
        side = c.image_size // c.downsample
        q = int(self.quantizer.codes_per_position)
        grid = f"{side} x {side}" + (f" x {q} stages" if q > 1 else "")
        lines = [
            "# vqkit VQ-VAE image tokenizer",
            "",
            f"- quantizer: `{c.quantizer}` ({get_kind(c.quantizer).help})",
            f"- codes: K = {self.num_codes}" + (" per stage" if q > 1 else ""),
            f"- code grid: {grid} indices per {c.image_size} x {c.image_size} image with "
            f"{c.in_channels} channel(s) (downsampling {c.downsample}, code dim "
            f"{c.embedding_dim})",
            f"- network: `{c.arch}` encoder/decoder, {c.hidden} base channels",
            f"- data: {data or 'not recorded'}",
        ]
        lines += measured_section(source, evaluation, _CARD_FIGURES)
        lines += [
            "",
            "## Use",
            "",
            "```python",
            "from vqkit.models import VQVAE",
            'model = VQVAE.from_pretrained("THIS_DIR_OR_REPO")',
            "indices = model.encode(x)          # x: (B, C, H, W) in [-0.5, 0.5]",
            "images = model.decode(indices)     # back to (B, C, H, W)",
            "```",
            "",
        ]
        return "\n".join(lines)
