"""``vqkit encode`` / ``decode`` / ``eval`` on a speech codec (:class:`~vqkit.models.AudioCodec`
from a checkpoint, a run directory or a pretrained directory; ``vqkit.cli`` hands the
loaded codec here), and the two steps every WAV tool shares: :func:`wav_to_codes`,
:func:`codes_to_wav`.

* ``vqkit encode CODEC x.wav [more.wav | FOLDER ...] --out DIR [--stages N]``: each WAV
  (a folder: its ``.wav`` / ``.wave`` files, recursively) as ``DIR/NAME.npy``, one clip's
  ``(stages, frames)`` codes, with the sidecar of :mod:`vqkit.models.codes_io` (the
  codec's weights hash, K, stages, its rate, the WAV's rate and length in samples). A WAV
  at another rate is resampled to the codec's (:mod:`vqkit.data.resample`; one line says
  so); a WAV of several channels is averaged to mono (:func:`~vqkit.data.decode_wav`;
  one line says so); an empty WAV (0 samples) gives codes of 0 frames, decoded back to
  an empty WAV; 8-, 16-, 24- and 32-bit PCM are read; a corrupt file, a non-WAV file or a
  float WAV (no NaN can come in: only PCM is read) is one line naming it, before anything
  is written.
* ``vqkit decode CODEC NAME.npy ... --out DIR|x.wav [--stages N]``: a 16-bit WAV at the
  clip's original rate and length (decoded at the codec's rate, resampled back, cut to
  the length), from the first ``N`` stages when asked (quantizer dropout in training
  makes fewer stages a valid, coarser decoding); codes of another codec (or an image
  tokenizer's map) are refused in one line, ``--unchecked`` decodes raw arrays.
* ``vqkit eval CODEC [--data WAVS] [--split test] [--limit N]``: :func:`codec_report` on
  the split (default: the data the codec records, :func:`~vqkit.training.export.codec_source`,
  its test split) as ``eval.json``, with ``spectrograms.png`` and ``samples/*.wav``
  (:func:`~vqkit.evaluation.codec_eval.write_samples`), into ``--out`` (default
  ``RUN/eval-SPLIT``); existing outputs are refused without ``--overwrite``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.audio import AUDIO_EXTENSIONS, Wav, decode_wav, write_wav
from ..data.resample import resample, resampled_length
from ..errors import UserError
from ..models import AudioCodec
from ..models.codes_io import (
    AudioCodes,
    codec_identity,
    read_audio_codes,
    save_audio_codes,
)
from ..storage.fileio import dump_json, mirror_paths, refuse_existing, write_json
from .export import codec_source

__all__ = [
    "SAMPLE_CLIPS",
    "codes_to_wav",
    "run_decode",
    "run_encode",
    "run_eval",
    "wav_inputs",
    "wav_to_codes",
]

SAMPLE_CLIPS = 3
"""Test clips ``vqkit eval`` writes as WAV samples and spectrograms (the job's default)."""

_IMAGE_EVAL_FLAGS = ("inception_weights", "features", "lpips_weights", "cache_dir")


def wav_inputs(paths: list[str]) -> list[Path]:
    """The WAV files of ``paths``: files as given, folders' ``.wav`` / ``.wave`` files
    (recursive, sorted; hidden ones skipped); one line for a missing path or a folder
    without WAV files."""
    out: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in AUDIO_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise UserError(f"{path}: no WAV files ({', '.join(AUDIO_EXTENSIONS)}) in it")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return out


def _device(model: AudioCodec) -> torch.device:
    return next(model.parameters()).device


def wav_to_codes(model: AudioCodec, wav: Wav, num_stages: int | None = None) -> np.ndarray:
    """A decoded WAV's codes, int64 ``(stages, frames)``: the clip resampled to the
    codec's rate and encoded alone with its first ``num_stages`` stages (default all);
    an empty clip gives 0 frames."""
    model.bitrate(num_stages)  # one line for a stage count the codec does not have
    n = model.num_stages if num_stages is None else num_stages
    if wav.samples.numel() == 0:
        return np.zeros((n, 0), dtype=np.int64)
    x = resample(wav.samples, wav.rate, model.config.sample_rate)
    codes = model.encode(x.reshape(1, 1, -1).to(_device(model)), num_stages)[0].cpu()
    return (codes.T if codes.dim() == 2 else codes[None]).numpy().astype(np.int64)


def codes_to_wav(model: AudioCodec, codes: AudioCodes) -> torch.Tensor:
    """The clip of :func:`read_audio_codes`' ``codes`` as float32 ``(length,)`` at its
    ``original_rate``: decoded at the codec's rate (``AudioCodec.decode`` to the
    resampled clip's length), resampled back and cut to ``length``."""
    if codes.length == 0:
        return torch.zeros(0)
    rate = model.config.sample_rate
    c = torch.from_numpy(codes.codes).to(_device(model))  # (n, T)
    batch = c.T[None] if model.num_stages > 1 else c[0][None]  # (1, T, n) or (1, T)
    length = resampled_length(codes.length, codes.original_rate, rate)
    y = model.decode(batch, length=length)[0, 0].float().cpu()
    return resample(y, rate, codes.original_rate)[: codes.length]


def _check_flags(args: argparse.Namespace) -> None:
    if getattr(args, "scales", None) is not None:
        raise UserError("--scales is for multi-scale image tokenizers; a codec takes --stages")


def run_encode(args: argparse.Namespace, model: AudioCodec) -> int:
    """``vqkit encode`` on a codec (module docstring); every input decoded and checked
    before anything is written."""
    _check_flags(args)
    identity = codec_identity(model)
    rate = model.config.sample_rate
    inputs = wav_inputs(args.images)
    names = mirror_paths(inputs, Path(args.out or "."), ".npy")
    refuse_existing(names, args.overwrite)
    model.bitrate(args.stages)  # a bad --stages is refused before any file is read
    wavs = [decode_wav(p) for p in inputs]
    kbps = model.bitrate(args.stages) / 1000
    for p, name, wav in zip(inputs, names, wavs, strict=True):
        if wav.channels > 1:
            print(f"{p}: {wav.channels} channels averaged to mono (the codec is mono)")
        if wav.rate != rate and wav.samples.numel():
            print(f"{p}: {wav.rate} Hz resampled to the codec's {rate} Hz")
        codes = wav_to_codes(model, wav, args.stages)
        name.parent.mkdir(parents=True, exist_ok=True)
        save_audio_codes(
            name,
            codes,
            identity,
            original_rate=wav.rate,
            length=wav.samples.numel(),
            channels=wav.channels,
        )
        seconds = wav.samples.numel() / wav.rate
        print(f"{p} -> {name} {codes.shape} ({seconds:.3g} s at {kbps:.3g} kbit/s)")
    return 0


def _decode_names(args: argparse.Namespace, inputs: list[Path]) -> list[Path]:
    """``--out x.wav`` for one input, else ``DIR/NAME.wav`` mirroring the inputs."""
    out = Path(args.out or ".")
    if out.suffix.lower() in AUDIO_EXTENSIONS:
        if len(inputs) != 1:
            raise UserError(f"--out {out} is one WAV file; give a folder for {len(inputs)} inputs")
        return [out]
    return mirror_paths(inputs, out, ".wav")


def run_decode(args: argparse.Namespace, model: AudioCodec) -> int:
    """``vqkit decode`` on a codec (module docstring); every input checked before
    anything is written."""
    _check_flags(args)
    identity = codec_identity(model)
    inputs = [Path(p) for p in args.codes]
    names = _decode_names(args, inputs)
    clips = [read_audio_codes(p, identity, unchecked=args.unchecked) for p in inputs]
    if args.stages is not None:
        model.bitrate(args.stages)
        for p, clip in zip(inputs, clips, strict=True):
            if args.stages > clip.codes.shape[0]:
                raise UserError(
                    f"{p} holds {clip.codes.shape[0]} stage(s); --stages {args.stages} asks "
                    "for more"
                )
        clips = [
            AudioCodes(c.codes[: args.stages], c.original_rate, c.length, c.channels) for c in clips
        ]
    refuse_existing(names, args.overwrite)
    for p, name, clip in zip(inputs, names, clips, strict=True):
        wav = codes_to_wav(model, clip)
        name.parent.mkdir(parents=True, exist_ok=True)
        write_wav(name, wav, clip.original_rate)
        n = clip.codes.shape[0]
        print(f"{p} -> {name} ({clip.length} samples at {clip.original_rate} Hz, {n} stage(s))")
    return 0


def _eval_data(args: argparse.Namespace, model: AudioCodec, train_config: dict[str, Any]):
    """(the split's clips at the codec's rate, the source): ``--data``, else the data the
    codec records, refused in one line when it records none or it cannot be read."""
    from ..data.audiofolder import load_audio

    where = str(args.checkpoint)
    info = getattr(model, "pretrained_info", None) or {}
    source = args.data or codec_source(info, train_config)
    if source is None:
        raise UserError(f"{where} records no training data; name the data with --data")
    split = args.split or "test"
    try:
        data = load_audio(source, split, rate=model.config.sample_rate)
    except (OSError, ValueError) as e:
        if args.data is not None:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"{where} was trained on {source}, which cannot be read now ({first}); pass "
            "--data to name the data"
        ) from e
    return data, str(source), split


def run_eval(
    args: argparse.Namespace, model: AudioCodec, train_config: dict[str, Any], home: Path
) -> int:
    """``vqkit eval`` on a codec (module docstring). ``home``: the run (or directory) the
    codec came from, where ``eval-SPLIT`` goes by default."""
    from ..evaluation.codec_eval import codec_report, write_samples

    given = [f"--{f.replace('_', '-')}" for f in _IMAGE_EVAL_FLAGS if getattr(args, f, None)]
    if given:
        raise UserError(f"{', '.join(given)}: image tokenizers only; this is an audio codec")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1 clip; got {args.limit}")
    out = Path(args.out) if args.out else None
    if out is not None and out.resolve() == home and (home / "eval.json").is_file():
        raise UserError(
            f"--out {out} is the codec's run: eval.json there is the run's own record; "
            "choose another folder"
        )
    data, source, split = _eval_data(args, model, train_config)
    out = out or home / f"eval-{split}"
    samples = sorted((out / "samples").glob("*.wav")) if (out / "samples").is_dir() else []
    refuse_existing([out / "eval.json", out / "spectrograms.png", *samples], args.overwrite)
    for old in samples:  # --overwrite: no stale clip of an earlier evaluation stays
        old.unlink()
    report = codec_report(model, data, limit=args.limit or 0)
    result = {"checkpoint": str(args.checkpoint), "split": split, "data": source, **report}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", result)
    stages = [row["num_stages"] for row in report["stages"]]
    written = write_samples(model, data, stages, SAMPLE_CLIPS, out)
    print(dump_json(result, indent=2))
    print(f"wrote {out / 'eval.json'}, {out / 'spectrograms.png'} and {len(written) - 1} WAV "
          f"samples in {out / 'samples'}")  # fmt: skip
    return 0
