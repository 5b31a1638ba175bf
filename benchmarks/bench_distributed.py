"""Time per training step at 1 and N processes (torchrun, gloo on CPU) and the time the
EMA quantizer spends in its statistics all-reduce per step.

    python -m torch.distributed.run --standalone --nproc_per_node=2 \
        benchmarks/bench_distributed.py --steps 30 --model classic
    python benchmarks/bench_distributed.py --steps 30 --model classic   # 1 process

Prints one JSON line (rank 0): world size, per-rank and global batch, median seconds
per step, images/s, and median seconds per step inside the VQ collective.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

import vqkit.quantizers.ema as ema_mod
from vqkit.train import TrainConfig, Trainer

MODELS = {
    "tiny": dict(hidden=32, res_hidden=8, res_layers=1, num_embeddings=32, embedding_dim=8),
    "classic": dict(hidden=128, res_hidden=32, res_layers=2, num_embeddings=512, embedding_dim=64),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    ap.add_argument("--model", choices=sorted(MODELS), default="classic")
    args = ap.parse_args()

    coll: list[float] = []
    real = ema_mod.all_reduce_sum

    def timed(tensors, group=None):
        t0 = time.perf_counter()
        out = real(tensors, group)
        coll.append(time.perf_counter() - t0)
        return out

    ema_mod.all_reduce_sum = timed
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            out_dir=out,
            steps=args.warmup + args.steps,
            batch_size=args.batch_size,
            progress=False,
            log_every=10**6,
            eval_every=10**6,
            device="cpu",
            **MODELS[args.model],
        )
        tr = Trainer(cfg)
        step_times: list[float] = []
        real_step = tr.train_step

        def step(x):
            t0 = time.perf_counter()
            r = real_step(x)
            step_times.append(time.perf_counter() - t0)
            return r

        tr.train_step = step  # type: ignore[method-assign]
        tr.finish = lambda: {}  # type: ignore[method-assign]
        tr.fit()
    if tr.is_main:
        s = statistics.median(step_times[args.warmup :])
        c = statistics.median(coll[args.warmup :])
        print(
            json.dumps(
                {
                    "model": args.model,
                    "world_size": tr.world,
                    "batch_per_rank": args.batch_size,
                    "global_batch": args.batch_size * tr.world,
                    "threads_per_rank": torch.get_num_threads(),
                    "s_per_step": round(s, 4),
                    "images_per_s": round(args.batch_size * tr.world / s, 1),
                    "vq_collective_s_per_step": round(c, 6),
                }
            )
        )


if __name__ == "__main__":
    main()
