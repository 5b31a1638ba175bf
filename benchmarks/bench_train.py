"""Training throughput: vqkit's training step against a straightforward loop of the
classic VQ-VAE code, in one run (each method in its own process, interleaved rounds).

The classic loop is re-implemented here in our own words from the well-known 2018
PyTorch notebook's structure: the same encoder/decoder, a VQ-EMA layer that builds the
full distance matrix, an N x K one-hot via scatter, quantizes by one-hot matmul and
updates the EMA with one-hot matmuls, re-creating its parameters every step; a
torchvision-style dataset (per-image PIL -> tensor -> normalise) behind a shuffling
DataLoader, with ``next(iter(loader))`` per step.

    python benchmarks/bench_train.py --data ../shared/data/cifar10-jpeg.tar.gz \
        --batch-size 256 --steps 15 --rounds 3

Writes benchmarks/results/train_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def worker(args) -> None:
    from vqkit.data import load_dataset

    data = load_dataset(args.data, "train")
    if args.limit:
        data = data.subset(slice(0, args.limit))
    fn = run_vqkit if args.worker == "vqkit" else run_classic
    times = fn(data, args.batch_size, args.steps, args.warmup)
    med = statistics.median(times)
    print(json.dumps({"method": args.worker, "median_step_s": med,
                      "images_per_s": args.batch_size / med, "times": times}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved A/B rounds")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--worker", choices=["vqkit", "classic"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    results: dict[str, list[dict]] = {"vqkit": [], "classic": []}
    for r in range(args.rounds):
        for method in ("classic", "vqkit"):
            cmd = [sys.executable, __file__, "--worker", method, "--data", args.data,
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--limit", str(args.limit)]
            load = os.getloadavg()[0]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rec["load_1min_before"] = load
            results[method].append(rec)
            print(f"round {r + 1}/{args.rounds} {method}: {rec['images_per_s']:.1f} images/s "
                  f"(load {load:.1f})", file=sys.stderr)
    ratios = [v["images_per_s"] / c["images_per_s"]
              for v, c in zip(results["vqkit"], results["classic"], strict=True)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    import torch

    summary = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "commit": commit,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__}, threads {torch.get_num_threads()}",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rounds": args.rounds,
        "results": results,
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios),
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_cpu.json").write_text(json.dumps(summary, indent=2))
    med = {m: statistics.median(r["images_per_s"] for r in results[m]) for m in results}
    md = [
        "# Training throughput (CPU)", "",
        f"- command: `python {summary['command']}`",
        f"- commit {commit}, {summary['date']}; {summary['machine']}",
        f"- batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, "
        f"{args.rounds} interleaved rounds, each method in its own process",
        "",
        "| method | images/s (median of rounds) | ratio to classic |",
        "|---|---:|---:|",
        f"| classic loop (one-hot VQ-EMA, per-image PIL dataset, next(iter(loader))) | "
        f"{med['classic']:.1f} | 1.00 |",
        f"| vqkit (Trainer.train_step + BatchLoader) | {med['vqkit']:.1f} | "
        f"{summary['ratio_median']:.2f} |",
        "",
        f"Per-round ratios: {', '.join(f'{r:.2f}' for r in ratios)}.",
    ]
    (out_dir / "train_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
