"""vqkit's own feature space: a small classifier trained on a labelled dataset
(``vqkit features --data ... --out DIR``), used for Fréchet distance and KID where the
FID InceptionV3 weights are not at hand.

Its figures are labelled ``FD (vqkit-features NAME)``: they rank tokenizers evaluated in
the same feature space against each other and are **not comparable with papers' rFID**
(another network, trained on other data). ``DIR/features.safetensors`` holds the weights
and, in its metadata, the network's shape, the dataset, the test accuracy;
``DIR/features.json`` repeats them with the file's sha256, which loading checks.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageData, load_dataset, normalize
from ..errors import UserError
from ..storage.checkpoint import nonfinite_tensors, save_file_atomically
from ..storage.fileio import dump_json, loads_json, refuse_existing, write_json
from ..storage.weights import load_state_strict
from .features import sha256_file

__all__ = [
    "FORMAT",
    "FeatureNet",
    "VqkitFeatures",
    "add_features_arguments",
    "load_feature_net",
    "run_features",
    "save_feature_net",
    "train_feature_net",
]

FORMAT = "vqkit-features-1"
NOT_COMPARABLE = (
    "vqkit's own feature space: compare runs measured with the same file only; "
    "not comparable with papers' rFID"
)


class FeatureNet(nn.Module):
    """Three conv stages (two 3x3 conv + BatchNorm + ReLU, then 2x2 max-pool; widths w,
    2w, 4w), global average pooling -> the ``4w``-d features, a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in (width, 2 * width, 4 * width):
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
                c = w
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)
        self.num_features = c

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images on vqkit's scale [-0.5, 0.5] (B, C, H, W) -> features (B, 4w)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


@torch.no_grad()
def accuracy(net: FeatureNet, data: ImageData, batch_size: int = 256) -> float:
    was = net.training
    net.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        logits = net(normalize(data.images[i : i + batch_size]))
        correct += int((logits.argmax(1) == data.labels[i : i + batch_size]).sum())
    net.train(was)
    return correct / max(1, len(data))


def train_feature_net(
    train: ImageData,
    *,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 2e-3,
    width: int = 32,
    seed: int = 0,
    log_every: int = 0,
) -> FeatureNet:
    """Adam with a cosine-decayed learning rate and random horizontal flips; returns the
    network in eval mode. ValueError when the split has fewer than 2 classes."""
    num_classes = len(train.classes) or int(train.labels.max()) + 1
    if num_classes < 2:
        raise UserError(
            f"{train.source} ({train.split}) has no class labels: vqkit features needs a "
            "labelled dataset (class folders, CIFAR-10, Fashion-MNIST)"
        )
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FeatureNet(train.images.shape[1], num_classes, width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    n = len(train)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        x = normalize(train.images[idx])
        flip = torch.rand(x.shape[0], generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(net(x), train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(
                f"features step {step}/{steps} loss {float(loss.detach()):.4f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    return net.eval()


def save_feature_net(net: FeatureNet, out: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """``out/features.safetensors`` (weights; config and ``meta`` in its metadata) and
    ``out/features.json`` (the same and the weights file's sha256), both atomic."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT,
        "in_channels": net.body[0].in_channels,
        "num_classes": net.head.out_features,
        "width": net.body[0].out_channels,
        **meta,
    }
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    path = out / "features.safetensors"
    save_file_atomically(
        path, lambda tmp: save_file(state, tmp, metadata={"info": json.dumps(info)}), "features"
    )
    write_json(out / "features.json", {**info, "sha256": sha256_file(path)}, indent=2)
    return path


_INFO_INTS = ("in_channels", "num_classes", "width", "image_size")


def _read_sidecar(side: Path) -> dict[str, Any] | None:
    """``features.json`` as a dict; None when absent (the weights file carries the same
    info). UserError naming it when it is there but not a JSON object."""
    if not side.exists():
        return None
    try:
        value = loads_json(side.read_text())
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, or not strict JSON
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(
            f"cannot read {side} ({reason}): remove it or make the network again with "
            "vqkit features"
        ) from None
    if not isinstance(value, dict):
        raise UserError(f"{side} is not a JSON object: remove it or make the network again")
    return value


def _check_info(info: Any, p: Path) -> dict[str, Any]:
    """The metadata's info: a dict in vqkit's format whose sizes are positive ints."""
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{p} is not a vqkit feature network (made by vqkit features)")
    for key in _INFO_INTS:
        v = info.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(
                f"{p}: its metadata's {key} must be a positive int, got {v!r}: the file was "
                "altered; make it again with vqkit features"
            )
    return info


def load_feature_net(path: str | os.PathLike[str]) -> tuple[FeatureNet, dict[str, Any]]:
    """A saved network (its folder or ``features.safetensors``) and its info (with the
    file's sha256). A one-line UserError naming the file for a foreign, truncated or
    altered file (unreadable metadata, a sidecar that is not JSON or does not match,
    missing / unexpected / misshapen tensors, NaN or Inf); FileNotFoundError when absent."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "features.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"feature network {p} not found: make one with vqkit features")
    if not p.is_file():
        raise UserError(f"feature network {p} is not a file: give the folder vqkit features wrote")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("info", "{}")
        state = load_file(str(p))
    except Exception as e:  # truncated or not safetensors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"cannot read feature network {p} (not a safetensors file, or truncated: {first}); "
            "make it again with vqkit features"
        ) from None
    try:
        info = loads_json(raw)
    except ValueError as e:
        raise UserError(
            f"{p}: its metadata's info is not JSON ({e}): the file was altered"
        ) from None
    info = _check_info(info, p)
    digest = sha256_file(p)
    side = p.with_name("features.json")
    recorded = _read_sidecar(side)
    if recorded is not None and recorded.get("sha256") != digest:
        raise UserError(f"{p} does not match the sha256 recorded in {side}: the file changed")
    # the two tensors whose shapes the sizes fix, before a network of those sizes is
    # allocated (metadata claiming a huge width would be an allocator error)
    want = {
        "body.0.weight": (info["width"], info["in_channels"], 3, 3),
        "head.weight": (info["num_classes"], 4 * info["width"]),
    }
    for key, shape in want.items():
        got = tuple(state[key].shape) if key in state else None
        if got != shape:
            raise UserError(
                f"{p}: weights do not match its metadata: {key} "
                f"{'missing' if got is None else got} (metadata: {shape}); the file was altered"
            )
    bad = nonfinite_tensors(state)
    if bad:
        raise UserError(
            f"{p}: non-finite values (NaN or Inf) in {', '.join(bad[:5])}; make the network "
            "again with vqkit features"
        )
    net = FeatureNet(info["in_channels"], info["num_classes"], info["width"])
    load_state_strict(net, state, p, what="its metadata", hint="the file was altered")
    return net.eval(), {**info, "sha256": digest}


class VqkitFeatures(nn.Module):
    """A saved :class:`FeatureNet` as a feature extractor: uint8 (B, C, H, W) -> (B, 4w).
    Images must have the channels and size it was trained on."""

    comparable_with_papers = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.net, self.info = load_feature_net(path)
        self.net.requires_grad_(False)
        self.num_features = self.net.num_features
        self.name = f"vqkit-features {self.info.get('name', '?')}"

    def train(self, mode: bool = True) -> VqkitFeatures:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        want = (self.info["in_channels"], self.info["image_size"], self.info["image_size"])
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != want:
            raise UserError(
                f"{self.name} takes uint8 images {want} (what it was trained on); got "
                f"{images.dtype} {tuple(images.shape[1:])}"
            )
        return self.net.embed(normalize(images))

    def describe(self) -> dict[str, Any]:
        keys = ("name", "data", "image_size", "test_accuracy", "test_images", "sha256")
        return {
            "feature_space": f"{self.name} ({self.num_features}-d)",
            **{k: self.info.get(k) for k in keys},
            "comparable_with_papers": False,
            "note": NOT_COMPARABLE,
        }


def add_features_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a labelled dataset (class folders, CIFAR-10)")
    p.add_argument("--out", required=True, help="folder for features.safetensors and .json")
    p.add_argument("--name", default=None, help="the feature space's name (default: --out's)")
    p.add_argument("--image-size", type=int, default=None, help="resize (default: the data's)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-split", default="test")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace a feature network in --out")


def run_features(args: argparse.Namespace) -> int:
    """``vqkit features``: train, measure test accuracy, save; prints the info."""
    for flag in ("steps", "batch_size", "width"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    if not args.lr > 0:
        raise UserError("--lr must be > 0")
    # FD/KID measured with the network in --out are tied to it: replaced only when asked,
    # and refused before any data is read
    out = Path(args.out)
    refuse_existing([out / "features.safetensors", out / "features.json"], args.overwrite)
    kw = {"image_size": args.image_size, "cache_dir": args.cache_dir}
    train = load_dataset(args.data, "train", **kw)
    test = load_dataset(args.data, args.test_split, **kw, channels=train.images.shape[1])
    net = train_feature_net(
        train,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        seed=args.seed,
        log_every=max(1, args.steps // 10),
    )
    acc = accuracy(net, test)
    meta = {
        "name": args.name or Path(args.out).resolve().name,
        "data": str(args.data),
        "image_size": int(train.images.shape[-1]),
        "classes": list(train.classes),
        "train_images": len(train),
        "test_images": len(test),
        "test_accuracy": acc,
        "steps": args.steps,
        "seed": args.seed,
    }
    path = save_feature_net(net, args.out, meta)
    print(dump_json(loads_json(Path(args.out, "features.json").read_text()), indent=2))
    print(f"wrote {path} (test accuracy {acc:.4f})")
    return 0
