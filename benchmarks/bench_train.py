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

vqkit runs as ``vqkit train`` would, with the step switches of ``--methods``: e.g.
``vqkit+cl+bf16+compile`` is ``--channels-last --precision bf16 --compile``.

Writes benchmarks/results/train_cpu/train_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

ROOT = common.REPO_ROOT
MODULE = "benchmarks.bench_train"


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
            dist = (
                flat.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2 * torch.matmul(flat, w.t())
            )
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
    times, cpu = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        x, _ = next(iter(loader))
        opt.zero_grad()
        vq_loss, recon, ppl = model(x)
        recon_error = F.mse_loss(recon, x) / var
        (recon_error + vq_loss).backward()
        opt.step()
        recon_error.item(), ppl.item()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return times, cpu


# vqkit's variants: the step switches of `vqkit train` (each method its own process)
SWITCHES = {
    "cl": {"channels_last": True},
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "fp16"},
    "compile": {"compile": True},
    "noprefetch": {"prefetch": False},
}
DEFAULT_METHODS = (
    "classic,vqkit,vqkit+compile,vqkit+cl,vqkit+bf16,vqkit+cl+bf16,vqkit+cl+bf16+compile"
)


def method_options(method: str) -> dict:
    """``vqkit+cl+bf16`` -> {"channels_last": True, "precision": "bf16"}."""
    opts: dict = {}
    for part in method.split("+")[1:]:
        if part not in SWITCHES:
            raise SystemExit(f"unknown switch {part!r} in {method!r}; use {sorted(SWITCHES)}")
        opts.update(SWITCHES[part])
    return opts


def run_vqkit(data_source, batch_size, steps, warmup, limit, options):
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_train_") as out_dir:
        return _time_trainer(data_source, batch_size, steps, warmup, limit, options, out_dir)


def _time_trainer(data_source, batch_size, steps, warmup, limit, options, out_dir):
    from vqkit.runtime.prefetch import Prefetcher
    from vqkit.training.tokenizer import TrainConfig, Trainer

    # the trainer itself (`vqkit train` with these options): its loader (prefetching),
    # its step; no codebook init or revival and no evaluation, like the classic loop
    cfg = TrainConfig(
        data=data_source,
        batch_size=batch_size,
        steps=warmup + steps,
        init="random",
        revive_every=0,
        progress=False,
        out_dir=out_dir,
        **options,
    )
    trainer = Trainer(cfg)
    if limit and trainer.data.train is not None:
        trainer.data.train = trainer.data.train.subset(slice(0, limit))
        trainer.loader = trainer.data.loader(cfg, seed=0, device=trainer.device)
        if cfg.prefetch:
            trainer.loader = Prefetcher(trainer.loader)
    times, cpu = [], []
    try:
        for i in range(warmup + steps):
            t0, c0 = time.perf_counter(), time.process_time()
            x, _ = trainer.loader.next_batch()
            trainer.train_step(x)
            trainer.step += 1
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
    finally:
        trainer.close()
    return times, cpu


def worker(args) -> None:
    if args.worker == "classic":
        from vqkit.data import load_dataset

        data = load_dataset(args.data, "train")
        if args.limit:
            data = data.subset(slice(0, args.limit))
        times, cpu = run_classic(data, args.batch_size, args.steps, args.warmup)
    else:
        times, cpu = run_vqkit(
            args.data,
            args.batch_size,
            args.steps,
            args.warmup,
            args.limit,
            method_options(args.worker),
        )
    med = statistics.median(times)
    # CPU seconds of the process (all its threads) per step: less sensitive than wall time
    # to other jobs taking the cores, a cross-check when the machine is shared
    cpu_med = statistics.median(cpu)
    print(
        json.dumps(
            {
                "method": args.worker,
                "median_step_s": med,
                "images_per_s": args.batch_size / med,
                "best_step_s": min(times),
                "median_cpu_s": cpu_med,
                "images_per_cpu_s": args.batch_size / cpu_med,
                "times": times,
                "cpu_times": cpu,
            }
        )
    )


def _flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    if value is True:
        return flag
    if value is False:
        return "--no-" + flag[2:]
    return f"{flag} {value}"


def _label(method: str) -> str:
    if method == "classic":
        return "classic loop (one-hot VQ-EMA, per-image PIL dataset, next(iter(loader)))"
    opts = method_options(method)
    flags = [_flag(k, v) for k, v in opts.items()]
    return "vqkit train" + (" " + " ".join(flags) if flags else " (defaults: fp32)")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (compile happens here)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="comma-separated: classic, vqkit, vqkit+SWITCH+... with switches "
        f"{', '.join(SWITCHES)}",
    )
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks/results/train_cpu"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    methods = args.methods.split(",")
    if "classic" not in methods:
        raise SystemExit("--methods must include classic (the ratios are to it)")
    for m in methods:
        if m != "classic":
            method_options(m)  # unknown switches fail before any run
    meta = common.run_meta(MODULE)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for method in methods:
            cmd = common.child_cmd(
                MODULE,
                "--worker",
                method,
                "--data",
                args.data,
                "--batch-size",
                args.batch_size,
                "--steps",
                args.steps,
                "--warmup",
                args.warmup,
                "--limit",
                args.limit,
            )
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, env=common.child_env())
            if out.returncode:
                raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rec["load_1min_before"] = load
            rec["process_s"] = time.perf_counter() - t0  # startup, warm-up/compile included
            results[method].append(rec)
            print(
                f"round {r + 1}/{args.rounds} {method}: {rec['images_per_s']:.1f} images/s "
                f"(load {load:.1f}, process {rec['process_s']:.0f} s)",
                file=sys.stderr,
            )
    # ratios within a round: the methods of one round ran minutes apart, not hours
    ratios = {
        m: [
            v["images_per_s"] / c["images_per_s"]
            for v, c in zip(results[m], results["classic"], strict=True)
        ]
        for m in methods
    }
    cpu_ratios = {
        m: [
            v["images_per_cpu_s"] / c["images_per_cpu_s"]
            for v, c in zip(results[m], results["classic"], strict=True)
        ]
        for m in methods
    }
    common.finish_meta(meta)
    import torch

    summary = {
        **meta,
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "methods": {
            m: {"label": _label(m), "options": {} if m == "classic" else method_options(m)}
            for m in methods
        },
        "results": results,
        "ratio_per_round": ratios,
        "ratio_median": {m: statistics.median(v) for m, v in ratios.items()},
        "cpu_ratio_per_round": cpu_ratios,
        "cpu_ratio_median": {m: statistics.median(v) for m, v in cpu_ratios.items()},
    }
    med = {m: statistics.median(r["images_per_s"] for r in results[m]) for m in methods}
    loads = [r["load_1min_before"] for m in methods for r in results[m]]
    md = [
        "# Training throughput (CPU)",
        "",
        *common.meta_lines(meta, machine_extra=f", torch threads {summary['torch_threads']}"),
        f"- batch {args.batch_size}, {args.steps} timed steps after {args.warmup} untimed "
        f"(torch.compile compiles there), {args.rounds} interleaved rounds, each method in "
        "its own process; vqkit: the Trainer's loader (prefetching with +prefetch) and step, "
        "without codebook init, revival or evaluation (the classic loop has none)",
        f"- 1-minute load average before the runs: {min(loads):.1f} to {max(loads):.1f} "
        f"({os.cpu_count()} cores)",
        "",
        "| method | images/s (median of rounds) | ratio to classic (median of per-round "
        "ratios) | per-round ratios | ratio in images per CPU-second | process s (median, "
        "incl. warm-up) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for m in methods:
        proc = statistics.median(r["process_s"] for r in results[m])
        md.append(
            f"| {_label(m)} | {med[m]:.1f} | {summary['ratio_median'][m]:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in ratios[m])} | "
            f"{summary['cpu_ratio_median'][m]:.2f} | {proc:.0f} |"
        )
    common.write_results(Path(args.out_dir), "train_cpu", summary, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
