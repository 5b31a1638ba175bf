"""Short probes (a few hundred CIFAR-10 steps) of the plain quantizer's early dynamics,
used to choose the revival cadence of the ``vq-healthy`` preset before the 10k-step runs.
Prints, every 100 steps, the mean training NMSE and batch perplexity over those steps,
the dead count, and the mean norm of the latents z_e and of the codes.

    python benchmarks/probe_revival.py '{"classic": {"quantizer": "vq"},
        "init+revive/20": {"preset": "vq-healthy"}}' 500

The log of the probes behind docs/results.md: benchmarks/results/probe_revival.txt.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from vqkit.train import TrainConfig, Trainer

variants = json.loads(sys.argv[1])
steps = int(sys.argv[2])
data = sys.argv[3] if len(sys.argv) > 3 else "../shared/data/cifar10-jpeg.tar.gz"
tmp = tempfile.mkdtemp()
for name, opts in variants.items():
    cfg = TrainConfig.build(
        data=data, batch_size=32, steps=0, out_dir=os.path.join(tmp, name), progress=False, **opts
    )
    t = Trainer(cfg, overwrite=True)
    q = t.model.quantizer
    if cfg.init == "kmeans":
        t.init_codebook()
    t0 = time.time()
    acc = []
    for step in range(1, steps + 1):
        x, _ = t.loader.next_batch()
        v, c = t.train_step(x)
        t.step = step
        acc.append((v["recon_nmse"], v["perplexity"]))
        if cfg.revive_every and step % cfg.revive_every == 0:
            t.revive(x)
        if step % 100 == 0:
            z = t._latents(x)
            n = sum(a for a, _ in acc) / len(acc)
            p = sum(b for _, b in acc) / len(acc)
            acc = []
            dead = int(q.dead_codes(cfg.dead_threshold).sum())
            z_norm = float(z.norm(dim=1).mean())
            e_norm = float(q._search_codebook().norm(dim=1).mean())
            print(
                f"{name:12s} {step:5d} nmse {n:.4f} ppl {p:6.1f} dead {dead:4d} "
                f"|z| {z_norm:.3f} |e| {e_norm:.3f} {time.time() - t0:.0f}s",
                flush=True,
            )
