"""``vqkit`` command line.

vqkit train [--data PATH] [--steps N] [--out DIR] ...   train a VQ-VAE (images) or the
                                                          speech codec (WAV data)
vqkit eval CHECKPOINT [--data PATH] [--split test]       PSNR, SSIM, MS-SSIM, usage, bits/pixel;
      [--inception-weights F] [--features DIR] [--lpips-weights F]   rFID / FD, KID, LPIPS
vqkit features --data PATH --out DIR                      train vqkit's own feature network
vqkit encode CHECKPOINT IMAGES... --out DIR              images -> index maps (.npy)
vqkit decode CHECKPOINT CODES.npy... --out DIR           index maps -> PNG images
vqkit encode CODEC X.wav|FOLDER... --out DIR [--stages N]  WAV -> codes (stages, frames)
vqkit decode CODEC CODES.npy... --out DIR|X.wav          codes -> WAV (original rate, length)
vqkit eval CODEC [--data WAVS] [--out DIR]               a codec per stage count (eval.json)
vqkit pack IMAGES --out SHARDS [--shard-size N]          any source -> WebDataset shards
vqkit prior --tokenizer RUN_DIR --out PRIOR_DIR          train a prior over the codes
            [--kind autoregressive|masked]
vqkit sample PRIOR_DIR --num N --out DIR                 new code maps -> images
vqkit sample PRIOR_DIR --edit IMAGE --region x0,y0,x1,y1  regenerate a box (masked prior)
vqkit compress IMAGES... --prior PRIOR_DIR --out DIR     images -> .vqz files (entropy-coded)
vqkit decompress FILES.vqz... --prior PRIOR_DIR --out DIR  .vqz -> PNG (or .npy with --codes)
vqkit export RUN --out DIR                               a run -> save_pretrained layout

CHECKPOINT / CODEC: a .pt checkpoint, a .safetensors export, a pretrained directory
(vqkit export; a codec run's codec/) or a run directory (its final model, else
checkpoints/best.pt, else last.pt); an audio codec's gets the audio commands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["main"]


def _model_path(checkpoint: str) -> Path:
    """The model file or directory a CHECKPOINT argument names: a run directory's weights
    (:func:`vqkit.training.export.run_weights`), anything else itself."""
    from .training.export import run_weights

    path = Path(checkpoint)
    return run_weights(path) if (path / "checkpoints").is_dir() else path


def _load(args: argparse.Namespace):
    from .models.io import load_any
    from .storage.checkpoint import load_checkpoint
    from .training.config import resolve_device

    device = resolve_device(args.device)
    path = _model_path(args.checkpoint)
    model = load_any(path, map_location=device).to(device).eval()
    meta: dict[str, Any] = {}
    if path.suffix == ".pt":
        ckpt = load_checkpoint(path, map_location="cpu")
        meta = {
            "data_variance": ckpt.get("data_variance"),
            "train_config": ckpt.get("train_config", {}),
        }
    return model, meta, device


def _run_dir_of(checkpoint: Path) -> Path:
    """The run a checkpoint belongs to: RUN for RUN/checkpoints/x.pt, the folder of
    RUN/model.safetensors, RUN for a run directory or its pretrained RUN/codec, else a
    pretrained directory itself."""
    path = checkpoint.resolve()
    if path.is_dir():
        inside = (path.parent / "checkpoints").is_dir() and not (path / "checkpoints").is_dir()
        return path.parent if inside else path
    parent = path.parent
    return parent.parent if parent.name == "checkpoints" else parent


def _is_codec(model: Any) -> bool:
    from .models import AudioCodec

    return isinstance(model, AudioCodec)


def _image_only(args: argparse.Namespace) -> None:
    """An audio codec's flags refused on an image tokenizer (one line)."""
    if getattr(args, "stages", None) is not None:
        raise UserError(
            "--stages is for audio codecs (residual stages); this is an image tokenizer"
        )


def _eval_data(args: argparse.Namespace, model: Any, meta: dict[str, Any]) -> tuple[Any, dict]:
    """(images, what eval.json records of them): ``--data`` (split ``--split``, default
    test), else the data the model records (:mod:`vqkit.data.reference`; split
    ``--split``, default the run's eval split), refused in one line when it records none
    or it cannot be read: never the built-in set in its place."""
    from .data.reference import (
        check_reference,
        data_reference,
        describe_use,
        load_reference,
        reference_from_train_config,
    )

    cfg = model.config
    if args.data is not None:
        ref = data_reference(
            args.data,
            image_size=cfg.image_size,
            channels=cfg.in_channels,
            eval_split=args.split or "test",
        )
    else:
        ref = model.pretrained_info.get("data") if hasattr(model, "pretrained_info") else None
        if ref is None and meta.get("train_config"):  # a .pt checkpoint: its options
            ref = reference_from_train_config(
                meta["train_config"], image_size=cfg.image_size, channels=cfg.in_channels
            )
        ref = check_reference(ref, str(args.checkpoint))
    data, split = load_reference(
        ref,
        args.split,
        cache_dir=args.cache_dir,
        where=str(args.checkpoint),
        given=args.data is not None,
    )
    return data, describe_use(ref, split, len(data))


def _eval(args: argparse.Namespace) -> int:
    from .data import data_variance
    from .evaluation.plots import save_progressive_grid, save_recon_grid
    from .evaluation.reconstruction import evaluate, progressive_reconstructions
    from .storage.fileio import dump_json, refuse_existing, write_json

    model, meta, device = _load(args)
    run_dir = _run_dir_of(Path(args.checkpoint))
    if _is_codec(model):
        from .training.audio_commands import run_eval

        return run_eval(args, model, meta.get("train_config") or {}, run_dir)
    out = Path(args.out) if args.out else None
    if out is not None and out.resolve() == run_dir and (run_dir / "eval.json").is_file():
        raise UserError(
            f"--out {out} is the checkpoint's run: eval.json there is the run's own record; "
            "choose another folder"
        )
    data, used = _eval_data(args, model, meta)
    # beside the checkpoint's run unless --out says otherwise, never the current directory
    out = out or run_dir / f"eval-{used['split']}"
    outputs = [out / "eval.json", out / "recon.png", out / "progressive.png"]
    refuse_existing(outputs, args.overwrite)  # before the evaluation's minutes
    outputs[-1].unlink(missing_ok=True)  # --overwrite: no stale picture of another model
    var = meta.get("data_variance") or data_variance(data)
    result = evaluate(
        model,
        data,
        data_variance=var,
        device=device,
        progress=True,
        limit=args.limit,
        suite=_eval_suite(args),
    )
    result.pop("counts")
    result["data"] = used
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", result)
    import torch

    from .data import normalize

    pick = torch.linspace(0, len(data) - 1, min(32, len(data))).round().long()
    x = normalize(data.images[pick].to(device))  # strided: every class of sorted data
    save_recon_grid(x, model(x).recon, out / "recon.png")
    written = [out / "eval.json", out / "recon.png"]
    if model.quantizer.code_groups is not None:  # multi-scale: 1 scale .. all, per image
        written.append(out / "progressive.png")
        save_progressive_grid(x[:8], progressive_reconstructions(model, x[:8]), written[-1])
    print(dump_json(result, indent=2))
    print(f"wrote {', '.join(map(str, written[:-1]))} and {written[-1]}")
    return 0


def _eval_suite(args: argparse.Namespace):
    """The figures beyond PSNR that ``vqkit eval`` was asked for; every network from a
    file the user named (nothing is downloaded)."""
    from .evaluation.suite import QualitySuite

    extractors = {}
    if args.inception_weights:
        from .evaluation.features import InceptionFeatures

        extractors["rfid"] = InceptionFeatures(args.inception_weights)
    if args.features:
        from .evaluation.feature_net import VqkitFeatures

        extractors["fd_vqkit_features"] = VqkitFeatures(args.features)
    lpips = None
    if args.lpips_weights:
        from .losses.perceptual import LPIPS

        lpips = LPIPS(args.lpips_weights)
    if args.limit is not None and args.limit < 2:
        raise UserError(f"--limit must be >= 2; got {args.limit}")
    return QualitySuite(lpips=lpips, extractors=extractors, kid_subset_size=args.kid_subset_size)


def _output_names(inputs: list[Path], out: Path, suffix: str) -> list[Path]:
    """One output per input, mirroring the inputs' paths (see ``mirror_paths``)."""
    from .storage.fileio import mirror_paths

    return mirror_paths(inputs, out, suffix)


def _encode(args: argparse.Namespace) -> int:
    from .data import normalize, read_image
    from .models.codes_io import model_identity, save_codes
    from .storage.fileio import refuse_existing

    model, _, device = _load(args)
    if _is_codec(model):
        from .training.audio_commands import run_encode

        return run_encode(args, model)
    _image_only(args)
    identity = model_identity(model)  # recorded beside every map (NAME.npy.json)
    inputs = [Path(p) for p in args.images]
    names = _output_names(inputs, Path(args.out or "."), ".npy")  # checked before writing
    refuse_existing(names, args.overwrite)
    for p, name in zip(inputs, names, strict=True):
        image = read_image(p, model.config.in_channels, model.config.image_size)
        x = normalize(image[None]).to(device)
        idx = model.encode(x)[0].cpu().numpy()
        save_codes(name, idx, identity)
        print(f"{p} -> {name} {idx.shape}")
    return 0


def _decode(args: argparse.Namespace) -> int:
    import torch

    from .evaluation.plots import save_images
    from .models.codes_io import model_identity, read_codes
    from .storage.fileio import decoded_names, refuse_existing

    model, _, device = _load(args)
    if _is_codec(model):
        from .training.audio_commands import run_decode

        return run_decode(args, model)
    _image_only(args)
    identity = model_identity(model)
    out = Path(args.out or ".")
    inputs = [Path(p) for p in args.codes]
    stems = _output_names(inputs, out, "")
    # all checked (tokenizer identity, shape, range) before anything is written
    maps = [read_codes(p, identity, unchecked=args.unchecked) for p in inputs]
    if args.scales is not None:  # the first N scales' codes (a multi-scale tokenizer's)
        maps = [model.quantizer.code_prefix(torch.from_numpy(m), args.scales).numpy() for m in maps]
    outputs = [decoded_names(stem, len(idx)) for stem, idx in zip(stems, maps, strict=True)]
    refuse_existing([n for names in outputs for n in names], args.overwrite)
    for p, stem, idx, names in zip(inputs, stems, maps, outputs, strict=True):
        images = model.decode(torch.from_numpy(idx).to(device))
        stem.parent.mkdir(parents=True, exist_ok=True)
        save_images(images, names)
        print(f"{p} -> {', '.join(map(str, names))}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .prior.export import TOKENIZER_DIR, export_prior_run, is_prior_run, tokenizer_run_of
    from .training.export import (
        check_export_out,
        export_codec_run,
        export_tokenizer_run,
        is_codec_run,
    )

    out = Path(args.out)
    if is_prior_run(args.run):
        if args.weights:
            raise UserError("--weights is for tokenizer runs; a prior exports checkpoints/last.pt")
        runs = [args.run, *tokenizer_run_of(args.run, args.tokenizer)]
        check_export_out(out, runs, overwrite=args.overwrite, subdirs=("", TOKENIZER_DIR))
        export_prior_run(args.run, out, tokenizer=args.tokenizer)
        what = "prior (and its tokenizer in tokenizer/)"
    else:
        if args.tokenizer:
            raise UserError(f"--tokenizer is for prior runs; {args.run} is not one")
        check_export_out(out, [args.run], overwrite=args.overwrite)
        if is_codec_run(args.run):
            export_codec_run(args.run, out, weights=args.weights)
            what = "audio codec (AudioCodec.from_pretrained)"
        else:
            export_tokenizer_run(args.run, out, weights=args.weights)
            what = "tokenizer"
    print(f"{what} written to {out}: config.json model.safetensors README.md")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="a vqkit train or vqkit prior run -> a pretrained directory (from_pretrained)",
        description="Write a run's model as config.json, model.safetensors and a README.md "
        "model card with the run's measured figures (a speech codec's: the bitrate per stage "
        "count); load it with VQVAE.from_pretrained(DIR), AudioCodec.from_pretrained(DIR) or "
        "Prior.from_pretrained(DIR).",
    )
    p.add_argument("run", metavar="RUN", help="a vqkit train or vqkit prior run directory")
    p.add_argument("--out", required=True, metavar="DIR", help="the pretrained directory")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the files of an existing export"
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="NAME",
        help="tokenizer or codec run: the weights inside RUN (default: model.safetensors, a "
        "codec run's codec/, else checkpoints/best.pt, else checkpoints/last.pt)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="RUN_DIR",
        help="prior run: the tokenizer run, if it moved (its weights must be the same file)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from .training.cli import add_train_arguments

    add_train_arguments(sub)
    for name, helptext in (
        ("eval", "evaluate a checkpoint on a split (a speech codec: per stage count)"),
        ("encode", "images -> index maps (.npy); WAV files -> a codec's codes (.npy)"),
        ("decode", "index maps (.npy) -> PNG images; a codec's codes -> WAV"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "checkpoint",
            help="a .pt checkpoint, a .safetensors export, a pretrained directory or a run "
            "directory (an image tokenizer or an audio codec)",
        )
        p.add_argument("--device", default="auto")
        p.add_argument(
            "--out",
            default=None,
            help="output directory (eval: RUN/eval-SPLIT beside the checkpoint's run; "
            "encode/decode: the current directory; decode of one codes file: may be X.wav)",
        )
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace outputs that exist already",
        )
        if name != "eval":
            p.add_argument(
                "--stages",
                type=int,
                default=None,
                help="audio codecs: encode with / decode from the first N residual stages "
                "(default: all; quantizer dropout makes fewer valid)",
            )
        if name == "eval":
            p.add_argument(
                "--data",
                default=None,
                help="dataset (default: the one the model records it was trained on)",
            )
            p.add_argument(
                "--split",
                default=None,
                help="split (default: the run's evaluation split; with --data: test)",
            )
            p.add_argument("--cache-dir", default=None)
            p.add_argument(
                "--limit", type=int, default=None, help="an evenly strided subset (images, clips)"
            )
            p.add_argument(
                "--inception-weights",
                default=None,
                help="FID's InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth): rFID, KID",
            )
            p.add_argument(
                "--features",
                default=None,
                help="a vqkit features network (vqkit features --out DIR): FD, KID in its "
                "space (not comparable with papers' rFID)",
            )
            p.add_argument(
                "--lpips-weights",
                default=None,
                help="torchvision's VGG16 weights (vgg16-397923af.pth): LPIPS",
            )
            p.add_argument("--kid-subset-size", type=int, default=1000)
        elif name == "encode":
            p.add_argument(
                "images",
                nargs="+",
                metavar="INPUTS",
                help="PNG/JPEG files (an image tokenizer), or WAV files and folders of them "
                "(an audio codec)",
            )
        else:
            p.add_argument("codes", nargs="+", help=".npy index maps or codes from vqkit encode")
            p.add_argument(
                "--unchecked",
                action="store_true",
                help="decode raw arrays: skip the tokenizer identity (NAME.npy.json) and "
                "grid-size checks (see vqkit.models.codes_io)",
            )
            p.add_argument(
                "--scales",
                type=int,
                default=None,
                help="multi-scale tokenizers: reconstruct from the first N scales only",
            )
    from .data.pack import add_pack_arguments
    from .prior.cli import add_prior_arguments, add_sample_arguments

    add_pack_arguments(sub.add_parser("pack", help="write WebDataset shards from any source"))
    from .evaluation.feature_net import add_features_arguments

    add_features_arguments(
        sub.add_parser("features", help="train vqkit's own feature network for FD/KID")
    )
    add_prior_arguments(
        sub.add_parser(
            "prior",
            help="train a prior (autoregressive, masked or next-scale) on a tokenizer's codes",
        )
    )
    add_sample_arguments(
        sub.add_parser("sample", help="sample code maps from a prior and decode them")
    )
    from .compress.cli import add_compress_arguments, add_decompress_arguments

    add_compress_arguments(
        sub.add_parser("compress", help="images (or --codes maps) -> files coded with a prior")
    )
    add_decompress_arguments(
        sub.add_parser("decompress", help="files of vqkit compress -> PNG images (or .npy)")
    )
    _add_export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .compress.cli import run_compress, run_decompress
    from .data.pack import run_pack
    from .evaluation.feature_net import run_features
    from .prior.cli import run_prior, run_sample
    from .training.cli import run_train

    handler = {
        "train": run_train,
        "eval": _eval,
        "encode": _encode,
        "decode": _decode,
        "pack": run_pack,
        "features": run_features,
        "prior": run_prior,
        "sample": run_sample,
        "compress": run_compress,
        "decompress": run_decompress,
        "export": _export,
    }
    import torch

    from .errors import report_error

    try:
        if args.command in ("train", "pack", "prior", "features"):
            return handler[args.command](args)
        with torch.no_grad():  # scoped: in-process callers keep their grad mode
            return handler[args.command](args)
    except KeyboardInterrupt:  # the trainers saved a checkpoint first
        return 130
    except Exception as e:  # one line for bad input; a traceback for a bug (vqkit.errors)
        return report_error(args.command, e)


if __name__ == "__main__":
    sys.exit(main())
