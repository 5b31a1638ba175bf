"""The output folder of ``vqkit sample`` (and of ``vqkit sample --edit``): written batch by
batch, never a mix of two calls.

Layout of ``--out DIR``::

    sample_0000.png, sample_0000.npy, sample_0000.npy.json, ...   one image, its index
                                        map and the map's tokenizer identity
                                        (:mod:`vqkit.models.codes_io`) per sample
    grid.png                            the first ``GRID`` samples (64), rewritten after
                                        each batch until it holds them
    samples.json                        what was asked (prior, seed, device, batch size,
                                        sampling options, a masked prior's decoding
                                        options, class): enough to draw the same maps
                                        again; and how far it got: ``written``,
                                        ``complete``

``vqkit sample --edit`` (:mod:`vqkit.prior.editing`) writes ``edit_NNNN.*``, ``edit.json``
in place of ``samples.json``, ``original.png`` and ``reconstruction.png``, and its grid
starts with ``head`` (the original, its reconstruction, the region greyed out).

Rules:

* a folder that holds anything is refused unless ``overwrite``; ``overwrite`` removes only
  the files sample writes, in either mode (the names above, and temp files of killed
  writers), so the folder never mixes two calls' files under one record;
* samples are written as each batch is decoded, every file atomically: memory holds one
  batch and the grid's first images, whatever ``--num`` is; ``samples.json`` is rewritten
  after each batch, so a killed run leaves ``written`` complete, usable samples (and
  ``"complete": false``);
* ``labels`` (the class of each sample) is listed when ``num <= LABELS_LISTED``; beyond,
  ``class`` and ``classes`` give it (sample i: the class asked for, or ``i mod C``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..evaluation.plots import save_images
from ..models.codes_io import save_codes
from ..storage.fileio import clean_stale_temps, write_json
from .report import save_grid

__all__ = ["GRID", "LABELS_LISTED", "SampleWriter"]

GRID = 64
LABELS_LISTED = 4096  # samples.json is rewritten per batch: keep that cheap
# every file vqkit sample writes, plain or --edit: --overwrite removes these and no other
_OWN = re.compile(
    r"(sample|edit)_\d+\.(png|npy|npy\.json)|grid\.png|samples\.json|edit\.json"
    r"|original\.png|reconstruction\.png"
)


class SampleWriter:
    """Writes one ``vqkit sample`` call's files into ``out`` (see the module docstring).

    ``meta``: what the record (``record``: samples.json) holds besides the progress;
    ``identity``: the tokenizer's (:func:`vqkit.models.codes_io.model_identity`), written
    beside every index map; ``prefix``: the files' names (``sample``, ``edit``); ``head``:
    images (N, C, H, W) the grid shows before the samples."""

    def __init__(
        self,
        out: str | os.PathLike[str],
        num: int,
        meta: dict[str, Any],
        identity: dict[str, Any],
        *,
        overwrite: bool = False,
        prefix: str = "sample",
        record: str = "samples.json",
        head: torch.Tensor | None = None,
    ) -> None:
        self.out, self.num, self.identity = Path(out), num, identity
        self.prefix, self.record = prefix, record
        self._head = [] if head is None else [head.cpu()]
        self.meta = {**meta, "num": num}
        self.width = max(4, len(str(num - 1)))
        self.written = 0
        self._grid: list[torch.Tensor] = []
        self._grid_done = False
        self._labels: list[int] | None = [] if num <= LABELS_LISTED else None
        self._prepare(overwrite)
        self._progress(False)

    def _prepare(self, overwrite: bool) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder; give a folder for the samples")
        present = sorted(os.listdir(out)) if out.is_dir() else []
        if present and not overwrite:
            listed = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
            raise FileExistsError(
                f"{out} is not empty ({listed}); pass --overwrite to replace the samples "
                "there, or choose another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out)  # temps of killed writers
        for name in present if overwrite else ():
            path = out / name
            if _OWN.fullmatch(name) and path.is_file():
                path.unlink()

    def _progress(self, complete: bool) -> None:
        extra: dict[str, Any] = {"written": self.written, "complete": complete}
        if self._labels is not None:
            extra["labels"] = self._labels
        write_json(self.out / self.record, {**self.meta, **extra})

    def name(self, i: int) -> str:
        return f"{self.prefix}_{i:0{self.width}d}"

    def add(self, images: torch.Tensor, codes: torch.Tensor, labels: torch.Tensor) -> None:
        """Write the next batch: images (B, C, H, W) in [-0.5, 0.5], codes (B, *code_shape),
        labels (B,); then the grid once it has its images, then the progress."""
        names = [self.name(self.written + i) for i in range(len(images))]
        save_images(images, [self.out / f"{n}.png" for n in names])
        for n, c in zip(names, codes.cpu().numpy(), strict=True):
            save_codes(self.out / f"{n}.npy", c, self.identity)  # what vqkit decode reads
        if not self._grid_done:  # rewritten until it holds its GRID images: a killed
            self._grid.append(images[: GRID - sum(len(g) for g in self._grid)].cpu())
            self._write_grid()  # run still leaves the grid of what it drew
        self.written += len(images)
        if self._labels is not None:
            self._labels += labels.tolist()
        self._progress(self.written >= self.num)

    def _write_grid(self) -> None:
        images = torch.cat(self._grid)
        save_grid(torch.cat([*self._head, images]), self.out / "grid.png")
        if len(images) >= min(GRID, self.num):
            self._grid, self._grid_done = [], True

    def close(self) -> None:
        """Mark the call complete (``samples.json``)."""
        self._progress(self.written >= self.num)
