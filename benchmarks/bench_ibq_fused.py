"""IBQ's layer (lookup + entropy penalty) forward + backward against the EMA layer, a
dense float32 reference and another checkout of vqkit (``--baseline-src``, e.g. main),
one process per cell, cells interleaved over rounds so that load drifts hit all alike.

    python -m benchmarks.bench_ibq_fused --baseline-src /tmp/h22-main/src \\
        --shapes 2048x16384 16384x16384 --rounds 3

Cells per shape ``N x K`` (D = 64, 1 torch thread, training mode, input (N/64, 64, 8, 8)
requiring grad, ``(out.loss + out.quantized.square().mean()).backward()``):

* ``ibq`` / ``ibq_noent`` (this checkout), ``main_ibq`` / ``main_ibq_noent`` (the
  baseline's), with the entropy penalty (weight 0.05, T 0.01) and without it;
* ``ema``: ``VectorQuantizerEMA(K, 64)``, the one-product floor (its search);
* ``ibq_compiled``: ``ibq`` under ``torch.compile`` (Inductor traces the tile loop and
  fuses each tile's elementwise chain; the compile falls in the warm-up call);
* ``dense_ibq``: the same three MSE terms and entropy penalty written densely (N x K
  logits, softmax, autograd), skipped where one N x K matrix exceeds ``--dense-max-gib``.

Each cell: one warm-up, then ``--repeats`` timed calls (``benchmarks.common.measure``:
median seconds, peak extra RSS). Writes ``benchmarks/results/<--out-dir>/ibq_fused.{md,json}``.
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

MODULE = "benchmarks.bench_ibq_fused"
METHODS = (
    "ema",
    "ibq",
    "main_ibq",
    "ibq_noent",
    "main_ibq_noent",
    "ibq_compiled",
    "dense_ibq",
)
D = 64


def _dense_module(k: int):
    import torch
    import torch.nn.functional as F

    class DenseIBQ(torch.nn.Module):
        """IBQ's loss and output with the N x K logits materialised (autograd)."""

        def __init__(self) -> None:
            super().__init__()
            self.codebook = torch.nn.Parameter(torch.randn(k, D))

        def forward(self, x):
            flat = x.movedim(1, -1).reshape(-1, D)
            e = self.codebook
            s = flat @ e.t()
            p = s.softmax(1)
            idx = s.argmax(1)
            hard = F.embedding(idx, e)
            q = hard + p @ e - (p @ e).detach()
            mse = (flat.detach() - hard).pow(2).mean() + 0.25 * (flat - hard.detach()).pow(2).mean()
            logp = torch.log_softmax(s / 0.01, 1)
            per = -(logp.exp() * logp).sum(1).mean()
            big_p = logp.exp().mean(0)
            batch = -(big_p * big_p.clamp(min=1e-38).log()).sum()
            loss = mse + (q - flat).pow(2).mean() + 0.05 * (per - batch)
            return loss, q

    return DenseIBQ()


def _worker(method: str, n: int, k: int, repeats: int, budget: float) -> dict:
    import torch

    common.torch_setup(1)
    torch.manual_seed(0)
    x = torch.randn(n // 64, D, 8, 8, requires_grad=True)
    if method == "dense_ibq":
        mod = _dense_module(k).train()

        def run() -> None:
            loss, q = mod(x)
            (loss + q.square().mean()).backward()
    else:
        from vqkit import IBQ, VectorQuantizerEMA

        if method == "ema":
            mod = VectorQuantizerEMA(k, D).train()
        else:
            noent = method.endswith("noent")
            mod = IBQ(k, D, entropy_weight=0.0 if noent else 0.05).train()
            if method == "ibq_compiled":
                mod = torch.compile(mod)

        def run() -> None:
            out = mod(x)
            (out.loss + out.quantized.square().mean()).backward()

    def cleanup() -> None:
        x.grad = None
        mod.zero_grad(set_to_none=True)

    rec = common.measure(run, cleanup, repeats, budget)
    rec["vqkit_src"] = common.vqkit_path()
    return rec


def _cell(method: str, n: int, k: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    src = args.baseline_src if method.startswith("main_") else str(common.REPO_ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, str(common.REPO_ROOT)])
    cmd = [sys.executable, "-m", MODULE, "--worker", method, str(n), str(k)]
    cmd += ["--repeats", str(args.repeats), "--time-budget", str(args.time_budget)]
    try:
        res = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"status": "error", "error": res.stderr[-600:]}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["2048x16384"], help="N x K cells")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--baseline-src", help="src/ of the checkout the main_* cells import")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--time-budget", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--dense-max-gib", type=float, default=1.0)
    p.add_argument("--out-dir", default=str(common.out_dir("ibq_fused")))
    p.add_argument("--note")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        method, n, k = args.worker
        rec = _worker(method, int(n), int(k), args.repeats, args.time_budget)
        print(json.dumps(rec))
        return 0
    methods = [m for m in args.methods if args.baseline_src or not m.startswith("main_")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    meta = common.run_meta(MODULE, args.note, argv)
    records: list[dict] = []
    for r in range(args.rounds):
        for n, k in shapes:
            for m in methods:
                if m == "dense_ibq" and n * k * 4 / 2**30 > args.dense_max_gib:
                    continue
                rec = _cell(m, n, k, args)
                rec.update(method=m, n=n, k=k, round=r)
                records.append(rec)
                print(
                    json.dumps(
                        {
                            x: rec.get(x)
                            for x in (
                                "method",
                                "n",
                                "k",
                                "round",
                                "status",
                                "times_s",
                                "peak_extra_mib",
                            )
                        }
                    ),
                    flush=True,
                )
    common.finish_meta(meta)
    rows = []
    for n, k in shapes:
        med = {}
        for m in methods:
            ts = [
                t
                for rc in records
                if (rc["method"], rc["n"], rc["k"]) == (m, n, k) and rc.get("status") == "ok"
                for t in [statistics.median(rc["times_s"])]
                if rc.get("times_s")
            ]
            peaks = [
                rc["peak_extra_mib"]
                for rc in records
                if (rc["method"], rc["n"], rc["k"]) == (m, n, k) and rc.get("status") == "ok"
            ]
            med[m] = (statistics.median(ts) if ts else None, max(peaks) if peaks else None, len(ts))
        ema = med.get("ema", (None,))[0]
        for m in methods:
            t, peak, cnt = med[m]
            rows.append(
                [
                    f"{n} x {k}",
                    m,
                    common.fmt(t * 1e3 if t else None, ".0f"),
                    common.fmt(t / ema if t and ema else None, ".2f"),
                    common.fmt(peak, ".0f"),
                    str(cnt),
                ]
            )
    table = common.md_table(
        [
            "N x K",
            "cell",
            "ms fwd+bwd (median of rounds)",
            "ratio to ema",
            "peak extra MiB",
            "rounds",
        ],
        rows,
    )
    md = [
        "# IBQ layer, fused lookup + entropy (CPU, 1 thread)",
        "",
        *common.meta_lines(meta),
        "",
        *table,
    ]
    common.write_results(Path(args.out_dir), "ibq_fused", {"meta": meta, "records": records}, md)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
