"""vqkit compress on a speech codec's test clips: the entropy-coded bitrate against the
codec's raw bitrate (issue 35's target: ">= 20% below the raw bitrate").

    python -m benchmarks.bench_audio_compress --prior AUDIO_PRIOR
    python -m benchmarks.bench_audio_compress --prior AUDIO_PRIOR --data FSDD.tar.gz --limit 100
    python -m benchmarks.bench_audio_compress --prior AUDIO_PRIOR --join-speakers

For every clip of the codec's test split (the data its prior records, or ``--data``;
``--limit`` for the first N): one ``.vqz`` file, exactly what ``vqkit compress x.wav``
writes (the clip at the codec's rate, coded alone under the prior's exact twin),
decoded again and checked (the decoded codes must equal the encoder's, every clip).
``--join-speakers``: one file per speaker instead, that speaker's test clips joined in
split order (:func:`vqkit.evaluation.audio_metrics.join_by_speaker`, as the PESQ / STOI
scores join them: about 20 s each on FSDD), so the header is paid once per signal of a
realistic length rather than once per 0.4 s digit.
Reported, summed over the clips and divided by their total duration:

* **raw kbps**: the codec's uncoded rate at the prior's stages, ``frames/s x n x log2 K``
  (every frame of every clip, ``ceil(L / hop)`` frames, at fixed width);
* **payload kbps**: the range coder's bytes x 8 / seconds (the entropy coding alone);
* **file kbps**: the files' bytes x 8 / seconds, the header included (61 + 2N bytes a
  clip: hashes, shapes, the audio block, checksum and CRC; on sub-second clips a large
  share);
* **ideal kbps**: ``sum -log2 q`` of the coded codes under the twin (a perfect coder);
* the prior's **test NLL** (its ``eval.json``) as kbps, for comparison;

and the ratios to the raw rate (``1 - ratio`` is the saving). Writes
``benchmarks/results/<name>/audio_compress.{md,json}`` with the command, commit and
machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import common
from vqkit.compress.audio import decode_clips, encode_clips, wav_codes
from vqkit.compress.codec import load_codec
from vqkit.data import load_audio
from vqkit.evaluation.audio_metrics import join_by_speaker
from vqkit.prior.audio_codes import audio_rates

MODULE = "benchmarks.bench_audio_compress"


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    meta = common.run_meta(MODULE, args.note)
    codec = load_codec(args.prior, device=args.device)
    if not codec.audio:
        raise SystemExit(f"{args.prior} is not a speech codec's prior")
    prior_dir = Path(args.prior)
    cfg = json.loads((prior_dir / "config.json").read_text())
    ev_path = prior_dir / "eval.json"
    ev = json.loads(ev_path.read_text()) if ev_path.is_file() else {}
    source = args.data or cfg["data"]["source"]
    model = codec.tokenizer
    rate = model.config.sample_rate
    clips = load_audio(source, "test", rate=rate)
    count = len(clips) if args.limit is None else min(args.limit, len(clips))
    signals = [clips.clip(i) for i in range(count)]
    if args.join_speakers:  # one signal per speaker, its clips in split order
        signals = list(join_by_speaker(signals, clips.speaker_labels(range(count))).values())
    stages = codec.code_shape[1]
    started = time.perf_counter()
    items = [wav_codes(codec, x, rate) for x in signals]
    stats = [{} for _ in items]
    blobs = encode_clips(codec, items, stats)
    encode_s = time.perf_counter() - started
    started = time.perf_counter()
    decoded = decode_clips(codec, blobs)
    decode_s = time.perf_counter() - started
    for (want, _), (got, _) in zip(items, decoded, strict=True):
        assert torch.equal(want, got), "a clip decoded to other codes than were written"
    seconds = sum(info.length / info.rate for _, info in items)
    file_bytes = sum(len(b) for b in blobs)
    payload_bytes = sum(s["payload_bytes"] for s in stats)
    ideal_bits = sum(s["ideal_bits"] for s in stats)
    frames = sum(info.frames for _, info in items)
    raw = audio_rates(model, stages, 0.0)["raw_kbps"]
    raw_frames = frames * stages * float(torch.tensor(codec.num_symbols).log2()) / seconds / 1000
    figures = {
        "clips": count,
        "files": len(items),
        "joined": "each speaker's clips joined, one file each" if args.join_speakers else "",
        "seconds": seconds,
        "frames": frames,
        "stages": stages,
        "window": codec.code_shape[0],
        "raw_kbps": raw,
        "raw_kbps_frames": raw_frames,
        "payload_kbps": 8 * payload_bytes / seconds / 1000,
        "file_kbps": 8 * file_bytes / seconds / 1000,
        "ideal_kbps": ideal_bits / seconds / 1000,
        "header_bytes_per_file": (file_bytes - payload_bytes) / max(len(items), 1),
        "prior_test_bits": ev.get("test_bits"),
        "prior_test_kbps": ev.get("test_kbps"),
        "encode_s": encode_s,
        "decode_s": decode_s,
        "round_trip": "every clip decoded to the encoder's codes",
    }
    for k in ("payload", "file", "ideal"):
        figures[f"{k}_ratio"] = figures[f"{k}_kbps"] / raw_frames
    common.finish_meta(meta)
    result = {"meta": meta, "prior": str(prior_dir.resolve()), "data": source, **figures}
    out = Path(args.out or common.out_dir(args.name))
    common.write_results(out, "audio_compress", result, report_lines(meta, result))
    print("\n".join(report_lines(meta, result)))
    return result


def report_lines(meta: dict, r: dict) -> list[str]:
    def f(v, spec=".3f"):
        return common.fmt(v, spec)

    # results written before --join-speakers name it per clip (one file a clip)
    header = r.get("header_bytes_per_file", r.get("header_bytes_per_clip"))
    rows = [
        ["raw (fixed width, every frame)", f(r["raw_kbps_frames"]), "1.000", "-"],
        ["ideal (sum -log2 q, twin)", f(r["ideal_kbps"]), f(r["ideal_ratio"]),
         f(1 - r["ideal_ratio"], ".1%")],
        ["payload (range coder)", f(r["payload_kbps"]), f(r["payload_ratio"]),
         f(1 - r["payload_ratio"], ".1%")],
        ["file (.vqz, header included)", f(r["file_kbps"]), f(r["file_ratio"]),
         f(1 - r["file_ratio"], ".1%")],
    ]  # fmt: skip
    return [
        "# Speech codec clips entropy-coded with the prior",
        "",
        *common.meta_lines(meta),
        f"- prior: `{r['prior']}`; data: `{r['data']}` (test split, {r['clips']} clips, "
        f"{r['seconds']:.1f} s, {r['frames']} frames of {r['stages']} stages, windows of "
        f"{r['window']} frames)"
        + (f"; {r['joined']}: {r['files']} files" if r.get("joined") else ""),
        f"- the codec's raw rate at {r['stages']} stages: {f(r['raw_kbps'])} kbit/s; the "
        f"prior's test NLL: {f(r['prior_test_bits'])} bits/code = "
        f"{f(r['prior_test_kbps'])} kbit/s",
        f"- header: {f(header, '.1f')} bytes per file; encode "
        f"{f(r['encode_s'], '.2f')} s, decode {f(r['decode_s'], '.2f')} s (all files); "
        f"{r['round_trip']}",
        "",
        *common.md_table(["rate", "kbit/s", "/ raw", "saving"], rows),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prior", required=True, help="vqkit prior run directory of a speech codec")
    ap.add_argument("--data", default=None, help="clips (default: the prior's record)")
    ap.add_argument("--limit", type=int, default=None, help="first N test clips only")
    ap.add_argument(
        "--join-speakers",
        action="store_true",
        help="one file per speaker: its test clips joined (the header paid once a signal)",
    )
    ap.add_argument("--device", default="cpu", help="the codec's and the twin's device")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--name", default="audio_compress", help="results folder name")
    ap.add_argument("--out", default=None, help="results folder (default: results/<name>)")
    ap.add_argument("--note", help="free text stored in the results")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
