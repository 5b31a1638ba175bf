"""``vqkit`` command line: train, eval, encode, decode.

vqkit train [--data PATH] [--steps N] [--out DIR] ...   train a VQ-VAE
vqkit eval CHECKPOINT [--data PATH] [--split test]       MSE, NMSE, PSNR, usage
vqkit encode CHECKPOINT IMAGES... --out DIR              images -> index maps (.npy)
vqkit decode CHECKPOINT CODES.npy... --out DIR           index maps -> PNG images
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .config import PRESETS, TrainConfig, TrainOptions
    from .models.vqvae import QUANTIZER_GROUPS, ModelOptions
    from .options import add_arguments, compose

    p = sub.add_parser(
        "train",
        help="train a VQ-VAE (default: the built-in dataset)",
        description="Train a VQ-VAE. Every option below is declared once (vqkit.config, "
        "vqkit.models.vqvae, and each quantizer module); presets: " + ", ".join(PRESETS),
    )
    p.add_argument("--config", help="JSON file of options; command-line flags override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing --out")
    add_arguments(p.add_argument_group("training"), TrainOptions, aliases={"out_dir": ["--out"]})
    add_arguments(p.add_argument_group("model"), ModelOptions)
    # every quantizer kind's options, each once (shared ones are one declaration)
    quantizers = compose("QuantizerFlags", QUANTIZER_GROUPS)
    add_arguments(
        p.add_argument_group("quantizer (options of the other kinds are errors)"), quantizers
    )
    p.set_defaults(_config_class=TrainConfig)


def _train(args: argparse.Namespace) -> int:
    from .options import option_fields
    from .train import TrainConfig, Trainer

    overrides = {
        f.name: getattr(args, f.name)
        for f in option_fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    cfg = (
        TrainConfig.from_file(args.config, **overrides)
        if args.config
        else TrainConfig.build(**overrides)
    )
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        return 130
    if not trainer.is_main:  # torchrun: rank 0 reports
        return 0
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("step", "nmse", "psnr", "perplexity", "batch_perplexity", "codes_used")
            },
            indent=2,
        )
    )
    print(
        f"run written to {cfg.out_dir}: recon.png curves.png usage.png eval.json "
        "metrics.jsonl checkpoints/"
    )
    return 0


def _load(args: argparse.Namespace):
    from .checkpoint import load_checkpoint
    from .config import resolve_device
    from .models import load_model

    device = resolve_device(args.device)
    model = load_model(args.checkpoint, map_location=device).to(device).eval()
    meta: dict[str, Any] = {}
    if str(args.checkpoint).endswith(".pt"):
        ckpt = load_checkpoint(args.checkpoint, map_location="cpu")
        meta = {
            "data_variance": ckpt.get("data_variance"),
            "train_config": ckpt.get("train_config", {}),
        }
    return model, meta, device


def _eval(args: argparse.Namespace) -> int:
    from .data import data_variance, load_dataset
    from .evaluate import evaluate
    from .plots import save_recon_grid

    model, meta, device = _load(args)
    source = args.data if args.data is not None else meta.get("train_config", {}).get("data")
    data = load_dataset(
        source,
        args.split,
        image_size=model.config.image_size,
        channels=model.config.in_channels,
        cache_dir=args.cache_dir,
    )
    var = meta.get("data_variance") or data_variance(data)
    result = evaluate(model, data, data_variance=var, device=device, progress=True)
    result.pop("counts")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    import torch

    from .data import normalize

    pick = torch.linspace(0, len(data) - 1, min(32, len(data))).round().long()
    x = normalize(data.images[pick].to(device))  # strided: every class of sorted data
    save_recon_grid(x, model(x).recon, out / "recon.png")
    print(json.dumps(result, indent=2))
    print(f"wrote {out / 'eval.json'} and {out / 'recon.png'}")
    return 0


def _read_image(path: Path, channels: int, size: int):
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from .data import normalize
    from .data._core import resize_center_crop

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            im = resize_center_crop(im, size)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    t = torch.from_numpy(arr.copy())
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    return normalize(t[None])


def _encode(args: argparse.Namespace) -> int:
    import numpy as np

    model, _, device = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in map(Path, args.images):
        x = _read_image(p, model.config.in_channels, model.config.image_size).to(device)
        idx = model.encode(x)[0].cpu().numpy().astype(np.int64)
        np.save(out / f"{p.stem}.npy", idx)
        print(f"{p} -> {out / (p.stem + '.npy')} {idx.shape}")
    return 0


def _decode(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .plots import save_images

    model, _, device = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in map(Path, args.codes):
        try:
            idx = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read index map {p}: {e}") from e
        nd = model.index_dims  # 3: (B, h, w); 4: (B, h, w, Q) for rvq
        if idx.ndim == nd - 1:
            idx = idx[None]
        if idx.ndim != nd or not np.issubdtype(idx.dtype, np.integer):
            want = "(h, w, Q) or (B, h, w, Q)" if nd == 4 else "(h, w) or (B, h, w)"
            raise ValueError(
                f"{p}: expected an integer index map {want}; got {idx.dtype} {idx.shape}"
            )
        images = model.decode(torch.from_numpy(idx.astype(np.int64)).to(device))
        names = (
            [out / f"{p.stem}.png"]
            if len(images) == 1
            else [out / f"{p.stem}_{i}.png" for i in range(len(images))]
        )
        save_images(images, names)
        print(f"{p} -> {', '.join(map(str, names))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    for name, helptext in (
        ("eval", "evaluate a checkpoint on a split"),
        ("encode", "images -> index maps (.npy)"),
        ("decode", "index maps (.npy) -> PNG images"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("checkpoint", help="a .pt checkpoint or .safetensors export")
        p.add_argument("--device", default="auto")
        p.add_argument("--out", default=".", help="output directory")
        if name == "eval":
            p.add_argument("--data", default=None, help="dataset (default: the training one)")
            p.add_argument("--split", default="test")
            p.add_argument("--cache-dir", default=None)
        elif name == "encode":
            p.add_argument("images", nargs="+", help="PNG/JPEG files")
        else:
            p.add_argument("codes", nargs="+", help=".npy index maps from vqkit encode")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"train": _train, "eval": _eval, "encode": _encode, "decode": _decode}
    import torch

    from .checkpoint import CheckpointError

    try:
        if args.command == "train":
            return handler[args.command](args)
        with torch.no_grad():  # scoped: in-process callers keep their grad mode
            return handler[args.command](args)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        print(f"vqkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
