"""The speech-codec anchors of issue 35, measured: codec2 (3200, 2400, 1200 bit/s) and Opus
(6 and 8 kbit/s) on the FSDD test split, scored by narrowband PESQ, STOI, SI-SDR and the
log-mel distance of :mod:`vqkit.evaluation.audio_metrics`.

How: for each of FSDD's 6 speakers, the 50 test clips (official split: index 0-4 of each
digit) are joined into one signal, digit 0..9 then index 0..4 (``join_by_speaker`` on
``load_audio``'s file-name order), about 21 s at 8 kHz. That signal goes to 16-bit PCM
(round(x * 32768), clipped) and through

* codec2: ``c2enc MODE in.raw out.bin`` then ``c2dec MODE out.bin out.raw`` (headerless
  bitstream, raw 16-bit 8 kHz mono);
* Opus: ``opusenc --bitrate B --raw --raw-rate 8000 --raw-chan 1 in.raw out.opus`` (VBR,
  opusenc's default) then ``opusdec --rate 8000 out.opus out.wav``.

The decoded signal is aligned to the original by cross-correlation (``align``, lag within
±0.5 s), cut or zero-padded to its length, and scored. "file kbps" is the coded file's size
(Ogg container included for Opus) * 8 / the signal's duration. The table is the mean over
speakers; the JSON keeps every speaker's figures and lag.

    python -m benchmarks.bench_audio_anchors [--speaker-plot theo] [--plot-seconds 4] \
        [--codec RUN_OR_MODEL --stages 3,7 --out DIR]

``--codec``: a vqkit speech codec (a run directory, checkpoint or exported directory) is
measured side by side, one row per stage count of ``--stages``, on the same joined
signals and scores: the whole signal is encoded with that many stages and decoded
(``vqkit encode`` / ``decode``'s ``wav_to_codes`` / ``codes_to_wav``); its "file kbps" is
the raw bitrate, frames x stages x log2 K per second of signal.

Needs the Debian packages ``codec2`` and ``opus-tools`` and the ``audio-eval`` extra.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    REPO_ROOT,
    finish_meta,
    md_table,
    meta_lines,
    out_dir,
    run_meta,
    version,
    write_results,
)

# the shared data folder: $VQKIT_SHARED_DATA, else ../shared/data beside the checkout
FSDD = Path(os.environ.get("VQKIT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
RATE = 8000
MAX_LAG = RATE // 2
# name: (kind, setting); setting = codec2 mode, or Opus --bitrate in kbit/s
CODECS: dict[str, tuple[str, str]] = {
    "codec2 3200": ("codec2", "3200"),
    "codec2 2400": ("codec2", "2400"),
    "codec2 1200": ("codec2", "1200"),
    "Opus 6": ("opus", "6"),
    "Opus 8": ("opus", "8"),
}
# issue 35's table: (PESQ-NB, STOI)
ISSUE = {
    "codec2 3200": (2.85, 0.835),
    "codec2 2400": (2.69, 0.80),
    "codec2 1200": (2.45, 0.80),
    "Opus 6": (2.88, 0.86),
    "Opus 8": (3.77, 0.93),
}
PICTURED = ("codec2 3200", "codec2 2400", "Opus 6")  # beside the original (and vqkit's rows)
TOOLS = ("c2enc", "c2dec", "opusenc", "opusdec")


def to_pcm16(x: np.ndarray) -> bytes:
    """float in [-1, 1) -> little-endian int16 (the inverse of the WAV reader's /32768)."""
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2").tobytes()


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")


def code_vqkit(x: np.ndarray, model, stages: int) -> tuple[np.ndarray, float]:
    """The signal through a vqkit codec with ``stages`` stages: (decoded float64 signal,
    raw bits)."""
    from vqkit.data.audio import Wav
    from vqkit.models.codes_io import AudioCodes
    from vqkit.training.audio_commands import codes_to_wav, wav_to_codes

    wav = Wav(torch.from_numpy(x).float(), RATE, channels=1)
    with torch.no_grad():
        codes = wav_to_codes(model, wav, stages)
        y = codes_to_wav(model, AudioCodes(codes, RATE, x.size, 1))
    return y.double().numpy().reshape(-1), codes.size * np.log2(model.num_codes)


def code(x: np.ndarray, kind: str, setting: str, tmp: Path) -> tuple[np.ndarray, int]:
    """The signal through one codec: (decoded float64 signal, coded file bytes)."""
    from vqkit.data.audio import decode_wav

    raw = tmp / "in.raw"
    raw.write_bytes(to_pcm16(x))
    if kind == "codec2":
        bits, out = tmp / "out.bin", tmp / "out.raw"
        run(["c2enc", setting, str(raw), str(bits)])
        run(["c2dec", setting, str(bits), str(out)])
        y = np.frombuffer(out.read_bytes(), dtype="<i2").astype(np.float64) / 32768.0
    else:
        bits, out = tmp / "out.opus", tmp / "out.wav"
        run(
            ["opusenc", "--quiet", "--bitrate", setting, "--raw", "--raw-rate", str(RATE),
             "--raw-chan", "1", str(raw), str(bits)]
        )  # fmt: skip
        run(["opusdec", "--quiet", "--rate", str(RATE), str(bits), str(out)])
        wav = decode_wav(out)
        assert wav.rate == RATE, wav.rate
        y = wav.samples.double().numpy()
    return y, bits.stat().st_size


def coders(model, stages: list[int], tmp: Path) -> dict[str, Callable]:
    """Each row's coder, ``x -> (decoded signal, coded bits)``: the anchors (the bytes of
    their files), then the vqkit codec at each of ``stages`` (its raw bits)."""
    out: dict[str, Callable] = {}
    for name, (kind, setting) in CODECS.items():

        def anchor(x: np.ndarray, kind: str = kind, setting: str = setting):
            y, size = code(x, kind, setting, tmp)
            return y, 8.0 * size

        out[name] = anchor
    for n in stages:
        out[f"vqkit {n} stages"] = lambda x, n=n: code_vqkit(x, model, n)
    return out


def speaker_signals() -> dict[str, np.ndarray]:
    from vqkit.data.audiofolder import load_audio
    from vqkit.evaluation.audio_metrics import join_by_speaker

    data = load_audio(FSDD / "fsdd-8k.tar.gz", "test")
    clips = [data.clip(i) for i in range(len(data))]
    who = [data.speaker_names[s] for s in data.speakers.tolist()]
    return {k: v.double().numpy() for k, v in join_by_speaker(clips, who).items()}


def score(x: np.ndarray, y: np.ndarray) -> dict:
    from vqkit.evaluation import audio_metrics as am

    a = am.align(x, y, max_lag=MAX_LAG)
    return {
        "lag": a.lag,
        "correlation": a.correlation,
        "pesq_nb": am.pesq_nb(x, a.degraded, RATE),
        "stoi": am.stoi(x, a.degraded, RATE),
        "si_sdr": am.si_sdr(x, a.degraded),
        "mel_distance": am.mel_distance(x, a.degraded, RATE),
        "aligned": a.degraded,
    }


def spectrogram_png(path: Path, panels: list[tuple[str, np.ndarray]], seconds: float) -> None:
    """Log-magnitude spectrograms (n_fft 256, hop 64, Hann), one row per signal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = int(seconds * RATE)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.2 * len(panels)), sharex=True)
    for ax, (title, sig) in zip(axes, panels, strict=True):
        spec = torch.stft(
            torch.from_numpy(sig[:n]), 256, 64, window=torch.hann_window(256, dtype=torch.float64),
            return_complex=True,
        ).abs()  # fmt: skip
        db = 20 * torch.log10(spec + 1e-6)
        ax.imshow(
            db.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=-80, vmax=float(db.max()),
            extent=(0, spec.shape[1] * 64 / RATE, 0, RATE / 2000),
        )  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("kHz")
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--speaker-plot", default="theo", help="speaker of the spectrogram picture")
    p.add_argument("--plot-seconds", type=float, default=4.0)
    p.add_argument("--out", type=Path, default=out_dir("audio_anchors"))
    p.add_argument("--codec", help="a vqkit speech codec measured beside the anchors")
    p.add_argument("--stages", default="3,7", help="--codec's stage counts, comma-separated")
    args = p.parse_args(argv)
    model = None
    if args.codec:
        from vqkit.models.io import load_any
        from vqkit.training.export import run_weights

        src = Path(args.codec)  # a run directory has checkpoints/; else a model file or dir
        model = load_any(run_weights(src) if (src / "checkpoints").is_dir() else src).eval()
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: apt-get install -y codec2 opus-tools")
    if not (FSDD / "fsdd-8k.tar.gz").is_file():
        raise SystemExit(f"{FSDD / 'fsdd-8k.tar.gz'} not found (set VQKIT_SHARED_DATA)")
    meta = run_meta("benchmarks.bench_audio_anchors", argv=argv)
    meta["tools"] = {
        pkg: subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True
        ).stdout
        or None
        for pkg in ("codec2", "opus-tools", "libopus0")
    }
    meta["python_packages"] = {p_: version(p_) for p_ in ("pesq", "pystoi", "numpy", "torch")}
    signals = speaker_signals()
    per: dict[str, dict[str, dict]] = {}
    pictures: dict[str, np.ndarray] = {}
    stages = [int(t) for t in args.stages.split(",")] if model is not None else []
    pictured = {*PICTURED, *(f"vqkit {n} stages" for n in stages)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, coder in coders(model, stages, Path(tmp)).items():
            per[name] = {}
            for who, x in signals.items():
                y, bits = coder(x)
                s = score(x, y)
                aligned = s.pop("aligned")
                if who == args.speaker_plot and name in pictured:
                    pictures[name] = aligned
                s["file_kbps"] = bits / (x.size / RATE) / 1000
                s["seconds"] = x.size / RATE
                per[name][who] = s
                print(f"{name:14s} {who:9s} lag {s['lag']:5d} PESQ {s['pesq_nb']:.3f} "
                      f"STOI {s['stoi']:.3f} SI-SDR {s['si_sdr']:6.2f} mel "
                      f"{s['mel_distance']:.3f} {s['file_kbps']:.2f} kbps", flush=True)  # fmt: skip
    if model is not None:
        meta["codec"] = {"path": args.codec, "stages": args.stages,
                         "bitrates_kbps": {n: model.bitrate(n) / 1000
                                           for n in range(1, model.num_stages + 1)}}  # fmt: skip
    keys = ("file_kbps", "pesq_nb", "stoi", "si_sdr", "mel_distance")
    mean = {
        name: {k: statistics.fmean(v[k] for v in rows.values()) for k in keys}
        for name, rows in per.items()
    }
    finish_meta(meta)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "spectrograms.png"
    if args.speaker_plot in signals:
        spectrogram_png(
            png,
            [(f"original ({args.speaker_plot}, FSDD test, joined)", signals[args.speaker_plot])]
            + [(f"{n} (aligned)", y) for n, y in pictures.items()],
            args.plot_seconds,
        )
    rows = [
        [name, f"{m['file_kbps']:.2f}", f"{m['pesq_nb']:.2f}", f"{m['stoi']:.3f}",
         f"{m['si_sdr']:.1f}", f"{m['mel_distance']:.3f}",
         *((f"{ISSUE[name][0]:.2f}", f"{ISSUE[name][1]:.3f}") if name in ISSUE else ("–", "–"))]
        for name, m in mean.items()
    ]  # fmt: skip
    md = [
        "# Speech-codec anchors on the FSDD test split (issue 35)",
        "",
        *meta_lines(meta, packages=("torch", "numpy")),
        f"- pesq {meta['python_packages']['pesq']}, pystoi {meta['python_packages']['pystoi']}",
        f"- tools: codec2 {meta['tools']['codec2']}, opus-tools {meta['tools']['opus-tools']}"
        f" (libopus {meta['tools']['libopus0']})",
        "",
        "Each of the 6 speakers' 50 test clips joined (digit 0-9, then index 0-4), coded, "
        "aligned by cross-correlation, scored; mean over speakers. PESQ-NB is `pesq`'s 'nb' "
        "mode (MOS-LQO); mel: mean |Δ log10 mel| (80 HTK mels, n_fft 512, hop 128).",
        "",
        *md_table(
            [
                "codec",
                "file kbps",
                "PESQ-NB",
                "STOI",
                "SI-SDR dB",
                "mel dist",
                "issue PESQ",
                "issue STOI",
            ],
            rows,
        ),  # fmt: skip
        "",
        "Per speaker (PESQ-NB / STOI, lag in samples):",
        "",
        *md_table(
            ["codec", *signals],
            [
                [
                    name,
                    *(f"{r['pesq_nb']:.2f} / {r['stoi']:.3f} ({r['lag']})" for r in rows_.values()),
                ]
                for name, rows_ in per.items()
            ],
        ),  # fmt: skip
    ]
    write_results(args.out, "anchors", {"meta": meta, "mean": mean, "per_speaker": per}, md)
    print(f"wrote {args.out / 'anchors.md'}, {png}")


if __name__ == "__main__":
    main()
