"""A neural speech codec (SoundStream / EnCodec / DAC family): SEANet encoder
(:mod:`.seanet`) -> any vqkit quantizer on ``(B, D, T)`` sequences (residual VQ with
quantizer dropout by default) -> SEANet decoder.

Rates. With sample rate ``sr`` and hop ``prod(strides)`` the codec makes
``frames_per_second = sr / hop`` frames a second, each carrying ``Q`` codes (residual
stages; 1 for a single codebook) of ``log2 K`` bits (K = ``num_codes``: the codebook
size, FSQ's grid). Decoding with the first ``n`` stages only costs

    bitrate(n) = frames_per_second * n * log2 K   bits per second

(uncoded; an entropy coder with a prior goes below it). The defaults, 8 kHz, strides
2, 4, 5, 8 (hop 320, 25 frames/s), rvq with 8 stages of K = 512 codes, give 25 x 9 =
225 bit/s per stage, 1.8 kbit/s with all 8.

Lengths: ``encode`` pads a clip of L samples up to ``T = ceil(L / hop)`` frames;
``decode(codes, length=L)`` trims the ``T * hop`` decoded samples back to L;
``forward`` returns the input's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError, user_values
from ..options import Options, compose, option, positive_int, with_defaults
from ..quantizers import QuantizerOutput, RVQOptions
from .hub import PretrainedMixin
from .seanet import ACTIVATIONS, SEANetDecoder, SEANetEncoder, hop_length
from .vqvae import QUANTIZER_GROUPS, ModelOptions, QuantizerChoice

__all__ = [
    "AudioCodec",
    "AudioCodecConfig",
    "AudioCodecOutput",
    "AudioModelOptions",
    "parse_strides",
]


def parse_strides(text: str) -> tuple[int, ...]:
    """``"2,4,5,8"`` -> ``(2, 4, 5, 8)``; ValueError unless 1-8 positive ints."""
    try:
        out = tuple(int(s) for s in text.split(","))
    except ValueError:
        out = ()
    if not 1 <= len(out) <= 8 or any(s < 1 for s in out):
        raise ValueError(f"strides must be 1 to 8 comma-separated positive ints; got {text!r}")
    return out


def _strides_check(text: str) -> str | None:
    try:
        parse_strides(text)
    except ValueError:
        return "1 to 8 comma-separated positive ints, e.g. '2,4,5,8'"
    return None


@dataclass
class AudioModelOptions(Options):
    """The codec's network (its latent width ``embedding_dim`` and ``quantizer`` are
    the image model's declarations, :class:`AudioCodecConfig`)."""

    sample_rate: int = option(
        8000, "sample rate of the codec in Hz (data is resampled to it)", check=positive_int
    )
    seanet_channels: int = option(
        16, "channels of the SEANet's first stage (doubled after every stride)",
        check=positive_int,
    )  # fmt: skip
    strides: str = option(
        "2,4,5,8",
        "SEANet encoder strides, first stage first, comma-separated; hop = their product",
        check=_strides_check,
    )
    activation: str = option(
        "elu", "SEANet activation: elu, or snake (DAC: x + sin(a x)^2 / a)", choices=ACTIVATIONS
    )
    causal: bool = option(False, "causal convolutions (all padding on the left)")
    weight_norm: bool = option(True, "weight normalisation on every SEANet convolution")


# the image model's options the codec uses, with the codec's defaults: one declaration
_CodecNetwork = with_defaults(ModelOptions, "CodecNetworkOptions", quantizer="rvq")
_CodecRVQ = with_defaults(
    RVQOptions, "CodecRVQOptions", num_quantizers=8, quantizer_dropout=0.5
)  # DAC's dropout rate: half the training clips use a random number of leading stages
_IMAGE_ONLY = ("arch", "hidden", "res_hidden", "res_layers", "downsample", "channel_mult",
               "attn_resolutions")  # fmt: skip
_AudioCodecConfigBase = compose(
    "AudioCodecConfig",
    (AudioModelOptions, _CodecNetwork, *(_CodecRVQ if g is RVQOptions else g
                                         for g in QUANTIZER_GROUPS)),
    exclude=_IMAGE_ONLY,
    bases=(QuantizerChoice,),
)  # fmt: skip


class AudioCodecConfig(_AudioCodecConfigBase, Options):  # type: ignore[misc, valid-type]
    """Everything needed to rebuild an :class:`AudioCodec`: :class:`AudioModelOptions`,
    ``embedding_dim`` (64), ``quantizer`` (``"rvq"`` here) and every quantizer kind's
    options (only the chosen kind's may differ from their defaults; rvq's defaults
    here: 8 stages, quantizer dropout 0.5)."""

    def __post_init__(self) -> None:
        QuantizerChoice.__post_init__(self)
        self.strides = ",".join(map(str, parse_strides(self.strides)))
        width = self.seanet_channels * 2 ** len(parse_strides(self.strides))
        if width > 8192:  # the deepest stage's width; beyond it the model cannot be meant
            raise UserError(
                f"seanet_channels x 2^len(strides) = {width} channels at the deepest stage; "
                "at most 8192"
            )


@dataclass
class AudioCodecOutput:
    """``recon`` (B, 1, L) at the input's length and the quantizer's output ``vq``
    (loss, indices (B, T[, Q]) with -1 where quantizer dropout dropped a stage, ...)."""

    recon: torch.Tensor
    vq: QuantizerOutput


class AudioCodec(nn.Module, PretrainedMixin):
    """Waveform (B, 1, L) in [-1, 1] -> codes (B, T, Q) -> waveform; see the module
    docstring. ``AudioCodec(config)`` or ``AudioCodec(**options)``."""

    config_class = AudioCodecConfig
    pretrained_kind = "audio-codec"

    def __init__(self, config: AudioCodecConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = AudioCodecConfig(**overrides)
        elif overrides:
            config = AudioCodecConfig.from_dict({**config.to_dict(), **overrides})
        self.config = c = config
        net = {
            "channels": c.seanet_channels,
            "strides": parse_strides(c.strides),
            "dim": c.embedding_dim,
            "activation": c.activation,
            "causal": c.causal,
            "weight_norm": c.weight_norm,
        }
        self.encoder = SEANetEncoder(**net)
        with user_values():  # the quantizer constructor's checks of the config's values
            self.quantizer = c.quantizer_options().build(c.embedding_dim)
        try:
            per_frame = self.quantizer.code_shape((7,))
        except (ValueError, TypeError):
            per_frame = ()
        if per_frame[:1] != (7,) or len(per_frame) > 2:
            raise UserError(
                f"quantizer {c.quantizer!r} does not give codes frame by frame on (B, D, T) "
                "sequences; use rvq, vq, ema, fsq, ..."
            )
        self.decoder = SEANetDecoder(**net)

    # -- rates --------------------------------------------------------------------------
    @property
    def hop(self) -> int:
        """Samples per frame: the product of the strides."""
        return hop_length(parse_strides(self.config.strides))

    @property
    def frames_per_second(self) -> float:
        """``sample_rate / hop``."""
        return self.config.sample_rate / self.hop

    @property
    def num_stages(self) -> int:
        """Codes per frame, Q (rvq's stages; 1 for a single codebook)."""
        return int(self.quantizer.codes_per_position)

    @property
    def num_codes(self) -> int:
        """Values one code takes, K (per stage for rvq)."""
        return int(self.quantizer.num_codes)

    def frames(self, length: int) -> int:
        """Frames of a clip of ``length`` samples: ``ceil(length / hop)``."""
        return -(-int(length) // self.hop)

    def bitrate(self, num_stages: int | None = None) -> float:
        """Uncoded bits per second with the first ``num_stages`` stages (default all):
        ``frames_per_second * num_stages * log2(num_codes)``."""
        n = self._stages(num_stages)
        return self.frames_per_second * n * math.log2(self.num_codes)

    def _stages(self, num_stages: int | None) -> int:
        q = self.num_stages
        if num_stages is None:
            return q
        if isinstance(num_stages, bool) or not isinstance(num_stages, int):
            raise UserError(f"num_stages must be an int; got {num_stages!r}")
        if not 1 <= num_stages <= q:
            raise UserError(f"num_stages must be in [1, {q}]; got {num_stages}")
        if num_stages < q and self.config.quantizer != "rvq":
            raise UserError(
                f"fewer stages apply to quantizer 'rvq' (residual stages), not "
                f"{self.config.quantizer!r}"
            )
        return num_stages

    # -- the network --------------------------------------------------------------------
    def _check_wav(self, wav: torch.Tensor) -> None:
        if not isinstance(wav, torch.Tensor) or wav.dim() != 3 or wav.shape[1] != 1:
            shape = tuple(wav.shape) if isinstance(wav, torch.Tensor) else type(wav).__name__
            raise UserError(f"expected a mono waveform batch (B, 1, L); got {shape}")
        if not wav.is_floating_point():
            raise UserError(f"expected a float waveform in [-1, 1]; got dtype {wav.dtype}")
        if wav.shape[-1] < 1:
            raise UserError("expected at least one sample; got an empty waveform")

    def frame_mask(self, lengths: torch.Tensor, frames: int) -> torch.Tensor:
        """(B, frames) bool, True on frames that hold no sample of the clip (a clip of
        ``lengths[b]`` samples fills ``ceil(lengths[b] / hop)`` frames)."""
        used = (lengths.to(torch.int64) + self.hop - 1) // self.hop
        return torch.arange(frames, device=lengths.device).unsqueeze(0) >= used.unsqueeze(1)

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None) -> AudioCodecOutput:
        """Reconstruct ``wav`` (B, 1, L). ``lengths`` (B,), the real samples of zero-padded
        clips: their padding frames are left out of the quantizer's loss and statistics
        (the quantizer's padding mask). Quantizer dropout acts in training mode only."""
        self._check_wav(wav)
        z = self.encoder(wav)
        mask = None if lengths is None else self.frame_mask(lengths.to(z.device), z.shape[-1])
        vq = self.quantizer(z, mask=mask)
        return AudioCodecOutput(recon=self.decoder(vq.quantized)[..., : wav.shape[-1]], vq=vq)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor, num_stages: int | None = None) -> torch.Tensor:
        """Waveform (B, 1, L) -> int64 codes (B, T, n) (rvq; (B, T) for one code per
        frame), T = ceil(L / hop), n = ``num_stages`` (default all). Never updates a
        codebook."""
        self._check_wav(wav)
        n = self._stages(num_stages)
        codes = self.quantizer.encode(self.encoder(wav))
        return codes[..., :n] if codes.dim() == 3 else codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Codes (B, T, n) (n <= Q leading stages; -1 = no code) or (B, T) -> waveform
        (B, 1, length), ``length`` in ``[1, T * hop]`` (default ``T * hop``)."""
        want = 3 if self.num_stages > 1 else 2
        if not isinstance(codes, torch.Tensor) or codes.dim() != want:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise UserError(f"expected codes {('(B, T)', '(B, T, n)')[want - 2]}; got {shape}")
        if want == 3:
            self._stages(codes.shape[-1])
        full = codes.shape[1] * self.hop
        if length is not None and not 1 <= length <= full:
            raise UserError(
                f"length must be in [1, {full}] for {codes.shape[1]} frames; got {length}"
            )
        with user_values():  # out-of-range codes: the quantizer's one-line check
            z = self.quantizer.decode(codes)
        return self.decoder(z)[..., : full if length is None else length]

    # -- model card (save_pretrained) ---------------------------------------------------
    def card_tags(self) -> list[str]:
        return ["audio-codec", "speech", f"quantizer-{self.config.quantizer}"]

    def model_card_body(
        self,
        *,
        evaluation: dict[str, Any] | None = None,
        data: str | None = None,
        source: str | None = None,
        **_: Any,
    ) -> str:
        """The codec's card: rates, quantizer, network, data, and per stage count its
        uncoded bitrate (frames/s x the stages' log2 K) with the figures ``evaluation``
        measured (an ``eval.json`` of :mod:`vqkit.evaluation.codec_eval`; default the
        ``eval`` of ``pretrained_info``, which the training job records)."""
        c = self.config
        info = getattr(self, "pretrained_info", None) or {}
        evaluation = evaluation or info.get("eval")
        data = data or (info["data"] if isinstance(info.get("data"), str) else None)
        fps, bits = self.frames_per_second, math.log2(self.num_codes)
        lines = [
            "# vqkit audio codec",
            "",
            f"- {c.sample_rate} Hz mono, hop {self.hop} ({fps:g} frames/s)",
            f"- quantizer: `{c.quantizer}`, {self.num_stages} code(s) per frame, K = "
            f"{self.num_codes} ({bits:g} bits a code)",
            f"- network: SEANet, {c.seanet_channels} base channels, strides {c.strides}, "
            f"{c.activation}{', causal' if c.causal else ''}",
            f"- data: {f'`{data}`' if data else 'not recorded'}",
            *([f"- exported from: `{source}`"] if source else []),
            "",
            "## Bitrate by stages used",
            "",
            f"bitrate(n) = frames/s x the n stages' log2 K = {fps:g} x n x {bits:g} bit/s "
            "(uncoded; an entropy coder with a prior goes below it). Quantizer dropout in "
            "training makes decoding with the first n stages valid.",
            "",
        ]  # fmt: skip
        lines += self._stage_table(evaluation)
        lines += [
            "",
            "## Use",
            "",
            "```python",
            "from vqkit.models import AudioCodec",
            "",
            'codec = AudioCodec.from_pretrained("THIS_DIR_OR_REPO")',
            "codes = codec.encode(wav, num_stages=n)  # wav: (B, 1, L) in [-1, 1]",
            "wav = codec.decode(codes, length=L)",
            "```",
            "",
            "or `vqkit encode THIS_DIR x.wav --out CODES` and "
            "`vqkit decode THIS_DIR CODES/x.npy --out x.wav`.",
            "",
        ]
        return "\n".join(lines)

    def _stage_table(self, evaluation: dict[str, Any] | None) -> list[str]:
        """| stages | kbit/s | the measured figures of that stage count |."""
        counts = range(1, self.num_stages + 1) if self.config.quantizer == "rvq" else [None]
        rows = {}
        if evaluation and isinstance(evaluation.get("stages"), list):
            rows = {r.get("num_stages"): r for r in evaluation["stages"] if isinstance(r, dict)}
        keys = [k for k in ("si_sdr", "mel_distance", "pesq_nb", "stoi")
                if any(isinstance(r.get(k), (int, float)) for r in rows.values())]  # fmt: skip
        lines = [
            "| stages | kbit/s |" + "".join(f" {k} |" for k in keys),
            "|---:|---:|" + "---:|" * len(keys),
        ]
        for n in counts:
            q = self.num_stages if n is None else n
            row = rows.get(q, {})
            cells = [f"{row[k]:.4g}" if isinstance(row.get(k), (int, float)) else "" for k in keys]
            lines.append(f"| {q} | {self.bitrate(n) / 1000:.4g} |" + "".join(
                f" {v} |" for v in cells))  # fmt: skip
        if not keys:
            lines += ["", "Quality not measured for these weights (no eval.json)."]
        else:
            split = evaluation.get("split", "test") if evaluation else "test"
            lines += ["", f"Measured on {evaluation.get('clips', '?')} {split} clips "
                      "(SI-SDR in dB; mel distance: log-mel L1)."]  # fmt: skip
        return lines
