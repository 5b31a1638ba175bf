"""Time per training step at 1 and N processes (torchrun, gloo on CPU) and the time the
EMA quantizer spends in its statistics all-reduce per step.

From the repository root::

    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        -m benchmarks.bench_distributed --steps 30 --model classic
    python -m benchmarks.bench_distributed --steps 30 --model classic   # 1 process
    python -m benchmarks.bench_distributed --quick                      # smoke test

Each rank builds the ``Trainer`` (default data: the built-in 28x28 set) and runs
``--warmup`` untimed steps, then ``--steps`` timed steps: a step is
``Trainer.train_step`` (forward, backward with DDP's gradient all-reduce, Adam update)
on the trainer's own loader, timed with ``perf_counter``; the loop is ``Trainer.fit``'s
without its per-step metrics all-reduce, logging, evaluation and checkpoints.

The VQ collective (the EMA quantizer's one fused all-reduce of the per-code counts and
sums, K + K*D floats, per training step) is read from ``torch.profiler``, over
``--profile-steps`` further steps (the profiler costs ~10 % of a step, so the timed steps
run without it): its duration is the collective's ``<backend>:all_reduce`` event of
K * (D + 1) elements, from the start of the collective to its completion, which includes
any wait for the slower rank. DDP's gradient buckets are other all-reduce events. In one
process the quantizer calls no collective (0).

Rank 0 prints one JSON line (world size, per-rank and global batch, median seconds per
step, images/s, median seconds per step inside the VQ collective) and adds the run to
``benchmarks/results/distributed_cpu/distributed_cpu.{json,md}`` (one row per model,
world size and batch; a re-run replaces its row), or ``distributed_cpu_quick/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import common
from vqkit import distributed
from vqkit.training.tokenizer import TrainConfig, Trainer

MODULE = "benchmarks.bench_distributed"
MODELS = {
    "tiny": dict(hidden=32, res_hidden=8, res_layers=1, num_embeddings=32, embedding_dim=8),
    "classic": dict(hidden=128, res_hidden=32, res_layers=2, num_embeddings=512, embedding_dim=64),
}
STEM = "distributed_cpu"


def _timed_steps(tr: Trainer, n: int) -> list[float]:
    times = []
    for _ in range(n):
        x, _ = tr.loader.next_batch()
        t0 = time.perf_counter()
        tr.train_step(x)
        times.append(time.perf_counter() - t0)
    return times


def _vq_collective_s(tr: Trainer, n: int) -> tuple[list[float], int]:
    """Seconds of each VQ all-reduce over ``n`` profiled steps, and how many all-reduce
    events the profile held in all."""
    codebook = tr.model.quantizer.codebook  # (K, D): the collective sums K + K*D floats
    numel = codebook.shape[0] * (codebook.shape[1] + 1)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _timed_steps(tr, n)
    reduces = [e for e in prof.events() if e.name.endswith(":all_reduce")]
    vq = [e.time_range.elapsed_us() * 1e-6 for e in reduces if e.input_shapes == [[numel]]]
    return vq, len(reduces)


def _write(out: Path, meta: dict, row: dict) -> None:
    path = out / f"{STEM}.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    key = ("model", "world_size", "batch_per_rank")
    runs = [r for r in runs if any(r["result"][k] != row[k] for k in key)]
    runs.append({**meta, "result": row})
    runs.sort(key=lambda r: tuple(r["result"][k] for k in key))
    table = []
    for r in runs:
        res = r["result"]
        c = res["vq_collective_s_per_step"]
        table.append(
            [
                res["world_size"],
                res["batch_per_rank"],
                res["global_batch"],
                res["model"],
                res["threads_per_rank"],
                f"{res['s_per_step']:.3f}",
                f"{res['images_per_s']:.0f}",
                common.fmt(c, ".4f") + (" (no collective)" if res["world_size"] == 1 else ""),
                r["git_commit"],
                r["date_utc"],
            ]
        )
    lines = [
        "# Training step at 1 and N processes (CPU, gloo)",
        "",
        "Median seconds per `Trainer.train_step` (forward, backward with DDP's gradient "
        "all-reduce, Adam update) on rank 0; VQ collective: median duration of the EMA "
        "quantizer's fused all-reduce per step (from torch.profiler, separate steps), "
        "including any wait for the slower rank.",
        "",
        *common.md_table(
            [
                "processes",
                "batch per process",
                "global batch",
                "model",
                "threads per rank",
                "s / step",
                "images / s",
                "VQ collective s / step",
                "commit",
                "date (UTC)",
            ],
            table,
            "rrrlrrrrll",
        ),
        "",
        "Runs:",
        "",
    ]
    for r in runs:
        res = r["result"]
        lines.append(
            f"### {res['world_size']} process(es), batch {res['batch_per_rank']}, {res['model']}"
        )
        lines += ["", *common.meta_lines(r), f"- settings: {json.dumps(r['settings'])}"]
        if r.get("note"):
            lines.append(f"- note: {r['note']}")
        lines.append("")
    common.write_results(out, STEM, {"runs": runs}, lines)


def _torchrun_command(argv: list[str] | None) -> str:
    """The launch line of this run under torchrun (from its environment)."""
    nodes = int(os.environ["WORLD_SIZE"]) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    launch = [
        "python",
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')}",
    ]
    if nodes > 1:
        launch.append(f"--nnodes={nodes}")
    return shlex.join([*launch, "-m", MODULE, *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument(
        "--profile-steps",
        type=int,
        default=None,
        help="profiled steps for the VQ collective (default: --steps; 0: skip)",
    )
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    ap.add_argument("--model", choices=sorted(MODELS), default="classic")
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: tiny model, 3 timed steps after 1 warm-up"
    )
    ap.add_argument(
        "--out-dir",
        help="results folder (default benchmarks/results/"
        "distributed_cpu, distributed_cpu_quick with --quick)",
    )
    ap.add_argument("--note", help="free text stored in the results (e.g. machine load)")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.warmup, args.batch_size = "tiny", 3, 1, 8
    profile_steps = args.steps if args.profile_steps is None else args.profile_steps
    out = Path(args.out_dir) if args.out_dir else common.out_dir(STEM, args.quick)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            out_dir=tmp,
            steps=args.warmup + args.steps,
            batch_size=args.batch_size,
            progress=False,
            log_every=10**6,
            eval_every=10**6,
            device="cpu",
            **MODELS[args.model],
        )
        tr = Trainer(cfg)
        meta = common.run_meta(MODULE, args.note, argv) if tr.is_main else {}
        if tr.world > 1 and tr.is_main:
            meta["command"] = _torchrun_command(argv)
        try:
            _timed_steps(tr, args.warmup)
            step_times = _timed_steps(tr, args.steps)
            coll, n_reduce = _vq_collective_s(tr, profile_steps) if profile_steps else ([], 0)
        finally:
            distributed.teardown()
    if not tr.is_main:
        return 0
    s = statistics.median(step_times)
    if tr.world == 1:
        c = 0.0  # no process group: the quantizer's all-reduce is a no-op
    else:
        c = round(statistics.median(coll), 6) if coll else None
    row = {
        "model": args.model,
        "world_size": tr.world,
        "batch_per_rank": args.batch_size,
        "global_batch": args.batch_size * tr.world,
        "threads_per_rank": torch.get_num_threads(),
        "s_per_step": round(s, 4),
        "images_per_s": round(args.batch_size * tr.world / s, 1),
        "vq_collective_s_per_step": c,
        "vq_collectives_profiled": len(coll),
        "all_reduces_profiled": n_reduce,
        "step_times_s": step_times,
        "vq_collective_times_s": coll,
    }
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("times_s")}))
    if tr.world > 1 and profile_steps and len(coll) != profile_steps:
        print(
            f"warning: found {len(coll)} VQ all-reduce events in {profile_steps} profiled "
            "steps (expected one per step)",
            file=sys.stderr,
        )
    common.finish_meta(meta)
    meta["settings"] = {
        "steps": args.steps,
        "warmup": args.warmup,
        "profile_steps": profile_steps,
        "model": MODELS[args.model],
        "data": "built-in (TrainConfig default)",
    }
    _write(out, meta, row)
    print(f"wrote {out / (STEM + '.json')} and {out / (STEM + '.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
