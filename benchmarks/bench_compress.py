"""vqkit compress on a test split: file sizes against the prior's NLL and fixed-width
packing, speed, the round trip, and rate-distortion against JPEG and WebP (Pillow).

    python -m benchmarks.bench_compress --prior /tmp/h24/prior            # built-in data
    python -m benchmarks.bench_compress --prior C10_PRIOR --data CIFAR --name compress_cifar10

For every image of the split (``--limit`` for fewer):

* **files**: one ``.vqz`` stream per image, exactly what ``vqkit compress`` writes (the
  map coded alone, batch 1, true class in the header for a class-conditional prior);
  decoded again and checked: the decoded codes must equal the encoder's, every file.
* **streams**: ``vqkit.compress.encode`` of ``--stream-batch`` images per stream (the
  coder's termination and the header spread over many maps).
* the prior's **test NLL** (bits per code), teacher-forced over the same maps and
  labels; the **ideal** bits along the coded path (``sum -log2 p``, float64 softmax);
  fixed-width packing at ``ceil(log2 K)`` bits per code.
* **rate-distortion**: PSNR (from the mean squared error over all pixels of the split,
  0..255 scale), SSIM (vqkit.evaluation.image_metrics: pytorch-msssim, when installed;
  mean over images) and bits per
  pixel (bits / (H x W)) of the tokenizer's reconstruction, and of JPEG and WebP at a
  sweep of quality settings, with and without their container headers (JPEG without:
  the entropy-coded scan data after the SOS header; WebP without: the VP8/VP8L chunk
  payload, i.e. minus the 20 bytes of RIFF and chunk headers).

Speed: images per second through the whole path (tokenizer + prior + coder + container),
one thread per the coding loop (vqkit.compress runs it on one CPU thread); wall clock
on a shared machine, so the ratios within the run are what to read.

Writes benchmarks/results/<name>/compress.{md,json} and rate_distortion.png.
"""

from __future__ import annotations

import argparse
import io
import math
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import common
from vqkit.compress import codec as cc
from vqkit.compress import format as fmt
from vqkit.data import load_dataset

MODULE = "benchmarks.bench_compress"
QUALITIES = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)


def mse_psnr_ssim(ref: torch.Tensor, out: torch.Tensor) -> dict:
    """uint8 (N, C, H, W) pairs: PSNR of the pooled MSE, mean per-image SSIM (vqkit's
    definition, :func:`vqkit.evaluation.image_metrics.ssim`; None without pytorch-msssim)."""
    a, b = ref.double(), out.double()
    mse = float(((a - b) ** 2).mean())
    psnr = 10 * math.log10(255.0**2 / mse) if mse > 0 else float("inf")
    try:
        from vqkit.evaluation.image_metrics import ssim as ssim_fn

        ssim = float(torch.cat([ssim_fn(out[i : i + 500], ref[i : i + 500])
                                for i in range(0, len(ref), 500)]).mean())  # fmt: skip
    except ImportError:
        ssim = None
    return {"mse": mse, "psnr": psnr, "ssim": ssim}


def jpeg_scan_bytes(data: bytes) -> int:
    """Bytes of a baseline JPEG's entropy-coded data: after the SOS segment, before EOI."""
    i = data.index(b"\xff\xda")
    seg_len = int.from_bytes(data[i + 2 : i + 4], "big")
    end = data.rindex(b"\xff\xd9")
    return end - (i + 2 + seg_len)


def webp_payload_bytes(data: bytes) -> int:
    """A simple-format WebP's VP8/VP8L chunk payload (RIFF header and chunk header off)."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP", "not a WebP"
    return int.from_bytes(data[16:20], "little")


def pil_codec(images: torch.Tensor, kind: str, quality: int) -> dict:
    """JPEG or WebP of every image at one quality: sizes and the decoded images."""
    from PIL import Image

    out = torch.empty_like(images)
    total = payload = 0
    mode = "L" if images.shape[1] == 1 else "RGB"
    for i, x in enumerate(images):
        arr = x.permute(1, 2, 0).numpy()
        img = Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)
        buf = io.BytesIO()
        if kind == "jpeg":
            img.save(buf, format="JPEG", quality=quality, optimize=True)
        else:
            img.save(buf, format="WEBP", quality=quality, method=6)
        data = buf.getvalue()
        total += len(data)
        payload += jpeg_scan_bytes(data) if kind == "jpeg" else webp_payload_bytes(data)
        dec = np.asarray(Image.open(io.BytesIO(data)).convert(mode))
        out[i] = torch.from_numpy(dec.reshape(*dec.shape[:2], -1).copy()).permute(2, 0, 1)
    return {"bytes": total, "payload_bytes": payload, "decoded": out}


def test_nll_bits(codec: cc.Codec, codes: torch.Tensor, labels: torch.Tensor | None) -> float:
    """The prior's teacher-forced NLL in bits per code over the maps (float32, eval)."""
    prior = codec.prior.eval()
    nats, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(codes), 256):
            c = codes[i : i + 256].to(codec.device)
            y = None if labels is None else labels[i : i + 256].to(codec.device)
            nats += float(-prior.log_prob(c, y).double().sum())
            n += c.shape[0] * prior.seq_len
    return nats / n / math.log(2)


def run(args: argparse.Namespace) -> None:
    meta = common.run_meta(MODULE, args.note)
    torch.set_num_threads(args.threads)
    codec = cc.load_codec(args.prior, device="cpu")
    size, ch = codec.image_size, codec.channels
    data = load_dataset(args.data, "test", image_size=size, channels=ch)
    n = len(data) if args.limit is None else min(args.limit, len(data))
    images, labels = data.images[:n], data.labels[:n]
    cond = codec.prior.config.num_classes > 0
    y = labels if cond else None
    pixels = size * size
    t_len = codec.prior.seq_len
    k = codec.num_symbols

    codes = torch.cat([cc.images_to_codes(codec, images[i : i + 256]) for i in range(0, n, 256)])
    nll = test_nll_bits(codec, codes, y)
    recon = torch.cat(
        [cc.codes_to_images(codec, codes[i : i + 256].numpy()) for i in range(0, n, 256)]
    )

    # files: one stream per image, as vqkit compress writes them; then decoded
    nf = n if args.files_limit is None else min(args.files_limit, n)
    files, ideal, payload, header = [], 0.0, 0, 0
    t0 = time.perf_counter()
    for i in range(nf):
        stats: dict = {}
        x = images[i : i + 1]
        maps = cc.images_to_codes(codec, x)
        files.append(cc.encode_maps(codec, maps, None if y is None else int(y[i]), stats=stats))
        ideal += stats["ideal_bits"]
        payload += stats["payload_bytes"]
        header += stats["header_bytes"]
    enc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mismatched = 0
    decoded = []
    for i, blob in enumerate(files):
        maps, _ = cc.decode_maps(codec, blob, f"image {i}")
        decoded.append(cc.codes_to_images(codec, maps))
        mismatched += int(not np.array_equal(maps, codes[i : i + 1].numpy()))
    dec_s = time.perf_counter() - t0
    decoded_images = torch.cat(decoded)
    preview = None
    if args.preview_scales:  # decompress --scales N: the first N scales of every file
        t0 = time.perf_counter()
        wrong = 0
        for i, blob in enumerate(files):
            maps, _ = cc.decode_maps(codec, blob, f"image {i}", num_scales=args.preview_scales)
            wrong += int(not np.array_equal(maps, codes[i : i + 1, : maps.shape[1]].numpy()))
        preview = {
            "scales": args.preview_scales,
            "codes": int(maps.shape[1]),
            "decode_images_per_s": nf / (time.perf_counter() - t0),
            "prefix_mismatches": wrong,
        }
    # the tokenizer's decoder at batch 1 against batches of 256: same codes, but the
    # convolutions may round differently in the last bit (pixels off by one)
    diff = (decoded_images.int() - recon[:nf].int()).abs()
    file_bytes = sum(len(b) for b in files)

    # streams: many maps per stream
    sb = args.stream_batch
    t0 = time.perf_counter()
    streams = [
        cc.encode(images[i : i + sb], codec, labels=None if y is None else y[i : i + sb])
        for i in range(0, n, sb)
    ]
    s_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_mismatched = 0
    for i, s in enumerate(streams):
        maps, _ = cc.decode_maps(codec, s, f"stream {i}")
        cc.codes_to_images(codec, maps)
        wrong = maps != codes[i * sb : (i + 1) * sb].numpy()  # (n, *code_shape)
        s_mismatched += int(wrong.reshape(len(wrong), -1).any(axis=1).sum())
    s_dec = time.perf_counter() - t0
    s_payload = sum(len(fmt.unpack(s)[1]) for s in streams)
    s_bytes = sum(len(s) for s in streams)

    codes_total, file_codes = n * t_len, nf * t_len
    fixed_bits = math.ceil(math.log2(k))
    vq = {
        "nll_bits_per_code": nll,
        # the files' own yardstick: the NLL of the images coded as files (all of them
        # unless --files-limit)
        "file_nll_bits_per_code": nll
        if nf == n
        else test_nll_bits(codec, codes[:nf], None if y is None else y[:nf]),
        "ideal_bits_per_code": ideal / file_codes,
        "file_payload_bits_per_code": 8 * payload / file_codes,
        "file_bits_per_code": 8 * file_bytes / file_codes,
        "header_bytes_per_file": header / nf,
        "stream_payload_bits_per_code": 8 * s_payload / codes_total,
        "stream_bits_per_code": 8 * s_bytes / codes_total,
        "fixed_bits_per_code": fixed_bits,
        "log2_k": math.log2(k),
        "file_bpp": 8 * file_bytes / (nf * pixels),
        "file_payload_bpp": 8 * payload / (nf * pixels),
        "stream_bpp": 8 * s_bytes / (n * pixels),
        "encode_images_per_s": nf / enc_s,
        "decode_images_per_s": nf / dec_s,
        "stream_encode_images_per_s": n / s_enc,
        "stream_decode_images_per_s": n / s_dec,
        "round_trip_files": nf,
        "round_trip_code_mismatches": mismatched,
        "stream_code_mismatches": s_mismatched,
        "decoded_vs_batched_reconstruction": {
            "max_abs": int(diff.max()),
            "pixels_differing": int((diff > 0).sum()),
            "images_differing": int((diff.flatten(1) > 0).any(1).sum()),
        },
        # the whole split's reconstruction (what the files decode to, up to the last-bit
        # rounding reported above)
        **mse_psnr_ssim(images, recon),
        "files_psnr_ssim": mse_psnr_ssim(images[:nf], decoded_images),
        "preview": preview,
    }
    rd = []
    for kind in ("jpeg", "webp"):
        for q in args.qualities:
            r = pil_codec(images, kind, q)
            rd.append(
                {
                    "codec": kind,
                    "quality": q,
                    "bpp": 8 * r["bytes"] / (n * pixels),
                    "payload_bpp": 8 * r["payload_bytes"] / (n * pixels),
                    **mse_psnr_ssim(images, r["decoded"]),
                }
            )
    common.finish_meta(meta)
    meta.update(
        {
            "data": args.data or "builtin",
            "split": "test",
            "images": n,
            "image_shape": [ch, size, size],
            "code_shape": list(codec.code_shape),
            "num_symbols": k,
            "prior_dir": str(args.prior),
            "prior_hash": codec.prior_hash[:16],
            "tokenizer_hash": codec.tokenizer_hash[:16],
            "prior_config": codec.prior.config.to_dict(),
            "class_conditional": cond,
            "stream_batch": sb,
            "threads": args.threads,
        }
    )
    result = {**meta, "label": args.label, "vqkit": vq, "pillow": rd}
    out = Path(args.out or common.out_dir(args.name))
    lines = report_lines(meta, vq, rd)
    common.write_results(out, "compress", result, lines)
    plot([result], out / "rate_distortion.png")
    print("\n".join(lines))


def report_lines(meta: dict, vq: dict, rd: list[dict]) -> list[str]:
    def f(v, spec=".3f"):
        return common.fmt(v, spec)

    n, fixed = meta["images"], vq["fixed_bits_per_code"]
    d = vq["decoded_vs_batched_reconstruction"]
    saving = 1 - vq["file_payload_bits_per_code"] / fixed
    file_nll = vq.get("file_nll_bits_per_code", vq["nll_bits_per_code"])
    over = vq["file_payload_bits_per_code"] / file_nll - 1
    s_over = vq["stream_payload_bits_per_code"] / vq["nll_bits_per_code"] - 1
    lines = [
        f"# vqkit compress: {meta['data']} test split ({n} images)",
        "",
        *common.meta_lines(meta, machine_extra=f"; torch threads {meta['threads']}"),
        f"- code maps {tuple(meta['code_shape'])} of K = {meta['num_symbols']}, "
        f"images {tuple(meta['image_shape'])}; prior {meta['prior_hash']}, tokenizer "
        f"{meta['tokenizer_hash']}; class-conditional: {meta['class_conditional']} "
        "(the true class is in each header)",
        "",
        "## Bits per code",
        "",
        *common.md_table(
            ["what", "bits/code", "vs NLL (files: of the same images)"],
            [
                ["prior test NLL (teacher-forced, float32)", f(vq["nll_bits_per_code"]), ""],
                *(
                    []
                    if file_nll == vq["nll_bits_per_code"]
                    else [
                        [
                            f"prior NLL of the {vq['round_trip_files']} images coded as files",
                            f(file_nll),
                            "",
                        ]
                    ]
                ),
                [
                    "ideal along the coded path (sum -log2 p)",
                    f(vq["ideal_bits_per_code"]),
                    f"{vq['ideal_bits_per_code'] / file_nll - 1:+.3%}",
                ],
                [
                    "files (one per image): payload",
                    f(vq["file_payload_bits_per_code"]),
                    f"{over:+.2%}",
                ],
                [
                    f"files: with the {vq['header_bytes_per_file']:.0f}-byte header",
                    f(vq["file_bits_per_code"]),
                    "",
                ],
                [
                    f"streams of {meta['stream_batch']} maps: payload",
                    f(vq["stream_payload_bits_per_code"]),
                    f"{s_over:+.2%}",
                ],
                ["streams: with header", f(vq["stream_bits_per_code"]), ""],
                [f"fixed-width packing (ceil log2 K = {fixed})", str(fixed), ""],
            ],
        ),  # fmt: skip
        "",
        f"- file payload against fixed-width packing: {saving:.1%} smaller",
        f"- round trip: {vq['round_trip_files']} files decoded (file rows: the first "
        f"{vq['round_trip_files']} images; the rest: all {n}); code maps differing from the "
        "encoder's: "
        f"{vq['round_trip_code_mismatches']} (streams: {vq['stream_code_mismatches']})",
        f"- the files' images (tokenizer decoder at batch 1) against the tokenizer's "
        f"reconstruction in batches of 256: {d['pixels_differing']} pixels in "
        f"{d['images_differing']} images differ, by at most {d['max_abs']} (floating-point "
        "rounding of the decoder's convolutions at another batch size; the codes are equal)",
        f"- speed (images/s, whole path): files encode {vq['encode_images_per_s']:.1f}, "
        f"decode {vq['decode_images_per_s']:.1f}; streams of {meta['stream_batch']}: encode "
        f"{vq['stream_encode_images_per_s']:.1f}, decode {vq['stream_decode_images_per_s']:.1f}",
        *(
            [
                f"- previews (`decompress --scales {p['scales']}`: the first {p['codes']} codes "
                f"of each file): {p['decode_images_per_s']:.1f} files/s, prefixes differing "
                f"from the encoder's codes: {p['prefix_mismatches']}"
            ]
            if (p := vq.get("preview"))
            else []
        ),
        "",
        "## Rate-distortion (bits per pixel = bits / (H x W))",
        "",
        *common.md_table(
            ["codec", "setting", "bpp", "bpp w/o headers", "PSNR dB", "SSIM"],
            [
                [
                    "vqkit",
                    "files",
                    f(vq["file_bpp"]),
                    f(vq["file_payload_bpp"]),
                    f(vq["psnr"], ".2f"),
                    f(vq["ssim"]),
                ],
                [
                    "vqkit",
                    f"streams of {meta['stream_batch']}",
                    f(vq["stream_bpp"]),
                    f(
                        vq["stream_payload_bits_per_code"]
                        * vq["stream_bpp"]
                        / vq["stream_bits_per_code"]
                    ),
                    f(vq["psnr"], ".2f"),
                    f(vq["ssim"]),
                ],
                *[
                    [
                        r["codec"],
                        f"q={r['quality']}",
                        f(r["bpp"]),
                        f(r["payload_bpp"]),
                        f(r["psnr"], ".2f"),
                        f(r["ssim"]),
                    ]
                    for r in rd
                ],
            ],
        ),  # fmt: skip
    ]
    return lines


def plot(results: list[dict], path: Path) -> None:
    """The rate-distortion chart of one or more results (one vqkit tokenizer each, on the
    same split): JPEG and WebP curves from the first, one marker set per tokenizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    first = results[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, color in (("jpeg", "tab:blue"), ("webp", "tab:green")):
        rows = [r for r in first["pillow"] if r["codec"] == kind]
        ax.plot([r["bpp"] for r in rows], [r["psnr"] for r in rows], "o-", color=color,
                label=f"{kind.upper()} (file)")  # fmt: skip
        ax.plot([r["payload_bpp"] for r in rows], [r["psnr"] for r in rows], "o--",
                color=color, alpha=0.5, label=f"{kind.upper()} (without headers)")  # fmt: skip
    for res, color in zip(results, ("red", "purple", "darkorange", "black"), strict=False):
        vq, name = res["vqkit"], res.get("label") or f"vqkit K={res['num_symbols']}"
        ax.plot([vq["file_bpp"]], [vq["psnr"]], "*", color=color, ms=12, label=f"{name} (file)")
        ax.plot([vq["file_payload_bpp"]], [vq["psnr"]], "^", color=color, ms=9,
                label=f"{name} (payload)")  # fmt: skip
        ax.plot([vq["stream_bpp"]], [vq["psnr"]], "s", color=color, ms=8,
                label=f"{name} (streams of {res['stream_batch']})")  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([0.1, 0.2, 0.5, 1, 2, 5, 10])
    ax.set_xlabel("bits per pixel (log)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"{first['data']} test split, {first['images']} images")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prior", help="vqkit prior run directory")
    ap.add_argument(
        "--plot-only",
        metavar="JSON",
        nargs="+",
        help="redraw the plot of results JSONs (one tokenizer each, same split) into --out "
        "(default: beside the first)",
    )
    ap.add_argument("--label", help="the tokenizer's name in tables and plots")
    ap.add_argument(
        "--data", default=None, help="dataset (default: built-in; e.g. the CIFAR-10 archive)"
    )
    ap.add_argument("--name", default="compress_builtin", help="results folder name")
    ap.add_argument("--out", default=None, help="results folder (default: results/<name>)")
    ap.add_argument("--limit", type=int, default=None, help="first N test images only")
    ap.add_argument(
        "--files-limit",
        type=int,
        default=None,
        help="code one file per image for the first N only (batch-1 coding is the slow path)",
    )
    ap.add_argument("--stream-batch", type=int, default=250, help="maps per stream")
    ap.add_argument(
        "--preview-scales", type=int, help="multi-scale: also decode the first N scales"
    )
    ap.add_argument("--qualities", type=int, nargs="+", default=list(QUALITIES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (coding uses 1)")
    ap.add_argument("--note", help="free text stored in the results")
    args = ap.parse_args()
    if args.plot_only:
        import json

        results = [json.loads(Path(p).read_text()) for p in args.plot_only]
        where = Path(args.out) if args.out else Path(args.plot_only[0]).parent
        plot(results, where / "rate_distortion.png")
    elif not args.prior:
        ap.error("--prior is required")
    else:
        run(args)


if __name__ == "__main__":
    main()
