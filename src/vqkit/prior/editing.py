"""Editing with a masked prior: ``vqkit sample PRIOR --edit IMAGE --region x0,y0,x1,y1``,
and the masked prior's flags of ``vqkit sample``.

A region is a pixel box ``[x0, x1) x [y0, y1)`` of the tokenizer's input image (after
its resize and centre crop), x to the right, y down; several ``--region`` boxes are
joined. Code position (i, j) of an (h, w) map covers the pixels ``[i H / h, (i + 1) H /
h) x [j W / w, (j + 1) W / w)``; a position is regenerated when its pixels meet a box
(``--outside``: when they meet none). For residual / grouped codes (h, w, Q) all Q
codes of a regenerated position are hidden. The image is encoded, the hidden codes are
decoded by the masked prior in S passes (:func:`vqkit.prior.masked.decode`) with every
other code kept, and ``--class`` steers the new content (default for an edit: the null
class, i.e. the unconditional model, the image's own content steering it).

Writes into ``--out``: ``original.png`` (the image as the tokenizer sees it),
``reconstruction.png`` (its codes decoded, nothing regenerated), ``edit_NNNN.png`` and
``edit_NNNN.npy`` (index maps, with the tokenizer identity beside them as
:mod:`vqkit.models.codes_io` writes it), ``grid.png`` (original, reconstruction, the region
greyed out, then the first 64 edits) and ``edit.json`` (what was asked, and how far it
got: ``written``, ``complete``), batch by batch as plain sampling writes its folder
(:mod:`vqkit.prior.sample_writer`); a folder that holds anything is refused unless
``--overwrite``, which removes only the files ``vqkit sample`` writes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..options import add_arguments, option_fields
from .masked import MaskedSampleOptions, reveal_counts

__all__ = [
    "add_masked_sample_arguments",
    "masked_sample_options",
    "parse_region",
    "region_mask",
    "run_edit",
    "write_edits",
]


def parse_region(spec: str) -> tuple[int, int, int, int]:
    """``"x0,y0,x1,y1"`` -> four ints; ValueError (one line) otherwise."""
    parts = spec.split(",")
    try:
        box = tuple(int(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4:
        raise UserError(f"--region must be x0,y0,x1,y1 (four integer pixels); got {spec!r}")
    return box  # type: ignore[return-value]


def region_mask(
    regions: list[tuple[int, int, int, int]],
    image_hw: tuple[int, int],
    code_shape: tuple[int, ...] | list[int],
    outside: bool = False,
) -> torch.Tensor:
    """Bool (*code_shape), True = regenerate: the positions whose pixels meet a box (or
    meet none, ``outside``); see the module docstring. ValueError for a box that is
    empty or leaves the image, or a mask that regenerates nothing."""
    height, width = image_hw
    if len(code_shape) < 2:  # no one grid to place a box on
        raise UserError(
            f"--edit --region takes codes on one (h, w) grid; these are a multi-scale "
            f"tokenizer's ({', '.join(map(str, code_shape))}) sequence"
        )
    h, w = int(code_shape[0]), int(code_shape[1])
    if not regions:
        raise UserError("--edit needs at least one --region x0,y0,x1,y1")
    rows = torch.arange(h, dtype=torch.float64)
    cols = torch.arange(w, dtype=torch.float64)
    y_lo, y_hi = rows * height / h, (rows + 1) * height / h
    x_lo, x_hi = cols * width / w, (cols + 1) * width / w
    hit = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in regions:
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise UserError(
                f"--region {x0},{y0},{x1},{y1} is not a box inside the {width} x {height} "
                "image (0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)"
            )
        rows_in = (y_lo < y1) & (y_hi > y0)
        cols_in = (x_lo < x1) & (x_hi > x0)
        hit |= rows_in[:, None] & cols_in[None, :]
    mask = ~hit if outside else hit
    if not bool(mask.any()):
        raise UserError("the regions leave no code position to regenerate (--outside?)")
    if len(code_shape) == 3:
        mask = mask[..., None].expand(h, w, int(code_shape[2]))
    return mask.contiguous()


def add_masked_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """The masked prior's flags of ``vqkit sample``: its decoding options
    (:class:`~vqkit.prior.masked.MaskedSampleOptions`) and ``--edit``, ``--region``,
    ``--outside``."""
    group = parser.add_argument_group("masked prior: decoding and editing")
    add_arguments(group, MaskedSampleOptions)
    # the old name of --decode-steps (vqkit prior --steps is optimizer steps): still read,
    # with a note; not in --help
    group.add_argument(
        "--steps", dest="legacy_steps", type=int, default=None, help=argparse.SUPPRESS
    )
    group.add_argument(
        "--edit", metavar="IMAGE", default=None, help="regenerate a region of this image"
    )
    group.add_argument(
        "--region",
        action="append",
        default=None,
        metavar="x0,y0,x1,y1",
        help="pixel box to regenerate (with --edit; repeat for several boxes)",
    )
    group.add_argument(
        "--outside",
        action="store_true",
        help="regenerate everything but the regions (outpainting)",
    )


def masked_sample_options(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """The keyword arguments a masked prior's ``sample`` takes from the flags
    (``{"masked": MaskedSampleOptions}``, ``decode_steps`` made explicit for a new
    sample; ``{}`` for an autoregressive prior); one-line ValueError for a masked-prior
    flag on an autoregressive prior. ``--steps``, the old name of ``--decode-steps``,
    is read with a one-line note on stderr."""
    given = {
        f.name: getattr(args, f.name)
        for f in option_fields(MaskedSampleOptions)
        if getattr(args, f.name, None) is not None
    }
    flags = ["--" + k.replace("_", "-") for k in given]
    legacy = getattr(args, "legacy_steps", None)
    if legacy is not None:
        print("note: vqkit sample --steps is now --decode-steps", file=sys.stderr)
        if given.get("decode_steps", legacy) != legacy:
            raise UserError(
                f"--steps {legacy} and --decode-steps {given['decode_steps']}: --steps is the "
                "old name of --decode-steps; give --decode-steps only"
            )
        flags += [] if "decode_steps" in given else ["--steps"]
        given["decode_steps"] = legacy
    mopts = MaskedSampleOptions.from_dict(given, where="sample options")
    # --edit is also the next-scale prior's (with --keep-scales: vqkit.prior.scale_editing)
    edit = args.edit if model.config.kind != "next-scale" else None
    flags += [f for f, v in (("--edit", edit), ("--region", args.region)) if v]
    flags += ["--outside"] if args.outside else []
    if not model.config.masked:
        if flags:
            raise UserError(
                f"{', '.join(flags)}: a masked prior's flag; this prior is {model.config.kind} "
                "(train one with vqkit prior --kind masked)"
            )
        return {}
    if args.edit is None and (args.region or args.outside):
        raise UserError("--region and --outside go with --edit IMAGE")
    if args.edit is None:  # every code is decoded: the passes are known before anything is written
        mopts = mopts.resolved(model.seq_len)
        reveal_counts(model.seq_len, mopts.decode_steps, mopts.schedule)
    return {"masked": mopts}


@torch.no_grad()
def run_edit(
    args: argparse.Namespace,
    model: Any,
    tok: Any,
    opts: Any,
    masked: dict[str, Any],
    labels: Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]],
    generator: torch.Generator,
) -> int:
    """``vqkit sample PRIOR --edit IMAGE --region ...``: ``--num`` edits of the image
    (see the module docstring), drawn, decoded and written ``--batch-size`` at a time
    (:class:`~vqkit.prior.sample_writer.SampleWriter`: memory holds one batch, whatever
    ``--num`` is; the same draws as one call, which decodes batch after batch from the
    same generator). ``labels(start, n)``: (the class ids recorded, the classes steering
    the prior or None for the null class) of edits start..start+n-1."""
    from ..data import normalize, read_image
    from ..evaluation.plots import save_images
    from ..models.codes_io import model_identity
    from .sample_writer import SampleWriter

    regions = [parse_region(r) for r in args.region or []]
    cfg = tok.model.config
    size = (cfg.image_size, cfg.image_size)
    hidden = region_mask(regions, size, model.code_shape, args.outside)
    device = model.tok_emb.weight.device
    image = read_image(args.edit, cfg.in_channels, cfg.image_size)
    x = normalize(image[None]).to(device)
    codes = tok.model.encode(x)
    num, bs = args.num, args.batch_size
    # the passes for this region's codes, made explicit (edit.json records them)
    mopts = masked["masked"].resolved(int(hidden.sum()))
    reveal_counts(int(hidden.sum()), mopts.decode_steps, mopts.schedule)  # before any file
    masked = {**masked, "masked": mopts}
    recon = tok.model.decode(codes)
    pos = hidden if hidden.dim() == 2 else hidden[..., 0]
    f_h, f_w = cfg.image_size // pos.shape[0], cfg.image_size // pos.shape[1]
    pixels = pos.repeat_interleave(f_h, 0).repeat_interleave(f_w, 1).to(device)
    greyed = torch.where(pixels, torch.zeros_like(x), x)
    meta = {
        "prior": str(Path(args.prior).resolve()),
        "image": str(Path(args.edit).resolve()),
        "regions": [list(r) for r in regions],
        "outside": bool(args.outside),
        "codes_regenerated": int(hidden.sum()),
        "codes": int(hidden.numel()),
        "seed": args.seed,
        # the batches share one generator: another batch size draws other edits
        "batch_size": bs,
        "options": opts.to_dict(),
        "masked_options": masked["masked"].to_dict(),
        "class": args.class_id,
        "tokenizer_sha256": tok.sha256,
    }
    writer = SampleWriter(  # refuses a non-empty --out before anything is written
        args.out,
        num,
        meta,
        model_identity(tok.model),  # beside every map, as vqkit sample writes them
        overwrite=getattr(args, "overwrite", False),
        prefix="edit",
        record="edit.json",
        head=torch.cat((x, recon, greyed)),
    )
    out = Path(args.out)
    save_images(torch.cat((x, recon)), [out / "original.png", out / "reconstruction.png"])
    hidden = hidden.to(device)[None]
    write_edits(
        writer, model, tok, codes, opts, labels, generator, num, bs,
        lambda n: {"hidden": hidden.expand(n, *hidden.shape[1:]), **masked},
    )  # fmt: skip
    print(
        f"{num} edits of {args.edit} ({meta['codes_regenerated']} of {meta['codes']} codes "
        f"regenerated) -> {out}/grid.png, edit_*.png, edit_*.npy"
    )
    return 0


def write_edits(
    writer: Any,
    model: Any,
    tok: Any,
    codes: torch.Tensor,
    opts: Any,
    labels: Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]],
    generator: torch.Generator,
    num: int,
    batch_size: int,
    kind_kwargs: Callable[[int], dict[str, Any]],
) -> None:
    """The batch loop of every edit (a masked prior's regions, a next-scale prior's
    kept scales): ``num`` edits of the image's ``codes`` (1, ...), ``batch_size`` at a
    time, drawn by ``model.sample`` with ``kind_kwargs(n)`` (what the kind keeps),
    decoded by the tokenizer and written by ``writer``, which is then closed."""
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        recorded, steer = labels(start, n)
        edited = model.sample(
            n,
            opts,
            labels=steer,
            generator=generator,
            batch_size=n,
            codes=codes.expand(n, *codes.shape[1:]),
            **kind_kwargs(n),
        )
        writer.add(tok.model.decode(edited), edited, recorded)
    writer.close()
