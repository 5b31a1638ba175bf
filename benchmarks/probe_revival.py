"""Short probes (a few hundred CIFAR-10 steps) of the plain quantizer's early dynamics,
used to choose the revival cadence of the ``vq-healthy`` preset before the 10k-step runs.
Prints, every 100 steps (``--every``), the mean training NMSE and batch perplexity over
those steps, the dead count, and the mean norm of the latents z_e and of the codes.

From the repository root::

    python -m benchmarks.probe_revival '{"classic": {"quantizer": "vq"},
        "init+revive/20": {"preset": "vq-healthy"}}' 500
    python -m benchmarks.probe_revival --quick    # smoke test: built-in data, 20 steps

Writes ``benchmarks/results/probe_revival/probe_revival.{json,md}``
(``probe_revival_quick/`` with ``--quick``). The log of the probes behind
docs/results.md: ``benchmarks/results/probe_revival/probe_revival.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

MODULE = "benchmarks.probe_revival"
STEM = "probe_revival"
QUICK_VARIANTS = {"classic": {"quantizer": "vq"}, "init+revive/20": {"preset": "vq-healthy"}}


def probe(
    name: str, opts: dict, steps: int, data: str, batch: int, every: int, tmp: str
) -> list[dict]:
    """Train one variant for ``steps`` steps (revival at its cadence, as ``Trainer.fit``
    runs it); one record per ``every`` steps."""
    import torch

    from vqkit.training.tokenizer import TrainConfig, Trainer

    cfg = TrainConfig.build(
        data=data,
        batch_size=batch,
        steps=0,
        out_dir=os.path.join(tmp, name),
        progress=False,
        **opts,
    )
    t = Trainer(cfg, overwrite=True)
    q = t.model.quantizer
    if cfg.init == "kmeans":
        t.init_codebook()
    t0 = time.time()
    acc, rows = [], []
    for step in range(1, steps + 1):
        x, _ = t.loader.next_batch()
        v, _ = t.train_step(x)
        t.step = step
        acc.append((v["recon_nmse"], v["perplexity"]))
        if t.health.due(step) or step % every == 0:
            with torch.no_grad():
                z = t.model.encode_latents(x)
        if t.health.due(step):
            t.health.revive(z, step, t.optimizer)
        if step % every == 0:
            codes = q.codebook.detach()
            rows.append(
                {
                    "variant": name,
                    "step": step,
                    "nmse": sum(a for a, _ in acc) / len(acc),
                    "perplexity": sum(b for _, b in acc) / len(acc),
                    "dead": int(q.dead_codes(cfg.dead_threshold).sum()),
                    "z_norm": float(z.norm(dim=1).mean()),
                    # the codes as searched: unit rows with use_cosine
                    "code_norm": 1.0
                    if getattr(q, "use_cosine", False)
                    else float(codes.norm(dim=1).mean()),
                    "seconds": time.time() - t0,
                }
            )
            acc = []
            r = rows[-1]
            print(
                f"{name:12s} {step:5d} nmse {r['nmse']:.4f} ppl {r['perplexity']:6.1f} "
                f"dead {r['dead']:4d} |z| {r['z_norm']:.3f} |e| {r['code_norm']:.3f} "
                f"{r['seconds']:.0f}s",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "variants",
        nargs="?",
        help="JSON object: variant name -> TrainConfig options, e.g. "
        '\'{"classic": {"quantizer": "vq"}}\'',
    )
    ap.add_argument("steps", nargs="?", type=int, help="steps per variant")
    ap.add_argument(
        "data",
        nargs="?",
        default=str(common.CIFAR10_JPEG),
        help="dataset (default: the CIFAR-10 archive in ../shared/data)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--every", type=int, default=100, help="steps per printed record")
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: variants {', '.join(QUICK_VARIANTS)}, built-in data, "
        "batch 8, 20 steps (one revival), a record every 10",
    )
    ap.add_argument(
        "--out-dir",
        help="results folder (default benchmarks/results/"
        "probe_revival, probe_revival_quick with --quick)",
    )
    ap.add_argument("--note", help="free text stored in the results")
    args = ap.parse_args(argv)
    if args.quick:
        variants = json.loads(args.variants) if args.variants else QUICK_VARIANTS
        steps, data = args.steps or 20, "builtin"
        args.batch_size, args.every = 8, 10
    elif args.variants is None or args.steps is None:
        ap.error("give VARIANTS and STEPS (or --quick)")
    else:
        variants, steps, data = json.loads(args.variants), args.steps, args.data
    out = Path(args.out_dir) if args.out_dir else common.out_dir(STEM, args.quick)
    meta = common.run_meta(MODULE, args.note, argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, opts in variants.items():
            rows += probe(name, opts, steps, data, args.batch_size, args.every, tmp)
    common.finish_meta(meta)
    meta["settings"] = {
        "variants": variants,
        "steps": steps,
        "data": data,
        "batch_size": args.batch_size,
        "every": args.every,
    }
    lines = [
        "# Revival probes: early dynamics of the plain quantizer",
        "",
        *common.meta_lines(meta),
        f"- batch {args.batch_size}, {steps} steps per variant, data {data}; every "
        f"{args.every} steps: mean training NMSE and batch perplexity over those steps, dead "
        "codes, mean norms of z_e and codes",
        *([f"- note: {args.note}"] if args.note else []),
        "",
        *common.md_table(
            [
                "variant",
                "step",
                "NMSE",
                "perplexity",
                "dead",
                "mean norm z_e",
                "mean code norm",
                "seconds",
            ],
            [
                [
                    r["variant"],
                    r["step"],
                    f"{r['nmse']:.4f}",
                    f"{r['perplexity']:.1f}",
                    r["dead"],
                    f"{r['z_norm']:.3f}",
                    f"{r['code_norm']:.3f}",
                    f"{r['seconds']:.0f}",
                ]
                for r in rows
            ],
            "lrrrrrrr",
        ),
    ]
    md = common.write_results(out, STEM, {**meta, "rows": rows}, lines)
    print(f"wrote {md} and {md.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
