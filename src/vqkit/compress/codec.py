"""Images and code maps to bytes and back, entropy-coded with a prior's distributions.

A code map ``c`` (h, w) or (h, w, Q) is read in the prior's raster order
(:func:`vqkit.prior.flatten_codes`: rows, then the Q codes of a position) as
``c_0 .. c_{T-1}``; code ``c_t`` is range-coded (:mod:`.coder`) under the conditional
distribution ``q(c_t | c_<t, y)`` of the prior's **exact integer twin**
(:class:`.exact.ExactPrior`), so a file costs about ``-log2 q(c | y)`` bits (the prior's
NLL: the twin's integer frequencies stay within a few millionths of a bit of the float
prior's) plus the coder's termination and the header (:mod:`.format`, docs/format.md).

**Any machine decodes what any machine wrote.** The twin's integer frequencies come from
exact arithmetic (:mod:`.intmath`), independent of CPU kernels, threads, torch version and
device; the range coder (constriction) takes them as they are. The coding loops
(:mod:`.streams`) need not mirror each other (one teacher-forced pass to encode, one
position at a time to decode, files batched); a checksum of the codes guards the rest.

A next-scale prior's codes (a multi-scale tokenizer's ``(L,)`` sequences) use its own
twin (:mod:`.exact_nextscale`, format model 2), whole scales per pass; the first scales
of a map come first in its payload, so ``num_scales`` decodes them alone (a preview).
Version-1 files (float probabilities, :mod:`.legacy`) decode only where the float prior
computes the writer's bits. Speech codec clips (version 3): :mod:`.audio`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import denormalize, normalize
from ..errors import UserError
from ..prior import Prior, flatten_codes
from ..prior.loading import load_prior, load_sample_tokenizer
from . import format as fmt
from .coder import CoderError
from .exact import ExactPrior
from .exact_nextscale import exact_twin
from .legacy import decode_float
from .streams import StreamStats, decode_streams, encode_streams

__all__ = [
    "Codec",
    "DecodeError",
    "codes_to_images",
    "decode",
    "decode_codes",
    "decode_many",
    "decode_maps",
    "encode",
    "encode_codes",
    "encode_many",
    "encode_maps",
    "images_to_codes",
    "load_codec",
    "prior_hash",
    "restore_codes",
    "scale_prefix",
]


class DecodeError(UserError):
    """A file that cannot be decoded with this codec or on this machine (one line)."""


def prior_hash(model: torch.nn.Module, config: dict[str, Any]) -> str:
    """Hex SHA-256 of a prior's content: its config (sorted JSON) and every state-dict
    tensor (name, dtype, shape, bytes) in name order. Independent of the file it came
    from and of the device it sits on."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Codec:
    """A prior (eval mode), its exact integer twin and, for images, its tokenizer (a
    VQ-VAE in eval mode).

    ``tokenizer_hash``: SHA-256 of the tokenizer's weights file, as the prior records
    it; ``prior_hash``: :func:`prior_hash` of the float prior (what version-1 files
    name); ``exact_hash``: the twin's :meth:`.exact.ExactPrior.digest` (what version-2
    files name; the kind's twin, :func:`.exact_nextscale.exact_twin`: model 1 for an
    autoregressive prior, model 2 for a next-scale one). ``classes``: the prior's class
    names (empty when unconditional). ``audio``: the tokenizer is a speech codec (its
    clips: :mod:`.audio`)."""

    prior: Prior
    tokenizer: Any | None
    tokenizer_hash: str
    prior_hash: str
    classes: tuple[str, ...] = ()
    image_size: int | None = None
    channels: int | None = None
    exact: ExactPrior | None = None
    exact_hash: str = ""
    audio: bool = False

    def __post_init__(self) -> None:
        if self.exact is None:
            self.exact = exact_twin(self.prior).to(self.device)
            self.exact_hash = self.exact.digest()

    @property
    def code_shape(self) -> tuple[int, ...]:
        return self.prior.code_shape

    @property
    def model(self) -> int:
        """The format's model byte of the files this codec writes (its twin's)."""
        return self.exact.MODEL

    @property
    def num_symbols(self) -> int:
        return int(self.prior.config.vocab_size)

    @property
    def null_class(self) -> int:
        return self.prior.null_class

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    def labels(self, labels: int | Sequence[int] | None, n: int) -> torch.Tensor:
        """Class ids (n,): None is the null class (unconditional) for all, an int is
        every map's class, a sequence one per map."""
        null = self.null_class
        if labels is None:
            return torch.full((n,), null, dtype=torch.long)
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        y = y.expand(n).clone() if y.numel() == 1 else y
        if y.numel() != n:
            raise UserError(f"expected one class or {n}; got {y.numel()}")
        bad = (y < 0) | (y > null)
        if bool(bad.any()):
            have = f"classes 0..{null - 1} and the null class {null}" if null else "no classes"
            raise UserError(f"class id {int(y[bad][0])} out of range: the prior has {have}")
        return y

    def pack(self, payload: bytes, labels: Sequence[int], checksum: bytes, stream: StreamStats,
             stats: dict[str, float] | None = None, *, flags: int = 0, dtype: int = 0,
             audio: fmt.AudioInfo | None = None) -> bytes:  # fmt: skip
        """One file's bytes: this codec's header (version 3 with a clip's ``audio`` block)
        over ``payload``; ``stats`` takes the stream's bits, the bytes and the codes."""
        version = fmt.AUDIO_VERSION if audio is not None else fmt.VERSION
        header = fmt.Header(
            self.tokenizer_hash[:16], self.exact_hash[:16], self.code_shape, self.num_symbols,
            tuple(int(v) for v in labels), checksum, flags | (fmt.FLAG_AUDIO if audio else 0),
            dtype, version=version, model=self.model, audio=audio,
        )  # fmt: skip
        data = fmt.pack(header, payload)
        if stats is not None:
            header_bytes = len(data) - len(payload)
            stats.update(ideal_bits=stream.ideal_bits, payload_bytes=len(payload),
                         header_bytes=header_bytes, codes=stream.codes)  # fmt: skip
        return data

    def check(self, header: fmt.Header, where: str) -> None:
        """DecodeError unless ``header`` was written by this prior and tokenizer."""
        if header.is_audio != self.audio:  # a clip's windows: vqkit.compress.audio
            what = ("an image tokenizer's", "a speech codec's")
            raise DecodeError(f"{where} holds {what[header.is_audio]} codes, not this prior's")
        if header.version >= 2 and header.model != self.model:
            kind = self.prior.config.kind
            raise DecodeError(
                f"{where} was coded by model {header.model} ({fmt.MODELS[header.model]}); "
                f"this prior ({kind}, {self.exact_hash[:16]}) codes with model {self.model}"
            )
        prior = self.exact_hash if header.version >= 2 else self.prior_hash
        mine = self.tokenizer_hash[:16], prior[:16]
        if (header.tokenizer_hash, header.prior_hash) != mine:
            raise DecodeError(
                f"{where} was compressed with prior {header.prior_hash} and tokenizer "
                f"{header.tokenizer_hash}; this prior is {mine[1]} with tokenizer {mine[0]}"
            )
        if header.code_shape != self.code_shape or header.num_symbols != self.num_symbols:
            raise DecodeError(
                f"{where}: code maps {header.code_shape} of {header.num_symbols} symbols do "
                f"not match the prior's {self.code_shape} of {self.num_symbols}"
            )
        if any(y > self.null_class for y in header.labels):
            raise DecodeError(f"{where}: class id out of range for this prior")


def load_codec(
    prior_dir: str | os.PathLike[str],
    *,
    checkpoint: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    images: bool = True,
) -> Codec:
    """The codec of a ``vqkit prior`` run: its weights (``checkpoint`` "best" or
    "last"; default best when present) and, when ``images``, the tokenizer it was
    trained on (its copy pinned in the prior's directory, else ``tokenizer`` or the
    recorded run directory; the weights file must have the recorded SHA-256)."""
    model, ckpt = load_prior(prior_dir, checkpoint, device)
    if model.config.masked:  # coding needs each code's conditional given the ones before
        raise UserError(
            f"{prior_dir} is a masked prior; compression needs an autoregressive one "
            "(vqkit prior --kind autoregressive)"
        )
    stored = ckpt.get("tokenizer") or {}
    if not stored.get("sha256"):
        raise UserError(f"{prior_dir}: the prior records no tokenizer; it cannot compress")
    # the prior's pinned copy (PRIOR_DIR/tokenizer/) when it has one, else the run's file;
    # either way the weights must have the hash the prior recorded
    tok = load_sample_tokenizer(prior_dir, ckpt, tokenizer, device) if images else None
    # the image geometry: the tokenizer's own config, else the prior's record of it
    model_cfg = tok.model.config.to_dict() if tok is not None else stored.get("model_config") or {}
    return Codec(
        prior=model,
        tokenizer=tok.model if tok is not None else None,
        tokenizer_hash=stored["sha256"],
        prior_hash=prior_hash(model, ckpt["model_config"]),
        classes=tuple(ckpt.get("classes") or ()),
        image_size=model_cfg.get("image_size"),
        channels=model_cfg.get("in_channels"),
        audio=stored.get("modality") == "audio",
    )


def _codec(prior: Codec | str | os.PathLike[str], images: bool) -> Codec:
    return prior if isinstance(prior, Codec) else load_codec(prior, images=images)


def _check_maps(codec: Codec, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
    codes = torch.as_tensor(np.asarray(codes)).long()
    if codes.dim() != len(codec.code_shape) + 1 or tuple(codes.shape[1:]) != codec.code_shape:
        raise UserError(
            f"expected code maps (N, {', '.join(map(str, codec.code_shape))}); "
            f"got {tuple(codes.shape)}"
        )
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codec.num_symbols):
        raise UserError(
            f"codes must be in [0, {codec.num_symbols}) for this prior; "
            f"got {int(codes.min())}..{int(codes.max())}"
        )
    if codes.shape[0] == 0:
        raise UserError("no code maps to compress")
    return codes


def encode_many(
    codec: Codec,
    items: Sequence[tuple[torch.Tensor | np.ndarray, int | Sequence[int] | None]],
    flags: Sequence[int] | None = None,
    dtypes: Sequence[int] | None = None,
    stats: list[dict[str, float]] | None = None,
    wheres: Sequence[str] | None = None,
) -> list[bytes]:
    """Several streams at once, one file's bytes each: ``items`` are ``(code maps (N,
    *code_shape), labels)``; their groups share the prior's teacher-forced passes
    (exact arithmetic: each file is what :func:`encode_maps` writes alone). Bad input
    is a UserError naming the item (``wheres``, when given)."""
    maps, ys = [], []
    for i, (codes, y) in enumerate(items):
        try:
            maps.append(_check_maps(codec, codes))
            ys.append(codec.labels(y, maps[-1].shape[0]))
        except ValueError as e:
            raise UserError(f"{wheres[i]}: {e}" if wheres else str(e)) from None
    seqs = [flatten_codes(m, codec.code_shape).numpy() for m in maps]
    st = [StreamStats() for _ in items]
    payloads = encode_streams(codec.exact, list(zip(seqs, ys, strict=True)), st)
    return [
        codec.pack(payload, y, fmt.code_checksum(seq), st[i], stats[i] if stats else None,
                   flags=flags[i] if flags else 0, dtype=dtypes[i] if dtypes else 0)
        for i, (seq, y, payload) in enumerate(zip(seqs, ys, payloads, strict=True))
    ]  # fmt: skip


def encode_maps(
    codec: Codec,
    codes: torch.Tensor | np.ndarray,
    labels: int | Sequence[int] | None,
    flags: int = 0,
    dtype: int = 0,
    stats: dict[str, float] | None = None,
) -> bytes:
    """Code maps (N, *code_shape) -> file bytes (see :mod:`.format`)."""
    box = [stats] if stats is not None else None
    return encode_many(codec, [(codes, labels)], [flags], [dtype], box)[0]


def scale_prefix(codec: Codec, num_scales: int) -> int:
    """The codes of the first ``num_scales`` scales of one map, ``sum_{i<N} s_i^2`` (the
    prior's ``scales``, its multi-scale tokenizer's code groups); UserError (one line)
    for a prior of one-map codes or N outside [1, S]."""
    scales = list(codec.prior.config.scales)
    if not scales:
        raise UserError(
            f"decoding the first {num_scales} scales needs the codes of a multi-scale "
            f"tokenizer; this prior's codes {codec.code_shape} are one map"
        )
    n = num_scales
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(scales):
        raise UserError(
            f"the number of scales must be an int in [1, {len(scales)}] (the scales "
            f"{','.join(map(str, scales))}); got {num_scales!r}"
        )
    return sum(s * s for s in scales[:n])


def unpack_checked(codec: Codec, datas: Sequence[bytes], wheres: Sequence[str]) -> list:
    """Each file's (header, payload), the header checked against ``codec``; one line
    naming the first file that does not fit."""
    out = []
    for data, where in zip(datas, wheres, strict=True):
        try:
            header, payload = fmt.unpack(data)
        except fmt.FormatError as e:
            raise fmt.FormatError(f"{where}: {e}") from None
        codec.check(header, where)
        out.append((header, payload))
    return out


def decode_many(
    codec: Codec,
    datas: Sequence[bytes],
    wheres: Sequence[str] | None = None,
    num_scales: int | None = None,
) -> list[tuple[np.ndarray, fmt.Header]]:
    """Several files at once: (code maps (N, *code_shape) int64, header) of each, the
    version-2 ones decoded side by side in one batch. DecodeError / FormatError (both
    ValueError) for the first file that cannot be decoded here, naming it.

    ``num_scales`` N (a multi-scale tokenizer's codes): the first N scales of each map
    only, (N maps, sum_{i<N} s_i^2); the range decoder stops after them (in a file of
    more than one group of maps, after them in the last group: the others' symbols
    come first). A prefix is not checked against the codes' checksum (it covers every
    code): the CRC checks the bytes, the exact model the arithmetic."""
    stop = scale_prefix(codec, num_scales) if num_scales is not None else None
    wheres = list(wheres) if wheres is not None else ["the data"] * len(datas)
    parsed = [(h, payload, torch.tensor(h.labels, dtype=torch.long))
              for h, payload in unpack_checked(codec, datas, wheres)]  # fmt: skip
    seqs: dict[int, np.ndarray] = {}
    current = [i for i, (h, _, _) in enumerate(parsed) if h.version >= 2]
    stops = [stop] * len(current)
    try:
        streams = [(parsed[i][1], parsed[i][2]) for i in current]
        decoded = decode_streams(codec.exact, streams, stops)
    except CoderError as e:
        # which file: decode them one at a time to name it (rare: a corrupt payload)
        for i in current:
            try:
                decode_streams(codec.exact, [(parsed[i][1], parsed[i][2])], [stop])
            except CoderError:
                raise DecodeError(f"{wheres[i]}: {e}") from None
        raise DecodeError(f"{wheres[current[0]]}: {e}") from None
    seqs.update(zip(current, decoded, strict=True))
    for i, (header, payload, y) in enumerate(parsed):
        if header.version < 2:
            try:
                seqs[i] = decode_float(codec.prior, payload, y)
            except CoderError as e:
                raise DecodeError(f"{wheres[i]}: {e}") from None
    out = []
    for i, (header, _, _) in enumerate(parsed):
        if stop is not None:  # a prefix: the checksum covers every code (docstring)
            out.append((seqs[i][:, :stop], header))
            continue
        if fmt.code_checksum(seqs[i]) != header.checksum:
            raise DecodeError(_checksum_failure(wheres[i], header))
        out.append((seqs[i].reshape(header.num_maps, *codec.code_shape), header))
    return out


def _checksum_failure(where: str, header: fmt.Header) -> str:
    if header.version < 2:
        return (
            f"{where} cannot be decoded here: it is a version-1 file (float coding), which "
            "decodes only where the prior computes the writer's float bits (same CPU kernels, "
            "thread count, torch version and device); decompress it there and compress the "
            "maps again with this vqkit (version 2 decodes anywhere)"
        )
    return (
        f"{where}: the decoded codes fail the file's checksum (the payload was altered after "
        "its CRC was computed, or it was written by a faulty encoder)"
    )


def decode_maps(
    codec: Codec, data: bytes, where: str = "the data", num_scales: int | None = None
) -> tuple[np.ndarray, fmt.Header]:
    """File bytes -> (code maps (N, *code_shape) int64, header); DecodeError /
    FormatError (both ValueError) when they cannot be decoded here. ``num_scales``: the
    first N scales only (:func:`decode_many`)."""
    return decode_many(codec, [data], [where], num_scales)[0]


def _as_images(codec: Codec, images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) (or one (C, H, W)) checked against the tokenizer."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.dim() == 3:
        x = x[None]
    want = (codec.channels, codec.image_size, codec.image_size)
    if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != want:
        raise UserError(
            f"expected uint8 images (N, {want[0]}, {want[1]}, {want[2]}) for this tokenizer; "
            f"got {x.dtype} {tuple(x.shape)}"
        )
    return x


def images_to_codes(codec: Codec, images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> the tokenizer's index maps (N, *code_shape), CPU."""
    if codec.tokenizer is None:
        raise UserError("this codec has no tokenizer (loaded for code maps only)")
    x = _as_images(codec, images)
    with torch.inference_mode():
        return codec.tokenizer.encode(normalize(x).to(codec.device)).cpu()


def codes_to_images(codec: Codec, codes: np.ndarray, num_scales: int | None = None) -> torch.Tensor:
    """Index maps (N, *code_shape) -> the tokenizer's reconstruction, uint8 (N, C, H, W).
    ``num_scales`` N: a multi-scale tokenizer's codes (N maps, at least the first N
    scales), reconstructed from their first N scales (``VQVAE.decode(codes,
    num_scales=N)``: the quantizer's ``code_prefix``; one-map codes refused in one line)."""
    if codec.tokenizer is None:
        raise UserError("this codec has no tokenizer (loaded for code maps only)")
    with torch.inference_mode():
        x = torch.as_tensor(codes).to(codec.device)
        x = codec.tokenizer.decode(x, num_scales=num_scales)
    return denormalize(x).cpu()


def encode(
    images: torch.Tensor | np.ndarray,
    prior: Codec | str | os.PathLike[str],
    *,
    labels: int | Sequence[int] | None = None,
    stats: dict[str, float] | None = None,
) -> bytes:
    """uint8 images (N, C, H, W) -> the bytes of one ``.vqz`` stream of N code maps.

    ``prior``: a :class:`Codec` or a prior run directory. ``labels``: the class of the
    images for a class-conditional prior (None: the null class). ``stats``, when
    given, receives ``ideal_bits`` (the prior's ``sum -log2 p`` of the codes along the
    coded path), ``payload_bytes``, ``header_bytes`` and ``codes``."""
    codec = _codec(prior, images=True)
    return encode_maps(codec, images_to_codes(codec, images), labels, stats=stats)


def decode(
    data: bytes, prior: Codec | str | os.PathLike[str], *, num_scales: int | None = None
) -> torch.Tensor:
    """The bytes of :func:`encode` -> uint8 images (N, C, H, W), the tokenizer's
    reconstruction of the coded maps. ``num_scales`` N (a multi-scale tokenizer's
    files): only the first N scales are decoded, and the images are the tokenizer's
    reconstruction from them (a preview: ``VQVAE.decode(codes, num_scales=N)``)."""
    codec = _codec(prior, images=True)
    codes, _ = decode_maps(codec, data, num_scales=num_scales)
    return codes_to_images(codec, codes, num_scales)


def encode_codes(
    codes: np.ndarray | torch.Tensor,
    prior: Codec | str | os.PathLike[str],
    *,
    labels: int | Sequence[int] | None = None,
    stats: dict[str, float] | None = None,
) -> bytes:
    """Integer index maps ``code_shape`` or (N, *code_shape) -> bytes; lossless:
    :func:`decode_codes` returns the same values, dtype and shape."""
    codec = _codec(prior, images=False)
    arr = codes.cpu().numpy() if torch.is_tensor(codes) else np.asarray(codes)
    if not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"index maps must be integers; got {arr.dtype}")
    dtype = f"<{arr.dtype.kind}{arr.dtype.itemsize}"  # stored little-endian
    batched = arr.ndim == len(codec.code_shape) + 1
    flags = fmt.FLAG_CODES | (fmt.FLAG_BATCH_AXIS if batched else 0)
    maps = arr if batched else arr[None]
    return encode_maps(codec, maps, labels, flags, fmt.DTYPES.index(dtype), stats)


def decode_codes(data: bytes, prior: Codec | str | os.PathLike[str]) -> np.ndarray:
    """The bytes of :func:`encode_codes` (or :func:`encode`: int64 (N, *code_shape))
    -> the index maps, with their original dtype and shape."""
    codec = _codec(prior, images=False)
    codes, header = decode_maps(codec, data)
    return restore_codes(codes, header)


def restore_codes(codes: np.ndarray, header: fmt.Header) -> np.ndarray:
    """Decoded maps (N, *shape) int64 in the dtype and shape of the compressed array."""
    if not header.is_codes:
        return codes
    out = codes.astype(np.dtype(fmt.DTYPES[header.dtype]))
    return out if header.flags & fmt.FLAG_BATCH_AXIS else out[0]
