"""Training throughput: vqkit's training step against a straightforward loop of the
classic VQ-VAE code, in one run (each method in its own process, interleaved rounds).

The classic loop is re-implemented here in our own words from the well-known 2018
PyTorch notebook's structure: the same encoder/decoder, a VQ-EMA layer that builds the
full distance matrix, an N x K one-hot via scatter, quantizes by one-hot matmul and
updates the EMA with one-hot matmuls, re-creating its parameters every step; a
torchvision-style dataset (per-image PIL -> tensor -> normalise) behind a shuffling
DataLoader, with ``next(iter(loader))`` per step.

From the repository root::

    python -m benchmarks.bench_train --data ../shared/data/cifar10-jpeg.tar.gz \
        --batch-size 256 --steps 15 --rounds 3
    python -m benchmarks.bench_train --quick     # smoke test: built-in data, tiny run

Writes ``benchmarks/results/train_cpu/train_cpu.{json,md}`` (``train_cpu_quick/`` with
``--quick``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks import common

MODULE = "benchmarks.bench_train"
STEM = "train_cpu"
METHODS = ("classic", "vqkit")


# --- the classic code, re-implemented ----------------------------------------------------

def classic_modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ClassicVQEMA(nn.Module):
        def __init__(self, k, d, beta, decay, eps=1e-5):
            super().__init__()
            self.k, self.d, self.beta, self.decay, self.eps = k, d, beta, decay, eps
            self.embedding = nn.Embedding(k, d)
            self.embedding.weight.data.normal_()
            self.register_buffer("cluster", torch.zeros(k))
            self.ema_w = nn.Parameter(torch.randn(k, d))

        def forward(self, z):
            z = z.permute(0, 2, 3, 1).contiguous()
            flat = z.view(-1, self.d)
            w = self.embedding.weight
            dist = (flat.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1)
                    - 2 * torch.matmul(flat, w.t()))
            idx = torch.argmin(dist, dim=1).unsqueeze(1)
            enc = torch.zeros(idx.shape[0], self.k, device=z.device)
            enc.scatter_(1, idx, 1)
            q = torch.matmul(enc, w).view(z.shape)
            if self.training:
                self.cluster = self.cluster * self.decay + (1 - self.decay) * enc.sum(0)
                n = self.cluster.sum()
                self.cluster = (self.cluster + self.eps) / (n + self.k * self.eps) * n
                dw = torch.matmul(enc.t(), flat)
                self.ema_w = nn.Parameter(self.ema_w * self.decay + (1 - self.decay) * dw)
                self.embedding.weight = nn.Parameter(self.ema_w / self.cluster.unsqueeze(1))
            loss = self.beta * F.mse_loss(q.detach(), z)
            q = z + (q - z).detach()
            p = enc.mean(0)
            ppl = torch.exp(-torch.sum(p * torch.log(p + 1e-10)))
            return loss, q.permute(0, 3, 1, 2).contiguous(), ppl

    class ClassicModel(nn.Module):
        def __init__(self):
            super().__init__()
            from vqkit.models.vqvae import Decoder, Encoder

            self.encoder = Encoder(3, 128, 32, 2)
            self.pre_vq = nn.Conv2d(128, 64, 1)
            self.vq = ClassicVQEMA(512, 64, 0.25, 0.99)
            self.decoder = Decoder(64, 128, 3, 32, 2)

        def forward(self, x):
            loss, q, ppl = self.vq(self.pre_vq(self.encoder(x)))
            return loss, self.decoder(q), ppl

    class PILDataset(torch.utils.data.Dataset):
        """torchvision-CIFAR-like: HWC uint8 numpy array, PIL per item, ToTensor, Normalize."""

        def __init__(self, hwc):
            self.data = hwc

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            from PIL import Image

            img = Image.fromarray(self.data[i])
            t = torch.ByteTensor(torch.ByteStorage.from_buffer(img.tobytes()))
            t = t.view(img.size[1], img.size[0], 3).permute(2, 0, 1).contiguous()
            t = t.float().div(255)
            return (t - 0.5) / 1.0, 0

    return ClassicModel, PILDataset


def run_classic(data, batch_size, steps, warmup):
    import numpy as np
    import torch
    import torch.nn.functional as F

    ClassicModel, PILDataset = classic_modules()
    torch.manual_seed(0)
    hwc = np.ascontiguousarray(data.images.permute(0, 2, 3, 1).numpy())
    var = float(np.var(hwc / 255.0))
    loader = torch.utils.data.DataLoader(PILDataset(hwc), batch_size=batch_size, shuffle=True)
    model = ClassicModel()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, amsgrad=False)
    model.train()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x, _ = next(iter(loader))
        opt.zero_grad()
        vq_loss, recon, ppl = model(x)
        recon_error = F.mse_loss(recon, x) / var
        (recon_error + vq_loss).backward()
        opt.step()
        recon_error.item(), ppl.item()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run_vqkit(data, batch_size, steps, warmup):
    import torch

    from vqkit.data import BatchLoader, data_variance
    from vqkit.models import VQVAE
    from vqkit.train import TrainConfig, Trainer

    torch.manual_seed(0)
    # the trainer's own step (Trainer.train_step) on the trainer's own loader
    trainer = Trainer.__new__(Trainer)
    trainer.config = TrainConfig(batch_size=batch_size)
    trainer.model = VQVAE()
    trainer.ddp = trainer.model  # what the trainer calls; DDP-wrapped under torchrun
    trainer.optimizer = torch.optim.Adam(trainer.model.parameters(), lr=3e-4)
    trainer.data_variance = data_variance(data)
    loader = BatchLoader(data, batch_size, seed=0)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x, _ = loader.next_batch()
        trainer.train_step(x)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def worker(args) -> int:
    from vqkit.data import load_dataset

    # The classic model is RGB; the built-in set (smoke test) is gray.
    data = load_dataset(args.data, "train", channels=3 if args.data == "builtin" else None)
    if args.limit:
        data = data.subset(slice(0, args.limit))
    fn = run_vqkit if args.worker == "vqkit" else run_classic
    times = fn(data, args.batch_size, args.steps, args.warmup)
    med = statistics.median(times)
    return common.emit({"status": "ok", "method": args.worker, "median_step_s": med,
                        "images_per_s": args.batch_size / med, "times": times})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(common.CIFAR10_JPEG),
                    help="dataset (default: the CIFAR-10 archive in ../shared/data)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved A/B rounds")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images")
    ap.add_argument("--timeout", type=float, default=3600.0, help="wall timeout per worker, s")
    ap.add_argument("--quick", action="store_true", help="smoke test: built-in data (first "
                    "512 images), batch 32, 2 timed steps after 1 warm-up, 1 round")
    ap.add_argument("--out-dir", help="results folder (default benchmarks/results/train_cpu, "
                    "train_cpu_quick with --quick)")
    ap.add_argument("--note", help="free text stored in the results (e.g. machine load)")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.data, args.limit, args.batch_size = "builtin", 512, 32
        args.steps, args.warmup, args.rounds = 2, 1, 1
    if args.worker:
        return worker(args)
    import torch

    out = Path(args.out_dir) if args.out_dir else common.out_dir(STEM, args.quick)
    meta = common.run_meta(MODULE, args.note, argv)
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    for r in range(args.rounds):
        for method in METHODS:
            cmd = common.child_cmd(MODULE, "--worker", method, "--data", args.data,
                                   "--batch-size", args.batch_size, "--steps", args.steps,
                                   "--warmup", args.warmup, "--limit", args.limit)
            load = os.getloadavg()[0]
            rec = common.run_child(cmd, {"load_1min_before": load}, args.timeout)
            if rec["status"] != "ok":
                sys.exit(f"{method} worker failed: {rec['status']}: {rec.get('error')}")
            results[method].append(rec)
            print(f"round {r + 1}/{args.rounds} {method}: {rec['images_per_s']:.1f} images/s "
                  f"(load {load:.1f})", file=sys.stderr)
    ratios = [v["images_per_s"] / c["images_per_s"]
              for v, c in zip(results["vqkit"], results["classic"], strict=True)]
    common.finish_meta(meta)
    meta["settings"] = {"data": args.data, "limit": args.limit, "batch_size": args.batch_size,
                        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                        "torch_threads": torch.get_num_threads()}
    summary = {**meta, "results": results, "ratio_per_round": ratios,
               "ratio_median": statistics.median(ratios)}
    med = {m: statistics.median(r["images_per_s"] for r in results[m]) for m in results}
    md = [
        "# Training throughput (CPU)", "",
        *common.meta_lines(meta, machine_extra=f", {torch.get_num_threads()} torch threads"),
        f"- batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, "
        f"{args.rounds} interleaved rounds, each method in its own process; data: {args.data}"
        + (f" (first {args.limit} images)" if args.limit else ""),
        *([f"- note: {args.note}"] if args.note else []),
        "",
        *common.md_table(
            ["method", "images/s (median of rounds)", "ratio to classic"],
            [["classic loop (one-hot VQ-EMA, per-image PIL dataset, next(iter(loader)))",
              f"{med['classic']:.1f}", "1.00"],
             ["vqkit (Trainer.train_step + BatchLoader)", f"{med['vqkit']:.1f}",
              f"{summary['ratio_median']:.2f}"]]),
        "",
        f"Per-round ratios: {', '.join(f'{r:.2f}' for r in ratios)}.",
    ]
    path = common.write_results(out, STEM, summary, md)
    print("\n".join(md))
    print(f"wrote {path} and {path.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
