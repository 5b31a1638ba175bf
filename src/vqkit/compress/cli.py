"""``vqkit compress`` and ``vqkit decompress``: the argument declarations and handlers.

    vqkit compress IMAGES... --prior PRIOR_DIR --out DIR [--class C] [--codes] [--overwrite]
    vqkit decompress FILES.vqz... --prior PRIOR_DIR --out DIR [--scales N] [--overwrite]
    vqkit compress CLIPS.wav... --prior AUDIO_PRIOR --out DIR      (a speech codec's prior)
    vqkit decompress FILES.vqz... --prior AUDIO_PRIOR --out DIR [--codes]

``compress`` writes one ``.vqz`` per input (mirroring the input paths below their
common folder): images go through the prior's tokenizer (they must have its size and
channel count; a gray image is accepted by a colour tokenizer); with ``--codes`` the
inputs are ``.npy`` index maps (what ``vqkit encode`` writes), compressed losslessly.
``decompress`` writes PNGs (the tokenizer's reconstruction) or, for files made with
``--codes``, the ``.npy`` maps bit for bit, with the tokenizer's identity in a sidecar
(:mod:`vqkit.models.codes_io`, as ``vqkit encode`` writes them; ``--codes`` inputs are
checked against it when they have one). ``decompress --scales N`` (a multi-scale
tokenizer's files) decodes only the first N scales of each map and writes the
tokenizer's reconstruction from them: a preview that reads only the start of each
payload. Both print bits per pixel and bits per code
per file and in total. With the prior of a speech codec the inputs are WAV files (any
rate, resampled to the codec's), each coded as one clip (:mod:`.audio`, format version
3); ``decompress`` writes the WAV at the original rate and length, or with ``--codes``
the clip's codes ``(stages, frames)`` as ``.npy`` with a sidecar naming the codec, the
rate and the length; both print kbit/s against the codec's raw rate. Every input is
read and checked, and every output computed, before the first file is written: bad
input leaves no output (exit code 2), and an output that exists already is refused
unless ``--overwrite``.

``vqkit.cli`` registers them like ``prior``/``sample``::

    add_compress_arguments(sub.add_parser("compress", ...))      # -> run_compress(args)
    add_decompress_arguments(sub.add_parser("decompress", ...))  # -> run_decompress(args)
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..storage.fileio import atomic_write, decoded_names, mirror_paths, refuse_existing
from . import format as fmt
from .codec import (
    Codec,
    codes_to_images,
    decode_many,
    encode_many,
    images_to_codes,
    load_codec,
    restore_codes,
    scale_prefix,
)

__all__ = [
    "add_compress_arguments",
    "add_decompress_arguments",
    "run_compress",
    "run_decompress",
]

SUFFIX = ".vqz"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prior", required=True, metavar="PRIOR_DIR", help="vqkit prior run directory"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default=None,
        help="prior weights (default: best when present, else last); a file decodes only "
        "with the weights that wrote it",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="RUN_DIR",
        default=None,
        help="the tokenizer run, if it moved (its weights must be the same file)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace outputs that exist already"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default), cuda, ...: the device of the tokenizer and the prior's exact "
        "twin (files decode to the same codes on any device)",
    )


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``vqkit compress``."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="images, or .npy with --codes")
    _common(parser)
    parser.add_argument(
        "--codes",
        action="store_true",
        help="the inputs are .npy index maps (h, w[, Q]) or (B, h, w[, Q]): lossless",
    )
    parser.add_argument(
        "--unchecked",
        action="store_true",
        help="with --codes: take maps whose sidecar names another tokenizer, or of another "
        "grid (as vqkit decode --unchecked); the prior must still fit their shape and range",
    )
    parser.add_argument(
        "--class",
        dest="class_id",
        default=None,
        metavar="C",
        help="class id or name of the inputs for a class-conditional prior (default: "
        "the null class, i.e. unconditional)",
    )


def add_decompress_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``vqkit decompress``."""
    parser.add_argument("files", nargs="+", metavar="FILE", help=".vqz files of vqkit compress")
    _common(parser)
    parser.add_argument(
        "--scales",
        type=int,
        default=None,
        metavar="N",
        help="multi-scale tokenizers: decode only the first N scales of each map and write "
        "the reconstruction from them (a preview; image files only)",
    )
    parser.add_argument(
        "--codes",
        action="store_true",
        help="audio files: write each clip's codes (stages, frames) as .npy (and a sidecar) "
        "instead of the WAV",
    )


def _load(args: argparse.Namespace) -> Codec:
    """The codec with its tokenizer: images need it, and code maps are checked against
    (and written back with) its identity (:mod:`vqkit.models.codes_io`)."""
    from ..distributed import resolve_device

    try:  # an optional dependency: say so in one line, before loading any model
        import constriction  # noqa: F401
    except ImportError:
        raise UserError(
            "vqkit compress needs the 'constriction' package: pip install 'vqkit[compress]'"
        ) from None

    return load_codec(
        args.prior,
        checkpoint=args.checkpoint,
        tokenizer=args.tokenizer,
        device=resolve_device(args.device),
        images=True,
    )


def _class_id(spec: str | None, codec: Codec) -> int | None:
    """``--class``: None / 'null' -> None (the null class), a name or an id."""
    if spec is None or spec.lower() in ("null", "none"):
        return None
    if not codec.classes:
        raise UserError("--class: this prior is unconditional (trained without classes)")
    if spec in codec.classes:
        return codec.classes.index(spec)
    try:
        cid = int(spec)
    except ValueError:
        raise UserError(f"unknown class {spec!r}; the prior's classes: {codec.classes}") from None
    if not 0 <= cid < len(codec.classes):
        raise UserError(f"class id {cid} out of range: classes 0..{len(codec.classes) - 1}")
    return cid


def read_image_for(codec: Codec, path: Path) -> torch.Tensor:
    """One image file as uint8 (C, H, W) the tokenizer takes as it is: its exact size
    (no resizing: the file would not decode to the picture given) and channels (gray is
    replicated for a colour tokenizer; colour is refused by a gray one unless the
    channels are equal)."""
    from ..data import read_image

    x = read_image(path)  # its own size; 1 channel for gray, else 3
    c, h, w = x.shape
    size, want = codec.image_size, codec.channels
    if (h, w) != (size, size):
        raise UserError(
            f"{path} is {w}x{h} pixels; this tokenizer takes {size}x{size} images "
            "(resize or crop it first)"
        )
    if c == want:
        return x
    if want == 3:
        return x.expand(3, h, w).clone()
    if bool((x == x[:1]).all()):
        return x[:1].clone()
    raise UserError(f"{path} is a colour image; this tokenizer takes gray (1-channel) images")


def _read_maps(path: Path, identity: dict[str, Any], unchecked: bool) -> np.ndarray:
    """A ``--codes`` input as stored (its dtype and shape come back from decompress),
    after :func:`vqkit.models.codes_io.read_codes` checked it against the prior's
    tokenizer: the sidecar's identity when there is one (``vqkit encode`` / ``sample``
    write it), else the shape and range (with a warning that the tokenizer is unknown)."""
    from ..models.codes_io import read_codes

    read_codes(path, identity, unchecked=unchecked)  # one-line ValueError naming the file
    arr = np.load(path, allow_pickle=False)
    if not np.issubdtype(arr.dtype, np.integer):  # read_codes refused it already
        raise UserError(f"{path}: expected an integer index map; got {arr.dtype}")
    return arr


def _write_maps(path: Path, arr: np.ndarray, identity: dict[str, Any]) -> None:
    """The decompressed map as a ``.npy`` of its original dtype and shape, with the
    tokenizer's identity in its sidecar (as :func:`vqkit.models.codes_io.save_codes`
    writes them: old sidecar removed first, the map, then the new sidecar)."""
    from ..models.codes_io import sidecar_path, write_sidecar

    sidecar_path(path).unlink(missing_ok=True)
    _write_npy(path, arr)
    write_sidecar(path, identity)


def _rates(data_bytes: int, payload_bytes: int, codes: int, pixels: int | None) -> str:
    bpp = f"{8 * data_bytes / pixels:.4f} bits/pixel, " if pixels else ""
    return (
        f"{data_bytes} bytes, {bpp}{8 * data_bytes / codes:.3f} bits/code "
        f"({8 * payload_bytes / codes:.3f} without the header)"
    )


Row = tuple[Path, Path, int, int, int, "int | None"]


def _row(codec: Codec, src: Path, dst: Path, blob: bytes) -> Row:
    """(input, output, file bytes, payload bytes, codes, pixels or None) of one file."""
    header, payload = fmt.unpack(blob)
    n = header.num_maps
    pixels = n * codec.image_size**2 if codec.image_size else None
    return src, dst, len(blob), len(payload), n * int(codec.prior.seq_len), pixels


def _report(rows: list[Row]) -> None:
    """Per file and in total: bytes, bits per pixel (when the image size is known) and
    bits per code, with and without the container header."""
    for src, dst, size, payload, codes, pixels in rows:
        print(f"{src} -> {dst}: {_rates(size, payload, codes, pixels)}")
    total, payload, codes = (sum(r[i] for r in rows) for i in (2, 3, 4))
    pixels = None if any(r[5] is None for r in rows) else sum(r[5] for r in rows)
    print(f"total: {len(rows)} files, {_rates(total, payload, codes, pixels)}")


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def _write_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)  # to memory: np.save on a path would append ".npy" to the temp name
    _write_bytes(path, buf.getvalue())


def _write_png(path: Path, image: torch.Tensor) -> None:
    from PIL import Image

    arr = image.permute(1, 2, 0).numpy()  # uint8 (H, W, C)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    _write_bytes(path, buf.getvalue())


def _audio_rates(codec: Codec, rows: list[tuple[Path, Path, int, Any]]) -> None:
    """Per clip and in total: bytes, seconds, kbit/s of the file and the codec's raw rate
    at the prior's stages."""
    from ..prior.audio_codes import audio_rates

    raw = audio_rates(codec.tokenizer, codec.code_shape[1], 0.0)["raw_kbps"]
    for src, dst, size, info in rows:
        sec = info.length / info.rate
        print(f"{src} -> {dst}: {size} bytes, {sec:.3f} s, {8 * size / sec / 1000:.3f} kbit/s")
    size, sec = sum(r[2] for r in rows), sum(r[3].length / r[3].rate for r in rows)
    kbps = 8 * size / sec / 1000
    print(
        f"total: {len(rows)} clips, {size} bytes, {sec:.3f} s, {kbps:.3f} kbit/s "
        f"({raw:.3f} raw at {codec.code_shape[1]} stages: {kbps / raw:.3f} of it)"
    )


def _compress_audio(args: argparse.Namespace, codec: Codec, inputs: list[Path], names) -> int:
    """WAV clips -> one ``.vqz`` each (:mod:`.audio`)."""
    from ..data import decode_wav
    from .audio import encode_clips, wav_codes

    if args.codes or args.class_id is not None:
        raise UserError("a speech codec's prior compresses WAV clips (no --codes, no --class)")
    clips = []
    for p in inputs:  # all read and encoded before anything is written
        wav = decode_wav(p)
        if wav.samples.numel() == 0:
            raise UserError(f"{p}: empty WAV (0 frames); nothing to compress")
        clips.append(wav_codes(codec, wav.samples, wav.rate))
    blobs = encode_clips(codec, clips)
    for dst, blob in zip(names, blobs, strict=True):
        _write_bytes(dst, blob)
    rows = zip(inputs, names, blobs, clips, strict=True)
    _audio_rates(codec, [(p, n, len(b), c[1]) for p, n, b, c in rows])
    return 0


def run_compress(args: argparse.Namespace) -> int:
    """Compress every input; nothing is written unless all of them compress."""
    codec = _load(args)
    inputs = [Path(p) for p in args.inputs]
    names = mirror_paths(inputs, Path(args.out), SUFFIX)  # collisions refused first
    refuse_existing(names, args.overwrite)
    if codec.audio:
        return _compress_audio(args, codec, inputs, names)
    label = _class_id(args.class_id, codec)
    if args.codes:
        from ..models.codes_io import model_identity

        identity = model_identity(codec.tokenizer)
        arrays = [_read_maps(p, identity, args.unchecked) for p in inputs]
        items, flags, dtypes = [], [], []
        for arr in arrays:
            batched = arr.ndim == len(codec.code_shape) + 1
            items.append((arr if batched else arr[None], label))
            flags.append(fmt.FLAG_CODES | (fmt.FLAG_BATCH_AXIS if batched else 0))
            dtypes.append(fmt.DTYPES.index(f"<{arr.dtype.kind}{arr.dtype.itemsize}"))
        blobs = encode_many(codec, items, flags, dtypes, wheres=[str(p) for p in inputs])
    else:
        images = [read_image_for(codec, p) for p in inputs]  # all checked before coding
        # the tokenizer in batches, then one stream per image, coded side by side
        codes = [images_to_codes(codec, torch.stack(images[i : i + 64]))
                 for i in range(0, len(images), 64)]  # fmt: skip
        maps = torch.cat(codes)
        blobs = encode_many(codec, [(maps[i : i + 1], label) for i in range(len(images))])
    for dst, blob in zip(names, blobs, strict=True):
        _write_bytes(dst, blob)
    _report([_row(codec, *r) for r in zip(inputs, names, blobs, strict=True)])
    return 0


def _decompress_audio(
    args: argparse.Namespace, codec: Codec, files: list[Path], datas: list[bytes]
) -> int:
    """Clips' files -> WAVs at their rate and length, or (``--codes``) their codes."""
    from ..data import write_wav
    from ..models.codes_io import codec_identity, save_audio_codes
    from .audio import codes_to_wav, decode_clips

    if args.scales is not None:
        raise UserError("--scales previews a multi-scale tokenizer's images, not audio clips")
    suffix = ".npy" if args.codes else ".wav"
    names = mirror_paths(files, Path(args.out), suffix)
    refuse_existing(names, args.overwrite)
    decoded = decode_clips(codec, datas, [str(p) for p in files])  # all, before writing
    model = codec.tokenizer
    for name, (codes, header) in zip(names, decoded, strict=True):
        info = header.audio
        name.parent.mkdir(parents=True, exist_ok=True)
        if not args.codes:
            write_wav(name, codes_to_wav(codec, codes, info), info.rate)
            continue
        # the codes file of `vqkit encode` (models/codes_io.py): `vqkit decode` reads it
        save_audio_codes(
            name, codes.T.contiguous().numpy(), codec_identity(model),
            original_rate=info.rate, length=info.length,
        )  # fmt: skip
    done = zip(files, names, datas, decoded, strict=True)
    _audio_rates(codec, [(p, n, len(d), h.audio) for p, n, d, (_, h) in done])
    return 0


def run_decompress(args: argparse.Namespace) -> int:
    """Decompress every file; nothing is written unless all of them decode."""
    files = [Path(p) for p in args.files]
    datas = []
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"no such file: {p}")
        datas.append(p.read_bytes())
    headers = []
    for p, data in zip(files, datas, strict=True):
        try:
            headers.append(fmt.unpack(data)[0])
        except fmt.FormatError as e:
            raise fmt.FormatError(f"{p}: {e}") from None
    codec = _load(args)
    for p, h in zip(files, headers, strict=True):
        codec.check(h, str(p))  # every file's identity before any decoding
    if codec.audio:
        return _decompress_audio(args, codec, files, datas)
    if args.codes:
        raise UserError("--codes writes an audio clip's codes; image files hold theirs already")
    for p, h in zip(files, headers, strict=True):
        if args.scales is not None and h.is_codes:
            raise UserError(
                f"{p} holds index maps (compress --codes), which decompress losslessly in "
                "full; --scales previews image files"
            )
    if args.scales is not None:
        scale_prefix(codec, args.scales)  # one line for a one-map prior or N out of range
    stems = mirror_paths(files, Path(args.out), "")
    # every output's name from the headers, refused if it exists, before any decoding
    out_names = [
        [stem.with_name(stem.name + ".npy")] if h.is_codes else decoded_names(stem, h.num_maps)
        for stem, h in zip(stems, headers, strict=True)
    ]
    refuse_existing([n for names in out_names for n in names], args.overwrite)
    from ..models.codes_io import model_identity

    identity = model_identity(codec.tokenizer)
    outputs: list[tuple[Path, list[tuple[Path, Any]]]] = []
    decoded = decode_many(codec, datas, [str(p) for p in files], args.scales)  # side by side
    for p, names, (codes, header) in zip(files, out_names, decoded, strict=True):
        if header.is_codes:
            outputs.append((p, [(names[0], restore_codes(codes, header))]))
            continue
        images = codes_to_images(codec, codes, args.scales)
        outputs.append((p, list(zip(names, images, strict=True))))
    rows = []
    for (src, items), data, header in zip(outputs, datas, headers, strict=True):
        for name, value in items:
            if header.is_codes:
                _write_maps(name, value, identity)
            else:
                _write_png(name, value)
        dst = items[0][0] if len(items) == 1 else items[0][0].parent
        rows.append(_row(codec, src, dst, data))
    _report(rows)
    return 0
