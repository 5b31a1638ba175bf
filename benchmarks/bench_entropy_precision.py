"""Float32 gradient error of the tiled entropy terms at a sharp temperature, this checkout
against another (``--baseline-src``, e.g. main), against float64 and against a dense
float32 autograd computation.

    python -m benchmarks.bench_entropy_precision --baseline-src /tmp/h22-main/src

IBQ (``softmax_entropy_terms``, T = 0.01, per-sample - batch entropy): 256 rows of
D = 32 over 512 N(0, 1) codes, rows ``typical`` N(0, 1), ``large logits`` 4 N(0, 1),
``sharp`` a code + N(0, 1), ``sharper`` a code + 0.8 N(0, 1); four seeds each. The
``floor`` column is the float64 computation from the float32 logits (the error of the
logits' product alone). LFQ / BSQ (``batch_entropy``, d = 8 bits, exact and per-bit):
logits ``scale`` x N(0, 1), scale 1 and 20. Error = ||g32 - g64|| / ||g64||, the median
over the seeds. Writes ``benchmarks/results/<--out-dir>/entropy_precision.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import common

MODULE = "benchmarks.bench_entropy_precision"
T = 0.01


def _worker() -> list[dict]:
    import torch

    from vqkit.quantizers.entropy import batch_entropy
    from vqkit.quantizers.softmax_entropy import softmax_entropy_terms

    torch.set_num_threads(1)

    def dense_softmax(x, e, t):
        logp = torch.log_softmax(x @ e.t() / t, 1)
        big_p = logp.exp().mean(0)
        log_big_p = big_p.clamp(min=torch.finfo(big_p.dtype).tiny).log()
        return -(logp.exp() * logp).sum(1).mean(), -(big_p * log_big_p).sum()

    def grad(fn, args64, dtype):
        leaves = [a.to(dtype).clone().requires_grad_() for a in args64]
        fn(*leaves).backward()
        return torch.cat([a.grad.flatten() for a in leaves]).double()

    def floor(x, e):
        s = (x.float() @ e.float().t()).double().requires_grad_()
        logp = torch.log_softmax(s / T, 1)
        big_p = logp.exp().mean(0)
        log_big_p = big_p.clamp(min=torch.finfo(big_p.dtype).tiny).log()
        (-(logp.exp() * logp).sum(1).mean() + (big_p * log_big_p).sum()).backward()
        return torch.cat([(s.grad @ e).flatten(), (s.grad.t() @ x).flatten()])

    def rel(g, ref):
        return float((g - ref).norm() / ref.norm())

    out = []
    for kind in ("typical", "large logits", "sharp", "sharper"):
        for seed in range(4):
            gen = torch.Generator().manual_seed(seed)
            e = torch.randn(512, 32, generator=gen, dtype=torch.float64)
            noise = torch.randn(256, 32, generator=gen, dtype=torch.float64)
            near = e[torch.randint(0, 512, (256,), generator=gen)]
            x = {
                "typical": noise,
                "large logits": 4 * noise,
                "sharp": near + noise,
                "sharper": near + 0.8 * noise,
            }[kind]

            def ent(fn):
                def f(a, b):
                    s, bt = fn(a, b, T)
                    return s - bt

                return f

            ref = grad(ent(dense_softmax), (x, e), torch.float64)
            out.append(
                {
                    "term": "ibq softmax entropy, T = 0.01",
                    "batch": kind,
                    "seed": seed,
                    "dense32": rel(grad(ent(dense_softmax), (x, e), torch.float32), ref),
                    "tiled32": rel(grad(ent(softmax_entropy_terms), (x, e), torch.float32), ref),
                    "floor": rel(floor(x, e), ref),
                }
            )
    bits = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).double()

    def dense_lfq(group):
        def f(a):
            if group == 1:
                m = torch.sigmoid(a).mean(0)
                return -(torch.special.xlogy(m, m) + torch.special.xlogy(1 - m, 1 - m)).sum()
            b = bits.to(a.dtype)
            logp = b @ torch.nn.functional.logsigmoid(a).t()
            logp = logp + (1 - b) @ torch.nn.functional.logsigmoid(-a).t()
            pbar = logp.exp().mean(1)
            return -torch.special.xlogy(pbar, pbar).sum()

        return f

    for group in (None, 1):
        for scale in (1.0, 20.0):
            for seed in range(4):
                gen = torch.Generator().manual_seed(seed)
                a = scale * torch.randn(256, 8, generator=gen, dtype=torch.float64)
                ref = grad(dense_lfq(group), (a,), torch.float64)
                tiled = grad(lambda t, g=group: batch_entropy(t, group_size=g), (a,), torch.float32)
                out.append(
                    {
                        "term": f"lfq/bsq batch entropy, {'exact' if group is None else 'per bit'}",
                        "batch": f"logits {scale:g} N(0, 1)",
                        "seed": seed,
                        "dense32": rel(grad(dense_lfq(group), (a,), torch.float32), ref),
                        "tiled32": rel(tiled, ref),
                        "floor": None,
                    }
                )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-src", required=False, help="src/ of the baseline checkout")
    p.add_argument("--out-dir", default=str(common.out_dir("entropy_precision")))
    p.add_argument("--note")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker()))
        return 0
    meta = common.run_meta(MODULE, args.note, argv)
    trees = {"this checkout": str(common.REPO_ROOT / "src")}
    if args.baseline_src:
        trees["baseline"] = args.baseline_src
    results = {}
    for name, src in trees.items():
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([src, str(common.REPO_ROOT)])
        res = subprocess.run(
            [sys.executable, "-m", MODULE, "--worker"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        results[name] = json.loads(res.stdout.strip().splitlines()[-1])
    common.finish_meta(meta)
    rows = []
    keys = []
    for r in results["this checkout"]:
        if (r["term"], r["batch"]) not in keys:
            keys.append((r["term"], r["batch"]))
    for term, batch in keys:

        def med(name, field, term=term, batch=batch):
            vals = [
                r[field]
                for r in results.get(name, [])
                if (r["term"], r["batch"]) == (term, batch) and r[field] is not None
            ]
            return statistics.median(vals) if vals else None

        rows.append(
            [
                term,
                batch,
                common.fmt(med("this checkout", "dense32"), ".2e"),
                common.fmt(med("baseline", "tiled32"), ".2e"),
                common.fmt(med("this checkout", "tiled32"), ".2e"),
                common.fmt(med("this checkout", "floor"), ".2e"),
            ]
        )
    md = [
        "# Float32 gradient error of the tiled entropy terms (median over 4 seeds)",
        "",
        *common.meta_lines(meta),
        f"- baseline: {args.baseline_src}",
        "",
        *common.md_table(
            [
                "term",
                "batch",
                "dense fp32",
                "baseline tiled fp32",
                "tiled fp32",
                "fp32-logits floor",
            ],
            rows,
        ),
    ]
    common.write_results(
        Path(args.out_dir), "entropy_precision", {"meta": meta, "results": results}, md
    )
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
