"""Editing with a next-scale prior: ``vqkit sample PRIOR --edit IMAGE --keep-scales N``.

The image is encoded by the prior's multi-scale tokenizer; its first N scales (the
coarse layout: colours, masses, composition) are kept and the finer scales are drawn
anew by the prior (:func:`vqkit.prior.nextscale.sample` with ``keep_scales=N``), steered
by ``--class`` (default for an edit: the null class) and the usual sampling flags. So
each edit is a new image with the same coarse structure and new detail: S - N passes.

Writes into ``--out`` what a region edit writes (:mod:`vqkit.prior.editing`):
``original.png``, ``reconstruction.png``, ``edit_NNNN.png`` / ``.npy`` (with the tokenizer
identity), ``grid.png`` (original, reconstruction, the kept scales alone decoded, then
the edits) and ``edit.json`` (what was asked, ``written``, ``complete``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

__all__ = ["add_scale_edit_arguments", "check_scale_edit", "run_scale_edit"]


def add_scale_edit_arguments(parser: argparse.ArgumentParser) -> None:
    """``--keep-scales``, the next-scale prior's edit flag of ``vqkit sample``."""
    group = parser.add_argument_group("next-scale prior: editing")
    group.add_argument(
        "--keep-scales",
        type=int,
        default=None,
        metavar="N",
        help="with --edit IMAGE: keep the image's first N scales, draw the finer ones",
    )


def check_scale_edit(args: argparse.Namespace, model: Any) -> None:
    """One line for ``--keep-scales`` without ``--edit``, on another kind of prior, or
    out of range, and for ``--edit`` on a next-scale prior without it."""
    keep = getattr(args, "keep_scales", None)
    next_scale = model.config.kind == "next-scale"
    if keep is not None and not next_scale:
        raise UserError(
            f"--keep-scales: a next-scale prior's flag; this prior is {model.config.kind}"
        )
    if not next_scale:
        return
    if keep is None and args.edit is not None:
        raise UserError("--edit with a next-scale prior needs --keep-scales N (the scales kept)")
    if keep is not None and args.edit is None:
        raise UserError("--keep-scales goes with --edit IMAGE")
    scales = len(model.config.scales)
    if keep is not None and not 1 <= keep < scales:
        raise UserError(
            f"--keep-scales must lie in [1, {scales - 1}] (the prior has {scales} scales; "
            f"keeping all would redraw nothing); got {keep}"
        )


@torch.no_grad()
def run_scale_edit(
    args: argparse.Namespace,
    model: Any,
    tok: Any,
    opts: Any,
    labels: Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]],
    generator: torch.Generator,
) -> int:
    """``--num`` edits of ``--edit IMAGE`` that keep its first ``--keep-scales`` scales,
    drawn, decoded and written ``--batch-size`` at a time (as
    :func:`vqkit.prior.editing.write_edits`); ``labels(start, n)``: (the class ids
    recorded, the classes steering the prior or None for the null class)."""
    from ..data import normalize, read_image
    from ..evaluation.plots import save_images
    from ..models.codes_io import model_identity
    from .editing import write_edits
    from .sample_writer import SampleWriter

    cfg = tok.model.config
    device = model.tok_emb.weight.device
    keep = int(args.keep_scales)
    image = read_image(args.edit, cfg.in_channels, cfg.image_size)
    x = normalize(image[None]).to(device)
    codes = tok.model.encode(x)
    recon = tok.model.decode(codes)
    coarse = tok.model.decode(codes, num_scales=keep)
    kept = sum(s * s for s in model.config.scales[:keep])
    meta = {
        "prior": str(Path(args.prior).resolve()),
        "image": str(Path(args.edit).resolve()),
        "keep_scales": keep,
        "scales": list(model.config.scales),
        "codes_kept": kept,
        "codes_regenerated": model.seq_len - kept,
        "seed": args.seed,
        "batch_size": args.batch_size,  # one generator for all batches
        "options": opts.to_dict(),
        "class": args.class_id,
        "tokenizer_sha256": tok.sha256,
    }
    writer = SampleWriter(  # refuses a non-empty --out before anything is written
        args.out,
        args.num,
        meta,
        model_identity(tok.model),
        overwrite=getattr(args, "overwrite", False),
        prefix="edit",
        record="edit.json",
        head=torch.cat((x, recon, coarse)),
    )
    out = Path(args.out)
    save_images(torch.cat((x, recon)), [out / "original.png", out / "reconstruction.png"])
    write_edits(
        writer, model, tok, codes, opts, labels, generator, args.num, args.batch_size,
        lambda n: {"keep_scales": keep},
    )  # fmt: skip
    print(
        f"{args.num} edits of {args.edit} (the first {keep} scales kept, "
        f"{meta['codes_regenerated']} of {model.seq_len} codes drawn) -> "
        f"{out}/grid.png, edit_*.png, edit_*.npy"
    )
    return 0
