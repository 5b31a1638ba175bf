"""CPU benchmark of the tokenizer quantizers at K = 2^14, 2^16, 2^18 codes: vqkit's LFQ,
BSQ, SimVQ and IBQ against vector-quantize-pytorch 1.32 (vqp) and a dense IBQ.

Every cell is a training-mode forward and ``(loss + quantized.sum()).backward()`` on
N = 16384 rows with an input that requires grad:

* LFQ / BSQ with d = 14, 16, 18 bits (input (1, N, d), no projections): vqkit
  ``LFQ(d)`` (exact batch entropy, tiled), ``BSQ(d)`` (the paper's per-bit factorised
  batch entropy) and ``BSQ(d, entropy_group_size=d)`` (exact) against vqp
  ``LFQ(dim=d)`` and ``LFQ(dim=d, spherical=True)`` with their entropy losses (dense
  N x K probabilities), commitment weight 0.25 everywhere;
* SimVQ / IBQ with K codes of D = 64 dims (input (1, N, 64)): vqkit ``SimVQ(K, 64)``
  (tiled search) against vqp ``SimVQ(dim=64, codebook_size=K, rotation_trick=False)``
  (``torch.cdist``, N x K), and vqkit ``IBQ(K, 64)`` (tiled straight-through softmax)
  against ``dense_ibq``, the reference code's formula ``(onehot + p - sg[p]) @ E`` with
  the same three loss terms.

Each (shape, method) runs in its own child process under an address-space cap (default
14 GiB; one N x K fp32 matrix is 16 GiB at 2^18), with the timing and memory protocol of
``benchmarks.common`` (the one of ``bench_search``): one warm-up, then up to ``--repeats``
timed calls within ``--time-budget``; peak extra memory = VmHWM - VmRSS baseline (inputs
and modules built). Target: peak extra <= 1/8 of one N x K fp32 matrix for every vqkit
cell, and at 2^14 vqkit faster than its peer on the same quantizer.

``--cold SHAPE:METHOD,...`` measures those cells by ONE cold call instead (same memory
protocol, no warm-up; for cells too slow for two calls within the time budget), and
``--resume`` continues an interrupted run: the records already in the results file are
kept (except timeouts and crashes) and only the missing cells run.

Usage::

    python -m benchmarks.bench_large_codebooks --quick      # smoke test, tiny shapes
    python -m benchmarks.bench_large_codebooks              # K14, K16, K18
    python -m benchmarks.bench_large_codebooks --shapes K14 --methods vqkit_ibq,dense_ibq
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import check_choices, fmt, measure, run_child, run_jobs

MODULE = "benchmarks.bench_large_codebooks"

N_ROWS = 16384
DIM = 64
# name: (N, bits, note); K = 2^bits (SimVQ / IBQ: K codes of DIM dims)
SHAPES: dict[str, tuple[int, int, str]] = {
    "K14": (N_ROWS, 14, "one N x K fp32 matrix = 1 GiB"),
    "K16": (N_ROWS, 16, "one N x K fp32 matrix = 4 GiB"),
    "K18": (N_ROWS, 18, "one N x K fp32 matrix = 16 GiB"),
}
QUICK_SHAPES: dict[str, tuple[int, int, str]] = {"Q8": (2048, 8, "smoke test")}
ALL_SHAPES = {**SHAPES, **QUICK_SHAPES}

# name: (family, description)
METHODS: dict[str, tuple[str, str]] = {
    "vqkit_lfq": ("binary", "vqkit.LFQ(d, channels_last=True): exact tiled batch entropy"),
    "vqp_lfq": ("binary", "vqp LFQ(dim=d, entropy_loss_weight=0.1, commitment 0.25)"),
    "vqkit_bsq": ("binary", "vqkit.BSQ(d, channels_last=True): factorised batch entropy"),
    "vqkit_bsq_exact": ("binary", "vqkit.BSQ(d, entropy_group_size=d): exact batch entropy"),
    "vqp_bsq": ("binary", "vqp LFQ(dim=d, spherical=True, ...) (exact, dense N x K)"),
    "vqkit_simvq": ("codebook", "vqkit.SimVQ(K, 64, channels_last=True): tiled search"),
    "vqp_simvq": ("codebook", "vqp SimVQ(dim=64, codebook_size=K, rotation_trick=False)"),
    "vqkit_ibq": ("codebook", "vqkit.IBQ(K, 64, entropy off): tiled, online softmax"),
    "dense_ibq": ("codebook", "dense IBQ: (onehot + p - sg[p]) @ E, N x K logits"),
}
PEER = {
    "vqkit_lfq": "vqp_lfq",
    "vqkit_bsq": "vqp_bsq",
    "vqkit_bsq_exact": "vqp_bsq",
    "vqkit_simvq": "vqp_simvq",
    "vqkit_ibq": "dense_ibq",
}
SEED = 0
CHECK_ROWS = 512


# --------------------------------------------------------------------------- child


class DenseIBQ:
    """The IBQ reference code's forward, dense: logits (N, K), softmax, hard one-hot."""

    def __init__(self, k: int, d: int) -> None:
        import torch

        g = torch.Generator().manual_seed(SEED + 1)
        self.codebook = torch.randn(k, d, generator=g).mul_(0.1).requires_grad_(True)

    def __call__(self, x):
        import torch
        import torch.nn.functional as F

        e = self.codebook
        flat = x.reshape(-1, e.shape[1])
        logits = flat @ e.t()
        p = logits.softmax(1)
        idx = logits.argmax(1)
        hard = torch.zeros_like(logits).scatter_(1, idx.unsqueeze(1), 1.0)
        q = (hard - p.detach() + p) @ e
        hard_q = F.embedding(idx, e)
        loss = (
            F.mse_loss(hard_q, flat.detach())
            + 0.25 * F.mse_loss(flat, hard_q.detach())
            + F.mse_loss(q, flat)
        )
        return q.reshape(x.shape), loss, idx

    def zero_grad(self) -> None:
        self.codebook.grad = None


def _build(method: str, bits: int):
    import torch

    k = 2**bits
    torch.manual_seed(SEED)
    if method == "vqkit_lfq":
        from vqkit import LFQ

        return LFQ(bits, channels_last=True)
    if method in ("vqkit_bsq", "vqkit_bsq_exact"):
        from vqkit import BSQ

        group = bits if method == "vqkit_bsq_exact" else 1
        return BSQ(bits, channels_last=True, entropy_group_size=group)
    if method in ("vqp_lfq", "vqp_bsq"):
        from vector_quantize_pytorch import LFQ

        return LFQ(
            dim=bits,
            entropy_loss_weight=0.1,
            commitment_loss_weight=0.25,
            spherical=method == "vqp_bsq",
        )
    if method == "vqkit_simvq":
        from vqkit import SimVQ

        return SimVQ(k, DIM, channels_last=True)
    if method == "vqp_simvq":
        from vector_quantize_pytorch import SimVQ

        return SimVQ(dim=DIM, codebook_size=k, rotation_trick=False)
    if method == "vqkit_ibq":
        from vqkit import IBQ

        m = IBQ(k, DIM, channels_last=True, entropy_weight=0.0)  # as dense_ibq: lookup only
        with torch.no_grad():
            m.codebook.copy_(DenseIBQ(k, DIM).codebook)  # the same codes as dense_ibq
        return m
    if method == "dense_ibq":
        return DenseIBQ(k, DIM)
    raise ValueError(f"unknown method {method!r}")


def _call(method: str, module, x):
    """(quantized, scalar loss) of one training forward, whatever the library."""
    if method.startswith("vqkit"):
        o = module(x)
        return o.quantized, o.loss
    if method == "dense_ibq":
        q, loss, _ = module(x)
        return q, loss
    quant, _, loss = module(x)
    return quant, loss.sum()


def _setup(method: str, n: int, bits: int):
    import torch

    d = bits if METHODS[method][0] == "binary" else DIM
    x = torch.randn(1, n, d, generator=torch.Generator().manual_seed(SEED))
    xg = x.requires_grad_(True)
    module = _build(method, bits)
    if hasattr(module, "train"):
        module.train()

    def run() -> None:
        quant, loss = _call(method, module, xg)
        (loss + quant.sum()).backward()

    def cleanup() -> None:
        xg.grad = None
        module.zero_grad()

    return run, cleanup


def _check_ibq(n: int, bits: int) -> dict:
    """vqkit IBQ vs the dense formula on the first rows: indices, input and code grads."""
    import torch

    x = torch.randn(1, n, DIM, generator=torch.Generator().manual_seed(SEED))[:, :CHECK_ROWS]
    ours, dense = _build("vqkit_ibq", bits), _build("dense_ibq", bits)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    oa = ours.train()(xa)
    qb, lb, ib = dense(xb)
    (oa.loss + oa.quantized.sum()).backward()
    (lb + qb.sum()).backward()
    return {
        "check_rows": CHECK_ROWS,
        "indices_equal": float((oa.indices.reshape(-1) == ib).double().mean()),
        "x_grad_max_abs_diff": float((xa.grad - xb.grad).abs().max()),
        "codebook_grad_max_abs_diff": float((ours.codebook.grad - dense.codebook.grad).abs().max()),
    }


def measure_cold(run) -> dict:
    """One cold call, with ``measure``'s memory protocol (RSS baseline after the setup,
    VmHWM reset), for cells too slow for a warm-up and a timed call."""
    import gc

    gc.collect()
    common.malloc_trim()
    base_kib = common.status_kib("VmRSS")
    common.reset_hwm()
    try:
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
    except (RuntimeError, MemoryError) as e:
        peak = common.status_kib("VmHWM")
        return {**common.error_fields(e, "run"), "peak_extra_mib": (peak - base_kib) / 1024}
    peak_kib = common.status_kib("VmHWM")
    return {
        "status": "ok",
        "cold_single_call": True,
        "times_s": [dt],
        "median_s": statistics.median([dt]),
        "min_s": dt,
        "baseline_rss_mib": base_kib / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "peak_extra_mib": (peak_kib - base_kib) / 1024,
    }


def _worker(args: argparse.Namespace) -> int:
    common.cap_address_space(args.mem_cap_gib)
    shape, method = args.worker
    n, bits, _ = ALL_SHAPES[shape]
    rec: dict = {
        "shape": shape,
        "method": method,
        "N": n,
        "K": 2**bits,
        "mem_cap_gib": args.mem_cap_gib,
    }

    def emit(**kw) -> int:
        rec.update(kw)
        return common.emit(rec)

    try:
        rec.update(common.torch_setup(args.threads))
        run, cleanup = _setup(method, n, bits)
    except ImportError as e:
        return emit(status="skipped", error=f"{type(e).__name__}: {e}")
    except (RuntimeError, MemoryError) as e:
        return emit(**common.error_fields(e, "setup"))
    if args.cold_call:
        rec.update(measure_cold(run))
    else:
        rec.update(measure(run, cleanup, args.repeats, args.time_budget))
    if rec["status"] == "ok" and method == "vqkit_ibq" and not args.no_check:
        try:
            rec["check"] = _check_ibq(n, bits)
        except (RuntimeError, MemoryError) as e:
            rec["check_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return emit()


# --------------------------------------------------------------------------- parent


def _run_worker(shape: str, method: str, args: argparse.Namespace) -> dict:
    cmd = common.child_cmd(MODULE, "--worker", shape, method, *common.child_args(args))
    if f"{shape}:{method}" in (args.cold.split(",") if args.cold else []):
        cmd.append("--cold-call")
    n, bits, _ = ALL_SHAPES[shape]
    base = {
        "shape": shape,
        "method": method,
        "N": n,
        "K": 2**bits,
        "loadavg_before": os.getloadavg(),
    }
    return run_child(cmd, base, args.timeout)


def _summarise(records: list[dict], shapes: list[str]) -> tuple[list[dict], list[str]]:
    by = {(r["shape"], r["method"]): r for r in records}
    lines = [
        "| K | method | median s | peak extra MiB | / (N x K fp32) | vqkit / peer | status |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    targets: list[dict] = []
    for shape in shapes:
        n, bits, _ = ALL_SHAPES[shape]
        nk_mib = n * 2**bits * 4 / 2**20
        for r in (r for r in records if r["shape"] == shape):
            ok = r.get("status") == "ok"
            med, peak = r.get("median_s") if ok else None, r.get("peak_extra_mib")
            peer = by.get((shape, PEER.get(r["method"], "")))
            ratio = None
            if med and peer and peer.get("status") == "ok":
                ratio = med / peer["median_s"]
            status = r.get("status", "?")
            if r.get("cold_single_call"):
                status += " (1 cold call)"
            if status == "skipped_by_plan":
                status = "not run: " + r.get("error", "")
            lines.append(
                f"| 2^{bits} | {r['method']} | {fmt(med, '.3f')} "
                f"| {fmt(peak if ok else None, ',.0f')} "
                f"| {fmt(peak / nk_mib if ok and peak is not None else None, '.4f')} "
                f"| {fmt(ratio, '.3f')} | {status.replace('|', '/')} |"
            )
            if r["method"] in PEER and ok and peak is not None:
                targets.append(
                    {
                        "K": 2**bits,
                        "method": r["method"],
                        "target": "peak extra <= 1/8 N x K",
                        "value": round(peak / nk_mib, 4),
                        "met": peak / nk_mib <= 0.125,
                    }
                )
                if bits == 14 or shape in QUICK_SHAPES:
                    targets.append(
                        {
                            "K": 2**bits,
                            "method": r["method"],
                            "target": f"faster than {PEER[r['method']]}",
                            "value": None if ratio is None else round(ratio, 3),
                            "met": None if ratio is None else ratio < 1.0,
                        }
                    )
    tl = ["", "| K | method | target | value | met |", "|---|---|---|---:|---|"]
    for t in targets:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        tl.append(f"| {t['K']} | {t['method']} | {t['target']} | {t['value']} | {met} |")
    checks = [
        f"- {r['shape']} vqkit_ibq vs dense_ibq (first {r['check']['check_rows']} rows): "
        f"indices equal {r['check']['indices_equal']:.4f}, max |dx| "
        f"{r['check']['x_grad_max_abs_diff']:.2e}, max |dE| "
        f"{r['check']['codebook_grad_max_abs_diff']:.2e}"
        for r in records
        if "check" in r
    ]
    return targets, lines + tl + ([""] + checks if checks else [])


def _write(out_dir: Path, stem: str, meta: dict, records: list[dict], shapes: list[str]) -> None:
    targets, lines = _summarise(records, shapes)
    s = meta["settings"]
    head = [
        "# Large-codebook quantizers (CPU): vqkit vs vector-quantize-pytorch / dense IBQ",
        "",
        *common.meta_lines(
            meta,
            ("torch", "vector-quantize-pytorch"),
            f"; torch threads per worker: {s['threads']}",
        ),
        f"- N = {N_ROWS} rows; training forward + `(loss + quantized.sum()).backward()`, input "
        f"requires grad; LFQ/BSQ: d = log2 K bits, SimVQ/IBQ: D = {DIM}",
        f"- up to {s['repeats']} timed calls after 1 warm-up (stop after {s['time_budget_s']:.0f}"
        f" s), address-space cap {s['mem_cap_gib']} GiB per worker, timeout {s['timeout_s']} s",
        "- peak extra = VmHWM - VmRSS baseline (inputs, modules built); OOM = the cap was hit",
        "- vqkit_bsq uses the paper's factorised (approximate) batch entropy; vqp_bsq computes "
        "the exact one densely; vqkit_bsq_exact is the like-for-like comparison",
    ]
    if s.get("cold_single_call_cells"):
        head.append(
            f"- measured by one cold call (no warm-up, too slow for two): "
            f"{', '.join(s['cold_single_call_cells'])}"
        )
    for r in meta.get("resumed", []):
        head.append(
            f"- resumed (UTC {r['date_utc']}, commit {r['git_commit']}, load "
            f"{r['loadavg_start'][0]:.2f}): `{r['command']}`"
        )
    if meta.get("note"):
        head.append(f"- note: {meta['note']}")
    common.write_results(
        out_dir, stem, {**meta, "results": records, "targets": targets}, head + [""] + lines
    )


def _parent(args: argparse.Namespace) -> int:
    shapes = (
        args.shapes.split(",")
        if args.shapes
        else (list(QUICK_SHAPES) if args.quick else list(SHAPES))
    )
    methods = args.methods.split(",") if args.methods else list(METHODS)
    skip = set(args.skip.split(",")) if args.skip else set()
    check_choices(shapes, ALL_SHAPES, "shape")
    check_choices(methods, METHODS, "method")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "large_codebooks_quick" if args.quick and not args.shapes else "large_codebooks"
    done: list[dict] = []
    path = out_dir / f"{stem}.json"
    if args.resume and path.exists():
        old = json.loads(path.read_text())
        done = [r for r in old.pop("results") if r.get("status") not in ("timeout", "crash")]
        old.pop("targets", None)
        resumed = common.run_meta(MODULE, args.note)
        old.setdefault("resumed", []).append(
            {k: resumed[k] for k in ("command", "git_commit", "date_utc", "loadavg_start")}
        )
        old.pop("loadavg_end", None)
        meta = old
        shapes = list(dict.fromkeys([*old["shapes"], *shapes]))
        _parent_jobs(args, shapes, methods, skip, out_dir, stem, meta, done)
        return 0
    meta = common.run_meta(MODULE, args.note)
    meta["settings"] = {
        "repeats": args.repeats,
        "mem_cap_gib": args.mem_cap_gib,
        "timeout_s": args.timeout,
        "time_budget_s": args.time_budget,
        "threads": args.threads or "torch default",
        "seed": SEED,
        "skipped_cells": sorted(skip),
        "cold_single_call_cells": sorted(args.cold.split(",")) if args.cold else [],
    }
    meta["methods"] = {m: METHODS[m][1] for m in methods}
    meta["shapes"] = {
        s: {"N": ALL_SHAPES[s][0], "K": 2 ** ALL_SHAPES[s][1], "note": ALL_SHAPES[s][2]}
        for s in shapes
    }
    _parent_jobs(args, shapes, methods, skip, out_dir, stem, meta, [])
    return 0


def _parent_jobs(args, shapes, methods, skip, out_dir, stem, meta, done) -> None:
    """Run the cells not in ``done`` and write ``done`` + the new records after each."""
    have = {(r["shape"], r["method"]) for r in done}
    if args.cold:
        cold = meta["settings"].setdefault("cold_single_call_cells", [])
        cold.extend(c for c in args.cold.split(",") if c not in cold)

    def run(shape: str, method: str) -> dict:
        if f"{shape}:{method}" in skip:
            n, bits, _ = ALL_SHAPES[shape]
            return {
                "shape": shape,
                "method": method,
                "N": n,
                "K": 2**bits,
                "status": "skipped_by_plan",
                "error": args.skip_reason,
                "wall_s": 0.0,
                "loadavg_before": os.getloadavg(),
            }
        return _run_worker(shape, method, args)

    order = {(s, m): i for i, (s, m) in enumerate((s, m) for s in shapes for m in METHODS)}

    def write(records: list[dict]) -> None:
        merged = sorted(done + records, key=lambda r: order.get((r["shape"], r["method"]), 0))
        _write(out_dir, stem, meta, merged, shapes)

    run_jobs(
        [(s, m) for s in shapes for m in methods if (s, m) not in have],
        run,
        lambda job: f"{job[0]} {job[1]:16s}",
        write,
        meta,
    )
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", help=f"comma list from {','.join(ALL_SHAPES)} (default K14..K18)")
    p.add_argument("--methods", help=f"comma list from {','.join(METHODS)} (default all)")
    p.add_argument("--skip", help="comma list of SHAPE:METHOD cells not to run (noted)")
    p.add_argument(
        "--skip-reason",
        default="skipped to keep the run short",
        help="the note recorded for --skip cells",
    )
    common.add_child_args(p, time_budget=20.0, repeats=3)
    p.add_argument("--out-dir", default=str(common.out_dir("large_codebooks")))
    p.add_argument("--quick", action="store_true", help="tiny shape Q8 (smoke test)")
    p.add_argument("--no-check", action="store_true", help="skip the IBQ agreement check")
    p.add_argument("--cold", help="comma list of SHAPE:METHOD cells measured by one cold call")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the records of the results file, run only the missing cells",
    )
    p.add_argument("--cold-call", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return _worker(args) if args.worker else _parent(args)


if __name__ == "__main__":
    sys.exit(main())
