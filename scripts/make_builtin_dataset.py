"""Regenerate vqkit's built-in dataset (src/vqkit/assets/*-idx?-ubyte.gz).

The built-in set is the first 5000 training and the first 1000 test images of
Fashion-MNIST (MIT licence, Zalando SE), with their labels, in the original idx format.
Source: the Debian package dataset-fashion-mnist (``apt-get install dataset-fashion-mnist``),
which installs the official files under /usr/share/datasets/fashion-mnist/.

The output is byte-for-byte reproducible: the idx header gets the new count, the data is the
leading slice of the original, and gzip is written with mtime=0 and no file name.

    python scripts/make_builtin_dataset.py [--src DIR] [--out DIR] [--train N] [--test N]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = {"images": 16, "labels": 8}  # idx3 (magic + 3 dims) and idx1 (magic + 1 dim)
ITEM_BYTES = {"images": 28 * 28, "labels": 1}


def subset(src: Path, out: Path, n: int) -> str:
    kind = "images" if "images" in src.name else "labels"
    raw = gzip.decompress(src.read_bytes())
    header = bytearray(raw[: HEADER[kind]])
    total = int.from_bytes(header[4:8], "big")
    if n > total:
        raise SystemExit(f"{src} holds {total} items, cannot take {n}")
    header[4:8] = n.to_bytes(4, "big")
    body = raw[HEADER[kind] : HEADER[kind] + n * ITEM_BYTES[kind]]
    data = gzip.compress(bytes(header) + body, compresslevel=9, mtime=0)
    out.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "vqkit" / "assets")
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--test", type=int, default=1000)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", args.train), ("t10k", args.test)):
        for kind, dims in (("images", 3), ("labels", 1)):
            name = f"{prefix}-{kind}-idx{dims}-ubyte.gz"
            digest = subset(args.src / name, args.out / name, n)
            size = (args.out / name).stat().st_size
            print(f"{args.out / name}: {n} items, {size} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
