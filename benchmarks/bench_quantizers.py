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
cap, with the timing and memory protocol of ``bench_search.py`` (whose helpers
this script imports): one warm-up call, then ``--repeats`` timed calls (fewer if
they exceed ``--time-budget``); peak extra memory = VmHWM - VmRSS baseline, the
peak counter reset after the inputs and modules are built.

Agreement checks (in the vqkit workers, on fresh modules, after timing):

* FSQ without projection: fraction of quantized values / index rows equal to vqp's
  on the same input (both use the bound ``tanh(z + shift) * half_l - offset``;
  float rounding may differ at level boundaries: reported, not forced);
* FSQ with projection: the same after copying vqkit's projections into vqp;
* RVQ: eval-mode indices of vqkit ``encode`` vs vqp on the same codebooks (all
  4 stages equal per row, and stage 1 alone), and the max |quantized difference|.

Usage::

    python benchmarks/bench_quantizers.py --quick          # smoke test, tiny shapes
    python benchmarks/bench_quantizers.py                  # R1,R2,F1,F2, everything
    python benchmarks/bench_quantizers.py --shapes R1 --methods vqkit_rvq_ema,vqp_rvq
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import (  # noqa: E402  (sibling script, not a package)
    _fmt,
    _is_oom,
    _vqkit_fingerprint,
    check_choices,
    measure,
    run_child,
    run_jobs,
    run_meta,
)

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
    "vqkit_rvq_ema": ("rvq", "vqkit", 'vqkit.ResidualVQ(4, K, D, stage="ema", '
                      "channels_last=True) on (1, N, D)"),
    "vqkit_rvq_vq": ("rvq", "vqkit", 'vqkit.ResidualVQ(4, K, D, stage="vq", '
                     "channels_last=True) on (1, N, D)"),
    "vqp_rvq": ("rvq", "vqp", "vector_quantize_pytorch.ResidualVQ(dim=D, num_quantizers=4, "
                "codebook_size=K) (default EMA codebooks) on (1, N, D)"),
    "vqkit_fsq": ("fsq", "vqkit", "vqkit.FSQ([8,5,5,5], channels_last=True) on (1, N, 4)"),
    "vqp_fsq": ("fsq", "vqp", "vector_quantize_pytorch.FSQ(levels=[8,5,5,5]) on (1, N, 4)"),
    "vqkit_fsq_proj": ("fsq", "vqkit", "vqkit.FSQ([8,5,5,5], dim=64, channels_last=True) "
                       "on (1, N, 64)"),
    "vqp_fsq_proj": ("fsq", "vqp", "vector_quantize_pytorch.FSQ(levels=[8,5,5,5], dim=64) "
                     "on (1, N, 64)"),
}
# vqkit method -> the vqp method it is compared with
BASELINE = {"vqkit_rvq_ema": "vqp_rvq", "vqkit_rvq_vq": "vqp_rvq",
            "vqkit_fsq": "vqp_fsq", "vqkit_fsq_proj": "vqp_fsq_proj"}
MODES = ("fwd", "fwd_bwd")
SEED = 0
CHECK_ROWS = 8192
MIB = 2**20


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
    cap = int(args.mem_cap_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    shape, method, mode = args.worker
    family, n, d, k, _ = ALL_SHAPES[shape]
    rec: dict = {"shape": shape, "method": method, "mode": mode, "N": n,
                 "D": _input_dim(method, d), "K": k, "mem_cap_gib": args.mem_cap_gib}

    def emit(**kw) -> int:
        rec.update(kw)
        print("RESULT " + json.dumps(rec), flush=True)
        return 0

    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        rec["threads"] = torch.get_num_threads()
        rec["vqkit_src"] = _vqkit_fingerprint()
        run, cleanup = _setup(method, mode, n, d, k)
    except ImportError as e:
        return emit(status="skipped", error=f"{type(e).__name__}: {e}")
    except (RuntimeError, MemoryError) as e:
        status = "OOM" if _is_oom(e) else "error"
        return emit(status=status, error=f"{type(e).__name__}: {str(e)[:300]}", phase="setup")

    rec.update(measure(run, cleanup, args.repeats, args.time_budget))
    if rec["status"] != "ok":
        return emit()
    # One agreement check per (shape, vqkit method): in the fwd worker.
    if method in BASELINE and mode == "fwd" and not args.no_check:
        try:
            rec["check"] = _check(method, n, d, k)
        except ImportError as e:
            rec["check_error"] = f"{type(e).__name__}: {e}"
        except (RuntimeError, MemoryError, AssertionError) as e:
            rec["check_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return emit()


# --------------------------------------------------------------------------- parent


def _run_worker(shape: str, method: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", shape, method, mode,
           "--repeats", str(args.repeats), "--mem-cap-gib", str(args.mem_cap_gib),
           "--time-budget", str(args.time_budget)]
    if args.no_check:
        cmd.append("--no-check")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    _, n, d, k, _ = ALL_SHAPES[shape]
    base = {"shape": shape, "method": method, "mode": mode, "N": n,
            "D": _input_dim(method, d), "K": k, "loadavg_before": os.getloadavg()}
    return run_child(cmd, base, args.timeout)


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
        lines += [f"### {_shape_title(shape)}", "",
                  "| method | mode | timed calls | median s | min s | vqkit / vqp | peak extra MiB "
                  "| status |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
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
            lines.append(
                f"| {r['method']} | {r['mode']} | {len(r.get('times_s') or [])} | {_fmt(m, '.3f')}"
                f" | {_fmt(r.get('min_s') if ok else None, '.3f')}"
                f" | {_fmt(ratio, '.2f')}"
                f" | {_fmt(r.get('peak_extra_mib') if ok else None, ',.0f')}"
                f" | {status.replace('|', '/')} |")
            c = r.get("check")
            if c:
                s = (f"- {r['method']} vs {c['check_against']} (eval, first {c['check_rows']} "
                     f"rows): index rows equal {c['index_rows_equal']:.4f}")
                if "stage1_index_equal" in c:
                    s += f", stage-1 indices equal {c['stage1_index_equal']:.4f}"
                if "quantized_values_equal" in c:
                    s += f", quantized values equal {c['quantized_values_equal']:.4f}"
                s += f", max |quantized diff| {c['quantized_max_abs_diff']:.3g}"
                checks.append(s)
            elif r.get("check_error"):
                checks.append(f"- {r['method']}: check failed: {r['check_error'][:120]}")
        lines += [""] + (["Agreement:", ""] + checks + [""] if checks else [])
    return lines


def _write(out_dir: Path, stem: str, meta: dict, records: list[dict], shapes: list[str]) -> None:
    (out_dir / f"{stem}.json").write_text(
        json.dumps({**meta, "results": records}, indent=1) + "\n")
    mach = meta["machine"]
    v = mach["versions"]
    la_s, la_e = meta["loadavg_start"], meta.get("loadavg_end")
    st = meta["settings"]
    head = [
        "# ResidualVQ and FSQ benchmark (CPU): vqkit vs vector-quantize-pytorch",
        "",
        f"- command: `{meta['command']}`",
        f"- git commit: {meta['git_commit']}, date (UTC): {meta['date_utc']}",
        f"- machine: {mach['cpu_model']}, {mach['affinity_cpus']} cores usable, "
        f"{mach['ram_gib']} GiB RAM; torch {v['torch']}, "
        f"vector-quantize-pytorch {v['vector-quantize-pytorch']}, vqkit {v['vqkit']}; "
        f"torch threads per worker: {st['threads']}",
        f"- load average (1/5/15 min) at start: {la_s[0]:.2f}/{la_s[1]:.2f}/{la_s[2]:.2f}"
        + (f", at end: {la_e[0]:.2f}/{la_e[1]:.2f}/{la_e[2]:.2f}" if la_e else " (run incomplete)"),
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
    lines = _summarise(records, shapes)
    (out_dir / f"{stem}.md").write_text("\n".join(head + [""] + lines) + "\n")


def _parent(args: argparse.Namespace) -> int:
    shapes = args.shapes.split(",") if args.shapes else (
        list(QUICK_SHAPES) if args.quick else list(SHAPES))
    methods = args.methods.split(",") if args.methods else list(METHODS)
    modes = args.modes.split(",") if args.modes else list(MODES)
    check_choices(shapes, ALL_SHAPES, "shape")
    check_choices(methods, METHODS, "method")
    check_choices(modes, MODES, "mode")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "quantizers_cpu_quick" if args.quick and not args.shapes else "quantizers_cpu"
    meta = run_meta(args, _dt.datetime.now(_dt.timezone.utc))
    meta["settings"] = {"repeats": args.repeats, "mem_cap_gib": args.mem_cap_gib,
                        "timeout_s": args.timeout, "time_budget_s": args.time_budget,
                        "threads": args.threads or "torch default", "seed": SEED,
                        "check_rows": CHECK_ROWS, "levels": LEVELS,
                        "num_quantizers": NUM_QUANTIZERS}
    meta["methods"] = {m: METHODS[m][2] for m in methods}
    meta["shapes"] = {
        s: dict(zip(("family", "N", "D", "K", "note"), ALL_SHAPES[s], strict=True))
        for s in shapes
    }
    jobs = [(s, m, mo) for s in shapes for m in methods for mo in modes
            if METHODS[m][0] == ALL_SHAPES[s][0]]
    run_jobs(
        jobs,
        lambda shape, method, mode: _run_worker(shape, method, mode, args),
        lambda job: f"{job[0]} {job[1]:15s} {job[2]:7s}",
        lambda records: _write(out_dir, stem, meta, records, shapes),
        meta,
    )
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", help=f"comma list from {','.join(ALL_SHAPES)} (default R1..F2)")
    p.add_argument("--methods", help=f"comma list from {','.join(METHODS)} (default all)")
    p.add_argument("--modes", help="comma list from fwd,fwd_bwd (default both)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up")
    p.add_argument("--time-budget", type=float, default=150.0,
                   help="stop timed repeats once they used this many seconds")
    p.add_argument("--mem-cap-gib", type=float, default=14.0,
                   help="address-space cap per worker (RLIMIT_AS), GiB")
    p.add_argument("--timeout", type=float, default=300.0, help="wall timeout per worker, s")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--quick", action="store_true", help="tiny shapes QR,QF (smoke test)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads in the workers (default: torch's default)")
    p.add_argument("--no-check", action="store_true", help="skip the agreement checks")
    p.add_argument("--note", help="free text stored in the results (e.g. machine load)")
    p.add_argument("--worker", nargs=3, metavar=("SHAPE", "METHOD", "MODE"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return _worker(args) if args.worker else _parent(args)


if __name__ == "__main__":
    sys.exit(main())
