"""CPU benchmark of vqkit's ResidualVQ and FSQ against vector-quantize-pytorch (vqp).

Compared layers (training mode for both libraries):

* RVQ, Q=4 stages of K codes in D dims: vqkit ``ResidualVQ(4, K, D, stage="ema")``
  and ``stage="vq"`` (``channels_last=True``) against vqp ``ResidualVQ(dim=D,
  num_quantizers=4, codebook_size=K)`` (its default EMA codebooks). All three get
  the same codebooks (stage i: ``randn(K, D) * 0.5**i``).
* FSQ with levels [8, 5, 5, 5]: vqkit ``FSQ(levels, channels_last=True)`` against
  vqp ``FSQ(levels=levels)`` on (1, N, 4), and both with a linear projection
  from D=64 (``FSQ(levels, dim=64)``; vqp gets vqkit's projection weights).

Two modes per layer: ``fwd`` (training-mode forward, input without grad; EMA
codebooks are updated, graphs for trainable parameters are built) and
``fwd_bwd`` (input requires grad; forward, then ``(loss + quantized.sum())
.backward()``).

Every (shape, method, mode) runs in its own child process under an address-space
cap, with the timing and memory protocol of ``benchmarks.common`` (the one of
``bench_search``): one warm-up call, then ``--repeats`` timed calls (fewer if
they exceed ``--time-budget``); peak extra memory = VmHWM - VmRSS baseline, the
peak counter reset after the inputs and modules are built.

Agreement checks (in the vqkit workers, on fresh modules, after timing):

* FSQ without projection: fraction of quantized values / index rows equal to vqp's
  on the same input (both use the bound ``tanh(z + shift) * half_l - offset``;
  float rounding may differ at level boundaries: reported, not forced);
* FSQ with projection: the same after copying vqkit's projections into vqp;
* RVQ: eval-mode indices of vqkit ``encode`` vs vqp on the same codebooks (all
  4 stages equal per row, and stage 1 alone), and the max |quantized difference|.

Writes ``<out-dir>/quantizers_cpu.{json,md}``; ``<out-dir>`` defaults to
``benchmarks/results/quantizers_cpu/`` (``quantizers_cpu_quick/`` with ``--quick``).
Usage, from the repository root::

    python -m benchmarks.bench_quantizers --quick          # smoke test, tiny shapes
    python -m benchmarks.bench_quantizers                  # R1,R2,F1,F2, everything
    python -m benchmarks.bench_quantizers --shapes R1 --methods vqkit_rvq_ema,vqp_rvq \\
        --out-dir benchmarks/results/quantizers_cpu_r1_subset
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks import common
from benchmarks.common import fmt

MODULE = "benchmarks.bench_quantizers"
LEVELS = [8, 5, 5, 5]
NUM_QUANTIZERS = 4
# name: (family, N, D, K, note); K is None for FSQ (grid of prod(LEVELS) codes);
# FSQ without projection takes len(LEVELS) input channels, the projected variants D.
SHAPES: dict[str, tuple[str, int, int, int | None, str]] = {
    "R1": ("rvq", 32768, 64, 1024, ""),
    "R2": ("rvq", 131072, 64, 1024, ""),
    "F1": ("fsq", 32768, 64, None, ""),
    "F2": ("fsq", 262144, 64, None, ""),
}
QUICK_SHAPES: dict[str, tuple[str, int, int, int | None, str]] = {
    "QR": ("rvq", 2048, 16, 64, "smoke test"),
    "QF": ("fsq", 4096, 16, None, "smoke test"),
}
ALL_SHAPES = {**SHAPES, **QUICK_SHAPES}

# name: (family, library, description)
METHODS: dict[str, tuple[str, str, str]] = {
    "vqkit_rvq_ema": (
        "rvq",
        "vqkit",
        'vqkit.ResidualVQ(4, K, D, stage="ema", channels_last=True) on (1, N, D)',
    ),
    "vqkit_rvq_vq": (
        "rvq",
        "vqkit",
        'vqkit.ResidualVQ(4, K, D, stage="vq", channels_last=True) on (1, N, D)',
    ),
    "vqp_rvq": (
        "rvq",
        "vqp",
        "vector_quantize_pytorch.ResidualVQ(dim=D, num_quantizers=4, "
        "codebook_size=K) (default EMA codebooks) on (1, N, D)",
    ),
    "vqkit_fsq": ("fsq", "vqkit", "vqkit.FSQ([8,5,5,5], channels_last=True) on (1, N, 4)"),
    "vqp_fsq": ("fsq", "vqp", "vector_quantize_pytorch.FSQ(levels=[8,5,5,5]) on (1, N, 4)"),
    "vqkit_fsq_proj": (
        "fsq",
        "vqkit",
        "vqkit.FSQ([8,5,5,5], dim=64, channels_last=True) on (1, N, 64)",
    ),
    "vqp_fsq_proj": (
        "fsq",
        "vqp",
        "vector_quantize_pytorch.FSQ(levels=[8,5,5,5], dim=64) on (1, N, 64)",
    ),
}
# vqkit method -> the vqp method it is compared with
BASELINE = {
    "vqkit_rvq_ema": "vqp_rvq",
    "vqkit_rvq_vq": "vqp_rvq",
    "vqkit_fsq": "vqp_fsq",
    "vqkit_fsq_proj": "vqp_fsq_proj",
}
MODES = ("fwd", "fwd_bwd")
# --quick: the tiny shapes, one vqkit layer and its vqp baseline per family, forward
# only (the fwd workers of vqkit layers also run the agreement check), 2 repeats
QUICK_METHODS = ("vqkit_rvq_ema", "vqp_rvq", "vqkit_fsq_proj", "vqp_fsq_proj")
QUICK_MODES = ("fwd",)
SEED = 0
CHECK_ROWS = 8192


# --------------------------------------------------------------------------- child


def _input_dim(method: str, d: int) -> int:
    return len(LEVELS) if method in ("vqkit_fsq", "vqp_fsq") else d


def _codebooks(k: int, d: int):
    """The stages' shared starting codebooks: stage i is randn(K, D) * 0.5**i."""
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    return [torch.randn(k, d, generator=g) * 0.5**i for i in range(NUM_QUANTIZERS)]


def _build(method: str, d: int, k: int | None):
    """The module for ``method``, with the shared codebooks / projections set."""
    import torch

    torch.manual_seed(SEED)
    if method in ("vqkit_rvq_ema", "vqkit_rvq_vq"):
        from vqkit import ResidualVQ

        stage = "ema" if method == "vqkit_rvq_ema" else "vq"
        m = ResidualVQ(NUM_QUANTIZERS, k, d, stage=stage, channels_last=True)
        with torch.no_grad():
            for i, w in enumerate(_codebooks(k, d)):
                m.stage(i).codebook.copy_(w)
                if stage == "ema":
                    m.stage(i).reset_statistics()
        return m
    if method == "vqp_rvq":
        from vector_quantize_pytorch import ResidualVQ

        m = ResidualVQ(dim=d, num_quantizers=NUM_QUANTIZERS, codebook_size=k)
        with torch.no_grad():
            for layer, w in zip(m.layers, _codebooks(k, d), strict=True):
                cb = layer._codebook
                cb.embed.copy_(w.view_as(cb.embed))
                if hasattr(cb, "embed_avg"):
                    cb.embed_avg.copy_(w.view_as(cb.embed_avg))
        return m
    if method in ("vqkit_fsq", "vqkit_fsq_proj"):
        from vqkit import FSQ

        return FSQ(LEVELS, dim=d if method == "vqkit_fsq_proj" else None, channels_last=True)
    if method in ("vqp_fsq", "vqp_fsq_proj"):
        from vector_quantize_pytorch import FSQ

        if method == "vqp_fsq":
            return FSQ(levels=LEVELS)
        m = FSQ(levels=LEVELS, dim=d)
        # same projections as vqkit's FSQ(levels, dim=d) built under the same seed
        ref = _build("vqkit_fsq_proj", d, k)
        with torch.no_grad():
            m.project_in.weight.copy_(ref.project_in.weight)
            m.project_in.bias.copy_(ref.project_in.bias)
            m.project_out.weight.copy_(ref.project_out.weight)
            m.project_out.bias.copy_(ref.project_out.bias)
        return m
    raise ValueError(f"unknown method {method!r}")


def _call(method: str, module, x):
    """(quantized, scalar loss, indices) of one forward, whatever the library."""
    import torch

    lib = METHODS[method][1]
    if lib == "vqkit":
        o = module(x)
        return o.quantized, o.loss, o.indices
    if METHODS[method][0] == "rvq":
        quant, idx, loss = module(x)
        return quant, loss.sum(), idx
    quant, idx = module(x)
    return quant, torch.zeros(()), idx


def _setup(method: str, mode: str, n: int, d: int, k: int | None):
    """Returns (run, cleanup): the timed call and the untimed reset after it."""
    import torch

    d_in = _input_dim(method, d)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(1, n, d_in, generator=g)
    module = _build(method, d, k)
    module.train()
    if mode == "fwd":

        def run() -> None:
            _call(method, module, x)

        def cleanup() -> None:
            pass

        return run, cleanup

    xg = x.clone().requires_grad_(True)

    def run() -> None:
        quant, loss, _ = _call(method, module, xg)
        (loss + quant.sum()).backward()

    def cleanup() -> None:
        xg.grad = None
        module.zero_grad(set_to_none=True)

    return run, cleanup


def _check(method: str, n: int, d: int, k: int | None) -> dict:
    """Agreement of a vqkit method with its vqp baseline on fresh modules (eval)."""
    import torch

    base = BASELINE[method]
    rows = min(CHECK_ROWS, n)
    d_in = _input_dim(method, d)
    x = torch.randn(1, n, d_in, generator=torch.Generator().manual_seed(SEED))[:, :rows]
    ours, theirs = _build(method, d, k).eval(), _build(base, d, k).eval()
    with torch.no_grad():
        q_ours, _, i_ours = _call(method, ours, x)
        q_theirs, _, i_theirs = _call(base, theirs, x)
    i_ours = i_ours.reshape(rows, -1).long()
    i_theirs = i_theirs.reshape(rows, -1).long()
    q_ours, q_theirs = q_ours.reshape(rows, -1), q_theirs.reshape(rows, -1)
    rec = {
        "check_against": base,
        "check_rows": rows,
        "index_rows_equal": float((i_ours == i_theirs).all(dim=1).double().mean()),
        "quantized_max_abs_diff": float((q_ours - q_theirs).abs().max()),
    }
    if METHODS[method][0] == "rvq":
        rec["stage1_index_equal"] = float((i_ours[:, 0] == i_theirs[:, 0]).double().mean())
    else:
        rec["quantized_values_equal"] = float((q_ours == q_theirs).double().mean())
    return rec


def _worker(args: argparse.Namespace) -> int:
    common.cap_address_space(args.mem_cap_gib)
    shape, method, mode = args.worker
    family, n, d, k, _ = ALL_SHAPES[shape]
    rec: dict = {
        "shape": shape,
        "method": method,
        "mode": mode,
        "N": n,
        "D": _input_dim(method, d),
        "K": k,
        "mem_cap_gib": args.mem_cap_gib,
    }
    try:
        rec.update(common.torch_setup(args.threads))
        run, cleanup = _setup(method, mode, n, d, k)
    except ImportError as e:
        return common.emit({**rec, "status": "skipped", "error": f"{type(e).__name__}: {e}"})
    except (RuntimeError, MemoryError) as e:
        return common.emit({**rec, **common.error_fields(e, "setup")})

    rec.update(common.measure(run, cleanup, args.repeats, args.time_budget))
    # One agreement check per (shape, vqkit method): in the fwd worker.
    if rec["status"] == "ok" and method in BASELINE and mode == "fwd" and not args.no_check:
        try:
            rec["check"] = _check(method, n, d, k)
        except ImportError as e:
            rec["check_error"] = f"{type(e).__name__}: {e}"
        except (RuntimeError, MemoryError, AssertionError) as e:
            rec["check_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return common.emit(rec)


# --------------------------------------------------------------------------- parent


def _run_worker(shape: str, method: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = common.child_cmd(MODULE, "--worker", shape, method, mode, *common.child_args(args))
    _, n, d, k, _ = ALL_SHAPES[shape]
    base = {
        "shape": shape,
        "method": method,
        "mode": mode,
        "N": n,
        "D": _input_dim(method, d),
        "K": k,
        "loadavg_before": os.getloadavg(),
    }
    return common.run_child(cmd, base, args.timeout)


def _shape_title(shape: str) -> str:
    family, n, d, k, note = ALL_SHAPES[shape]
    if family == "rvq":
        t = f"{shape}: ResidualVQ, N={n}, D={d}, K={k}, Q={NUM_QUANTIZERS}"
    else:
        t = f"{shape}: FSQ {LEVELS}, N={n} (projected variants: D={d})"
    return t + (f" - {note}" if note else "")


def _summarise(records: list[dict], shapes: list[str]) -> list[str]:
    by = {(r["shape"], r["method"], r["mode"]): r for r in records}

    def med(shape: str, method: str, mode: str) -> float | None:
        r = by.get((shape, method, mode))
        return r.get("median_s") if r and r.get("status") == "ok" else None

    lines: list[str] = []
    for shape in shapes:
        rows: list[list[str]] = []
        checks: list[str] = []
        for r in records:
            if r["shape"] != shape:
                continue
            ok = r.get("status") == "ok"
            m = r.get("median_s") if ok else None
            ratio = None
            if m and r["method"] in BASELINE:
                b = med(shape, BASELINE[r["method"]], r["mode"])
                ratio = m / b if b else None
            status = r.get("status", "?")
            if status != "ok" and r.get("error"):
                status += f": {r['error'][:60]}"
            rows.append(
                [
                    r["method"],
                    r["mode"],
                    str(len(r.get("times_s") or [])),
                    fmt(m, ".3f"),
                    fmt(r.get("min_s") if ok else None, ".3f"),
                    fmt(ratio, ".2f"),
                    fmt(r.get("peak_extra_mib") if ok else None, ",.0f"),
                    status,
                ]
            )
            c = r.get("check")
            if c:
                s = (
                    f"- {r['method']} vs {c['check_against']} (eval, first {c['check_rows']} "
                    f"rows): index rows equal {c['index_rows_equal']:.4f}"
                )
                if "stage1_index_equal" in c:
                    s += f", stage-1 indices equal {c['stage1_index_equal']:.4f}"
                if "quantized_values_equal" in c:
                    s += f", quantized values equal {c['quantized_values_equal']:.4f}"
                s += f", max |quantized diff| {c['quantized_max_abs_diff']:.3g}"
                checks.append(s)
            elif r.get("check_error"):
                checks.append(f"- {r['method']}: check failed: {r['check_error'][:120]}")
        lines += [f"### {_shape_title(shape)}", ""]
        lines += common.md_table(
            [
                "method",
                "mode",
                "timed calls",
                "median s",
                "min s",
                "vqkit / vqp",
                "peak extra MiB",
                "status",
            ],
            rows,
            "llrrrrrl",
        )
        lines += [""] + (["Agreement:", ""] + checks + [""] if checks else [])
    return lines


def _write(out_dir: Path, stem: str, meta: dict, records: list[dict], shapes: list[str]) -> None:
    st = meta["settings"]
    head = [
        "# ResidualVQ and FSQ benchmark (CPU): vqkit vs vector-quantize-pytorch",
        "",
        *common.meta_lines(
            meta,
            ("torch", "vector-quantize-pytorch", "vqkit"),
            f"; torch threads per worker: {st['threads']}",
        ),
        f"- settings: up to {st['repeats']} timed repeats after 1 warm-up (timed calls stop "
        f"after {st['time_budget_s']:.0f} s), memory cap {st['mem_cap_gib']} GiB (RLIMIT_AS) "
        f"per worker, timeout {st['timeout_s']} s per worker",
        "- training mode for both libraries; `fwd`: forward only, input without grad (EMA "
        "updates run, graphs of trainable parameters are built); `fwd_bwd`: input requires "
        "grad, forward + `(loss + quantized.sum()).backward()`",
        "- vqkit / vqp: ratio of medians against the vqp layer of the same kind and mode; "
        "peak extra = VmHWM - VmRSS baseline (inputs and modules built)",
    ]
    if meta.get("note"):
        head.append(f"- note: {meta['note']}")
    common.write_results(
        out_dir, stem, {**meta, "results": records}, head + [""] + _summarise(records, shapes)
    )


def _parent(args: argparse.Namespace) -> int:
    shapes = common.parse_list(
        args.shapes, QUICK_SHAPES if args.quick else SHAPES, ALL_SHAPES, "shape"
    )
    methods = common.parse_list(
        args.methods, QUICK_METHODS if args.quick else METHODS, METHODS, "method"
    )
    modes = common.parse_list(args.modes, QUICK_MODES if args.quick else MODES, MODES, "mode")
    out_dir = Path(args.out_dir) if args.out_dir else common.out_dir("quantizers_cpu", args.quick)
    stem = "quantizers_cpu"
    meta = common.run_meta(MODULE, args.note)
    meta["settings"] = {
        **common.child_settings(args),
        "seed": SEED,
        "check_rows": CHECK_ROWS,
        "levels": LEVELS,
        "num_quantizers": NUM_QUANTIZERS,
    }
    meta["methods"] = {m: METHODS[m][2] for m in methods}
    meta["shapes"] = {
        s: dict(zip(("family", "N", "D", "K", "note"), ALL_SHAPES[s], strict=True)) for s in shapes
    }
    jobs = [
        (s, m, mo)
        for s in shapes
        for m in methods
        for mo in modes
        if METHODS[m][0] == ALL_SHAPES[s][0]
    ]
    common.run_jobs(
        jobs,
        lambda shape, method, mode: _run_worker(shape, method, mode, args),
        lambda job: f"{job[0]} {job[1]:15s} {job[2]:7s}",
        lambda records: _write(out_dir, stem, meta, records, shapes),
        meta,
    )
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", help=f"comma list from {','.join(ALL_SHAPES)} (default R1..F2)")
    p.add_argument("--methods", help=f"comma list from {','.join(METHODS)} (default all)")
    p.add_argument("--modes", help="comma list from fwd,fwd_bwd (default both)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: shapes QR,QF, methods {','.join(QUICK_METHODS)}, mode fwd, 2 repeats",
    )
    p.add_argument(
        "--out-dir",
        help="results folder (default benchmarks/results/"
        "quantizers_cpu, quantizers_cpu_quick with --quick)",
    )
    common.add_child_args(p, time_budget=150.0)
    p.add_argument("--no-check", action="store_true", help="skip the agreement checks")
    p.add_argument("--worker", nargs=3, metavar=("SHAPE", "METHOD", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.default_repeats(args)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return _worker(args) if args.worker else _parent(args)


if __name__ == "__main__":
    sys.exit(main())
