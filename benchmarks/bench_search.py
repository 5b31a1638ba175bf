"""CPU benchmark of exact nearest-code search and VQ layers: vqkit versus baselines.

Every (shape, method) pair runs in its own child process under an address-space
cap (``RLIMIT_AS``), so a method that needs more memory than the cap fails with
an allocation error, reported as ``OOM``, instead of swapping or taking the
machine down. The parent collects one JSON line per child and writes

* ``<out-dir>/search_cpu.json``: every measurement plus run metadata, and
* ``<out-dir>/search_cpu.md``: one Markdown table per shape and a target check.

Usage::

    python benchmarks/bench_search.py --quick                 # smoke test, tiny shapes
    python benchmarks/bench_search.py                         # all shapes, all methods
    python benchmarks/bench_search.py --shapes S2 --methods gemm_floor,vqkit_search

Timing: one warm-up call, then up to ``--repeats`` timed calls (fewer when the
calls are slow: the timed calls stop once they have used ``--time-budget``
seconds). Median and min are reported.

Memory: resident set size (RSS, from /proc/self/status). After the inputs and
modules are built, freed heap is returned to the OS (``malloc_trim``), VmRSS is
read as the baseline and the peak counter VmHWM is reset (``echo 5 >
/proc/self/clear_refs``). After the warm-up and timed calls, VmHWM - baseline is
the peak extra memory of one call (each call's outputs and gradients are dropped
before the next one starts, outside the timed region).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

# name: (N, D, K, note)
SHAPES: dict[str, tuple[int, int, int, str]] = {
    "S1": (32768, 64, 512, "VQ-VAE CIFAR setting (B=128, 16x16 latents)"),
    "S2": (65536, 64, 8192, ""),
    "S3": (65536, 256, 16384, ""),
    "S4": (16384, 8, 65536, ""),
    "S5": (32768, 64, 65536, "one N x K fp32 matrix = 8 GiB"),
}
QUICK_SHAPES: dict[str, tuple[int, int, int, str]] = {
    "Q1": (2048, 16, 256, "smoke test"),
    "Q2": (1024, 8, 4096, "smoke test"),
}
ALL_SHAPES = {**SHAPES, **QUICK_SHAPES}

METHODS: dict[str, str] = {
    "gemm_floor": "torch.mm(X, W.T, out=Y) into a preallocated N x K output (no search)",
    "faiss_flat": "faiss.IndexFlatL2(D) with W added (build not timed); search(X, 1)",
    "vqkit_search": "vqkit.nearest_code(X, W), default 32 MiB scratch, torch backend",
    "vqkit_fwd": "vqkit.VectorQuantizer(K, D, channels_last=True) forward on (1, N, D), no grad",
    "vqkit_fwd_bwd": "same layer, forward + (loss + quantized.sum()).backward(), "
                     "input requires grad",
    "vqkit_ema_fwd": "vqkit.VectorQuantizerEMA(K, D, channels_last=True), training-mode forward "
                     "incl. EMA codebook update, input without grad",
    "classic": "classic VQ-VAE formula: dense N x K distances, argmin, dense one-hot, "
               "one-hot @ codebook, losses, straight-through; forward + backward",
    "vqp_ema": "vector_quantize_pytorch.VectorQuantize(dim=D, codebook_size=K) defaults (EMA), "
               "training mode, forward + backward on (1, N, D)",
    "vqp_learnable": "VectorQuantize(..., learnable_codebook=True, ema_update=False), "
                     "forward + backward on (1, N, D)",
}
VQKIT_METHODS = ("vqkit_search", "vqkit_fwd", "vqkit_fwd_bwd", "vqkit_ema_fwd")
SEED = 0
CHECK_ROWS = 256
TIE_RTOL = 1e-4
MIB = 2**20


# --------------------------------------------------------------------------- child


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    return int(m.group(1)) if m else -1


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc).lower()
    return any(s in msg for s in ("can't allocate memory", "out of memory", "bad_alloc",
                                  "cannot allocate memory", "failed to allocate"))


def _vqkit_fingerprint() -> str:
    """Short hash of the vqkit sources this worker imports (the editable install
    can change under a long run when others commit; this records what ran)."""
    import hashlib

    import vqkit

    root = Path(vqkit.__file__).parent
    h = hashlib.sha1()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


def _setup(method: str, n: int, d: int, k: int):
    """Build inputs and the callable to time.

    Returns (run, cleanup, check): ``run()`` is the timed call; ``cleanup()``
    drops what a call left behind (gradients), untimed; ``check()`` returns
    (indices (N,), codebook used) for the correctness check, or None.
    """
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(k, d, generator=g)
    state: dict = {}

    def no_cleanup() -> None:
        pass

    if method == "gemm_floor":
        # torch.empty does not touch the pages: the N x K output becomes resident
        # during the warm-up, so it is counted as this method's extra memory.
        y = torch.empty(n, k)

        def run() -> None:
            torch.mm(x, w.t(), out=y)

        return run, no_cleanup, None

    if method == "faiss_flat":
        import faiss

        index = faiss.IndexFlatL2(d)
        index.add(w.numpy())
        xn = x.numpy()

        def run() -> None:
            index.search(xn, 1)

        def check():
            _, idx = index.search(xn[:CHECK_ROWS_SLICE], 1)
            return torch.from_numpy(idx[:, 0]).long(), w

        return run, no_cleanup, check

    if method == "vqkit_search":
        from vqkit import nearest_code

        def run() -> None:
            nearest_code(x, w)

        def check():
            return nearest_code(x[:CHECK_ROWS_SLICE], w)[0], w

        return run, no_cleanup, check

    if method in ("vqkit_fwd", "vqkit_fwd_bwd"):
        from vqkit import VectorQuantizer

        vq = VectorQuantizer(k, d, channels_last=True)
        with torch.no_grad():
            vq.codebook.copy_(w)
        x3 = x.view(1, n, d)
        if method == "vqkit_fwd":

            def run() -> None:
                with torch.no_grad():
                    vq(x3)

            def check():
                with torch.no_grad():
                    return vq(x3[:, :CHECK_ROWS_SLICE]).indices.reshape(-1), vq.codebook.detach()

            return run, no_cleanup, check

        xg = x3.clone().requires_grad_(True)

        def run() -> None:
            out = vq(xg)
            (out.loss + out.quantized.sum()).backward()

        def cleanup() -> None:
            xg.grad = None
            vq.codebook.grad = None

        def check():
            with torch.no_grad():
                return vq(x3[:, :CHECK_ROWS_SLICE]).indices.reshape(-1), vq.codebook.detach()

        return run, cleanup, check

    if method == "vqkit_ema_fwd":
        from vqkit import VectorQuantizerEMA

        vq = VectorQuantizerEMA(k, d, channels_last=True)
        with torch.no_grad():
            vq.codebook.copy_(w)
            vq.reset_statistics()
        vq.train()
        x3 = x.view(1, n, d)

        def run() -> None:
            vq(x3)

        def check():
            before = vq.codebook.clone()  # the output uses the pre-update codebook
            return vq(x3[:, :CHECK_ROWS_SLICE]).indices.reshape(-1), before

        return run, no_cleanup, check

    if method == "classic":
        emb = torch.nn.Parameter(w.clone())
        xg = x.clone().requires_grad_(True)
        beta = 0.25

        def classic_forward(inp: torch.Tensor):
            # Squared distances to every code, N x K, by the expanded formula.
            dist = (inp.pow(2).sum(dim=1, keepdim=True) + emb.pow(2).sum(dim=1)
                    - 2.0 * inp @ emb.t())
            codes = dist.argmin(dim=1)
            onehot = torch.zeros(inp.shape[0], k, device=inp.device)
            onehot.scatter_(1, codes.unsqueeze(1), 1.0)
            quant = onehot @ emb
            loss = F.mse_loss(quant, inp.detach()) + beta * F.mse_loss(quant.detach(), inp)
            quant = inp + (quant - inp).detach()
            probs = onehot.mean(dim=0)
            ppl = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            return loss, quant, ppl, codes

        def run() -> None:
            loss, quant, _, _ = classic_forward(xg)
            (loss + quant.sum()).backward()

        def cleanup() -> None:
            xg.grad = None
            emb.grad = None

        def check():
            with torch.no_grad():
                return classic_forward(x[:CHECK_ROWS_SLICE])[3], emb.detach()

        return run, cleanup, check

    if method in ("vqp_ema", "vqp_learnable"):
        from vector_quantize_pytorch import VectorQuantize

        if method == "vqp_ema":
            vq = VectorQuantize(dim=d, codebook_size=k)
        else:
            vq = VectorQuantize(dim=d, codebook_size=k, learnable_codebook=True,
                                ema_update=False)
        cb = vq._codebook
        with torch.no_grad():
            cb.embed.copy_(w.view_as(cb.embed))
            if hasattr(cb, "embed_avg"):
                cb.embed_avg.copy_(w.view_as(cb.embed_avg))
        vq.train()
        xg = x.view(1, n, d).clone().requires_grad_(True)
        state["vq"] = vq

        def run() -> None:
            quant, _, loss = vq(xg)
            (loss.sum() + quant.sum()).backward()

        def cleanup() -> None:
            xg.grad = None
            vq.zero_grad(set_to_none=True)

        def check():
            before = cb.embed.detach().clone().view(k, d)
            with torch.no_grad():
                vq.eval()
                _, idx, _ = vq(x[:CHECK_ROWS_SLICE].view(1, -1, d))
                vq.train()
            return idx.reshape(-1), before

        return run, cleanup, check

    raise ValueError(f"unknown method {method!r}")


# Rows of X (the first ones) whose indices are checked; set in _worker.
CHECK_ROWS_SLICE = CHECK_ROWS


def _agreement(x, idx, codebook) -> dict:
    """Compare indices with a float64 reference, allowing near-tie flips."""
    import torch

    x64 = x.to(torch.float64)
    d64 = torch.cdist(x64, codebook.to(torch.float64)).pow(2)
    ref_val, ref_idx = d64.min(dim=1)
    got = d64.gather(1, idx.view(-1, 1).long()).squeeze(1)
    exact = idx.view(-1) == ref_idx
    near_tie = (got - ref_val) <= TIE_RTOL * ref_val.clamp(min=1e-12)
    return {
        "check_rows": int(idx.numel()),
        "exact_agree": float(exact.double().mean()),
        "agree_with_ties": float((exact | near_tie).double().mean()),
    }


def measure(run, cleanup, repeats: int, time_budget: float) -> dict:
    """One warm-up call, then up to ``repeats`` timed calls (fewer once they used
    ``time_budget`` s, or when the warm-up alone took over 10 s); peak extra memory is
    the kernel's RSS high-water mark above the RSS just before the warm-up.

    Returns record fields with ``status`` "ok", "OOM" or "error"."""
    import gc

    gc.collect()
    _malloc_trim()
    base_kib = _status_kib("VmRSS")
    hwm_reset = _reset_hwm()
    out: dict = {}
    if not hwm_reset:
        # Without a resettable VmHWM the peak covers setup as well (upper bound).
        out["memory_note"] = "VmHWM not resettable; peak includes setup"
    times: list[float] = []
    try:
        t0 = time.perf_counter()
        run()
        warm = time.perf_counter() - t0
        cleanup()
        if warm > 10.0:
            repeats = max(1, min(repeats, int(time_budget // warm)))
        spent = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            dt = time.perf_counter() - t0
            cleanup()
            times.append(dt)
            spent += dt
            if spent >= time_budget:
                break
    except (RuntimeError, MemoryError) as e:
        peak = _status_kib("VmHWM")
        out.update(status="OOM" if _is_oom(e) else "error",
                   error=f"{type(e).__name__}: {str(e)[:300]}", phase="run", times_s=times,
                   peak_extra_mib=(peak - base_kib) / 1024)
        return out
    peak_kib = _status_kib("VmHWM") if hwm_reset else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss
    out.update(status="ok", warmup_s=warm, times_s=times, median_s=statistics.median(times),
               min_s=min(times), baseline_rss_mib=base_kib / 1024,
               peak_rss_mib=peak_kib / 1024, peak_extra_mib=(peak_kib - base_kib) / 1024)
    return out


def _worker(args: argparse.Namespace) -> int:
    cap = int(args.mem_cap_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    shape, method = args.worker
    n, d, k, _ = ALL_SHAPES[shape]
    rec: dict = {"shape": shape, "method": method, "N": n, "D": d, "K": k,
                 "mem_cap_gib": args.mem_cap_gib}

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
        global CHECK_ROWS_SLICE
        CHECK_ROWS_SLICE = min(CHECK_ROWS, n)
        run, cleanup, check = _setup(method, n, d, k)
    except ImportError as e:
        return emit(status="skipped", error=f"{type(e).__name__}: {e}")
    except (RuntimeError, MemoryError) as e:
        if _is_oom(e):
            return emit(status="OOM", error=str(e)[:300], phase="setup")
        return emit(status="error", error=f"{type(e).__name__}: {str(e)[:300]}", phase="setup")

    rec.update(measure(run, cleanup, args.repeats, args.time_budget))
    if rec["status"] != "ok":
        return emit()
    if check is not None and not args.no_check:
        try:
            g = torch.Generator().manual_seed(SEED)
            x = torch.randn(n, d, generator=g)[:CHECK_ROWS_SLICE]
            idx, codebook = check()
            rec.update(_agreement(x, idx, codebook))
        except (RuntimeError, MemoryError) as e:
            rec["check_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return emit()


# --------------------------------------------------------------------------- parent


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "(no commit)"
    except (OSError, subprocess.SubprocessError):
        return "(unknown)"


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _machine() -> dict:
    info: dict = {"platform": platform.platform(), "python": platform.python_version(),
                  "cpu_count": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0))}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        info["cpu_model"] = m.group(1).strip() if m else "?"
    except OSError:
        info["cpu_model"] = "?"
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemTotal:\s+(\d+)", f.read(), re.M)
        info["ram_gib"] = round(int(m.group(1)) / 2**20, 1) if m else None
    except OSError:
        info["ram_gib"] = None
    info["versions"] = {p: _version(p) for p in
                        ("torch", "faiss-cpu", "vector-quantize-pytorch", "vqkit", "numpy")}
    return info


def _top() -> list[str]:
    """The busiest processes at the start (other jobs share the cores)."""
    try:
        out = subprocess.run(["top", "-bn1", "-w", "160"], capture_output=True, text=True,
                             timeout=10).stdout
        return out.splitlines()[:15]
    except (OSError, subprocess.SubprocessError):
        return []


def _run_worker(shape: str, method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", shape, method,
           "--repeats", str(args.repeats), "--mem-cap-gib", str(args.mem_cap_gib),
           "--time-budget", str(args.time_budget)]
    if args.no_check:
        cmd.append("--no-check")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    n, d, k, _ = ALL_SHAPES[shape]
    base = {"shape": shape, "method": method, "N": n, "D": d, "K": k,
            "loadavg_before": os.getloadavg()}
    return run_child(cmd, base, args.timeout)


def run_child(cmd: list[str], base: dict, timeout: float) -> dict:
    """Run one worker process (killed with its group after ``timeout`` s) and return
    ``base`` merged with its ``RESULT`` line, or a timeout / OOM / crash record."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        return {**base, "status": "timeout", "wall_s": time.perf_counter() - t0,
                "error": f"no result within {timeout} s"}
    rec = None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            rec = json.loads(line[len("RESULT "):])
    if rec is None:
        tail = err.strip().splitlines()[-3:]
        oom = any(_is_oom(Exception(t)) for t in tail) or proc.returncode == -9
        rec = {"status": "OOM" if oom else "crash",
               "error": f"exit code {proc.returncode}: {' | '.join(tail)[:400]}"}
    return {**base, **rec, "wall_s": time.perf_counter() - t0}


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _summarise(records: list[dict], shapes: list[str]) -> tuple[dict, list[str]]:
    """Per-shape table rows and the target checks."""
    by = {(r["shape"], r["method"]): r for r in records}

    def med(shape: str, method: str) -> float | None:
        r = by.get((shape, method))
        return r.get("median_s") if r and r.get("status") == "ok" else None

    lines: list[str] = []
    for shape in shapes:
        n, d, k, note = ALL_SHAPES[shape]
        nk_mib = n * k * 4 / MIB
        floor, fa = med(shape, "gemm_floor"), med(shape, "faiss_flat")
        title = f"### {shape}: N={n}, D={d}, K={k}"
        title += f" - {note}" if note else ""
        lines += [title, "", f"One N x K fp32 matrix = {nk_mib:,.0f} MiB.", "",
                  "| method | median s | min s | ratio to gemm_floor | ratio to faiss | "
                  "peak extra MiB | fraction of N x K | index agreement | status |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in records:
            if r["shape"] != shape:
                continue
            ok = r.get("status") == "ok"
            m = r.get("median_s") if ok else None
            peak = r.get("peak_extra_mib") if ok else None
            agree = r.get("agree_with_ties")
            agree_s = "–" if agree is None else (
                f"{agree:.4f}" + (f" (exact {r['exact_agree']:.4f})"
                                  if r.get("exact_agree") != agree else ""))
            status = r.get("status", "?")
            if status == "OOM" and r.get("error"):
                m_alloc = re.search(r"allocate (\d+) bytes", r["error"])
                if m_alloc:
                    status += f" (failed allocating {int(m_alloc.group(1)) / 2**30:.1f} GiB)"
            elif status != "ok" and r.get("error"):
                status += f": {r['error'][:60]}"
            mn = r.get("min_s") if ok else None
            lines.append(
                f"| {r['method']} | {_fmt(m, '.3f')} | {_fmt(mn, '.3f')}"
                f" | {_fmt(m / floor if m and floor else None, '.2f')}"
                f" | {_fmt(m / fa if m and fa else None, '.2f')}"
                f" | {_fmt(peak, ',.0f')}"
                f" | {_fmt(peak / nk_mib if peak is not None else None, '.4f')}"
                f" | {agree_s} | {status.replace('|', '/')} |")
        lines.append("")

    # Targets (only for shapes that were run).
    checks: dict = {}
    tl: list[str] = ["### Targets", "", "| target | shape | value | met |", "|---|---|---|---|"]

    def add(name: str, shape: str, value: str, met: bool | None) -> None:
        checks.setdefault(name, []).append({"shape": shape, "value": value, "met": met})
        tl.append(f"| {name} | {shape} | {value} | "
                  f"{'n/a' if met is None else ('yes' if met else '**no**')} |")

    for shape in shapes:
        fb, floor, fa = med(shape, "vqkit_fwd_bwd"), med(shape, "gemm_floor"), med(
            shape, "faiss_flat")
        if fb and floor:
            add("vqkit_fwd_bwd <= 1.5x gemm_floor", shape, f"{fb / floor:.2f}x", fb / floor <= 1.5)
        if fb and fa:
            add("vqkit_fwd_bwd <= 1.3x faiss_flat", shape, f"{fb / fa:.2f}x", fb / fa <= 1.3)
    for shape in shapes:
        if shape not in ("S2", "S3", "S4", "S5"):
            continue
        n, _, k, _ = ALL_SHAPES[shape]
        nk_mib = n * k * 4 / MIB
        for m in VQKIT_METHODS:
            r = by.get((shape, m))
            if r and r.get("status") == "ok":
                frac = r["peak_extra_mib"] / nk_mib
                add(f"{m} peak extra <= 1/8 N x K", shape,
                    f"{r['peak_extra_mib']:,.0f} MiB = {frac:.4f}", frac <= 0.125)
            elif r:
                add(f"{m} peak extra <= 1/8 N x K", shape, r.get("status", "?"), False)
    if "S5" in shapes:
        v, c = by.get(("S5", "vqkit_fwd_bwd")), by.get(("S5", "classic"))
        if v and c:
            add("S5: vqkit runs, classic OOMs", "S5",
                f"vqkit_fwd_bwd {v.get('status')}, classic {c.get('status')}",
                v.get("status") == "ok" and c.get("status") == "OOM")
    if "S2" in shapes:
        fb = med("S2", "vqkit_fwd_bwd")
        for other in ("classic", "vqp_ema", "vqp_learnable"):
            r = by.get(("S2", other))
            if not (fb and r):
                continue
            if r.get("status") == "ok":
                sp = r["median_s"] / fb
                add(f">= 10x faster than {other}", "S2", f"{sp:.1f}x", sp >= 10)
            else:
                add(f">= 10x faster than {other}", "S2", f"{other}: {r.get('status')}", None)
    return checks, lines + tl


def check_choices(values: list[str], allowed, what: str) -> None:
    """Exit with a message naming the valid choices if any of ``values`` is unknown."""
    for v in values:
        if v not in allowed:
            sys.exit(f"unknown {what} {v!r}; choose from {', '.join(allowed)}")


def run_meta(args: argparse.Namespace, started: _dt.datetime) -> dict:
    """What every results file records about the run: command, commit, date, machine, load."""
    meta = {
        "command": shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "git_commit": _git_commit(),
        "date_utc": started.isoformat(timespec="seconds"),
        "machine": _machine(),
        "loadavg_start": os.getloadavg(),
        "top_start": _top(),
    }
    if args.note:
        meta["note"] = args.note
    return meta


def run_jobs(jobs: list[tuple], run, label, write, meta: dict) -> list[dict]:
    """Run each job (``run(*job)`` -> record) in turn, print one progress line per job
    (``label(job)`` in front) and ``write(records)`` after each, so partial results
    survive an interruption; then stamp the end load and time into ``meta``."""
    records: list[dict] = []
    for i, job in enumerate(jobs, 1):
        rec = run(*job)
        records.append(rec)
        msg = (f"[{i}/{len(jobs)}] {label(job)} {rec['status']:6s} "
               f"median={_fmt(rec.get('median_s'), '.3f')}s "
               f"peak_extra={_fmt(rec.get('peak_extra_mib'), ',.0f')}MiB "
               f"wall={rec['wall_s']:.1f}s load={rec['loadavg_before'][0]:.2f}")
        if rec["status"] != "ok":
            msg += f" ({rec.get('error', '')[:120]})"
        print(msg, file=sys.stderr, flush=True)
        write(records)
    meta["loadavg_end"] = os.getloadavg()
    meta["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write(records)
    return records


def _parent(args: argparse.Namespace) -> int:
    shapes = args.shapes.split(",") if args.shapes else (
        list(QUICK_SHAPES) if args.quick else list(SHAPES))
    methods = args.methods.split(",") if args.methods else list(METHODS)
    check_choices(shapes, ALL_SHAPES, "shape")
    check_choices(methods, METHODS, "method")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "search_cpu_quick" if args.quick and not args.shapes else "search_cpu"
    meta = run_meta(args, _dt.datetime.now(_dt.timezone.utc))
    meta["settings"] = {"repeats": args.repeats, "mem_cap_gib": args.mem_cap_gib,
                        "timeout_s": args.timeout, "time_budget_s": args.time_budget,
                        "threads": args.threads or "torch default",
                        "seed": SEED, "check_rows": CHECK_ROWS, "tie_rtol": TIE_RTOL}
    meta["methods"] = {m: METHODS[m] for m in methods}
    meta["shapes"] = {s: dict(zip(("N", "D", "K", "note"), ALL_SHAPES[s], strict=True))
                      for s in shapes}
    run_jobs(
        [(s, m) for s in shapes for m in methods],
        lambda shape, method: _run_worker(shape, method, args),
        lambda job: f"{job[0]} {job[1]:14s}",
        lambda records: _write(out_dir, stem, meta, records, shapes),
        meta,
    )
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}", file=sys.stderr)
    return 0


def _write(out_dir: Path, stem: str, meta: dict, records: list[dict], shapes: list[str]) -> None:
    checks, lines = _summarise(records, shapes)
    (out_dir / f"{stem}.json").write_text(
        json.dumps({**meta, "results": records, "targets": checks}, indent=1) + "\n")
    mach = meta["machine"]
    v = mach["versions"]
    la_s = meta["loadavg_start"]
    la_e = meta.get("loadavg_end")
    head = [
        "# Nearest-code search benchmark (CPU)",
        "",
        f"- command: `{meta['command']}`",
        f"- git commit: {meta['git_commit']}, date (UTC): {meta['date_utc']}",
        f"- machine: {mach['cpu_model']}, {mach['affinity_cpus']} cores usable, "
        f"{mach['ram_gib']} GiB RAM; torch {v['torch']}, faiss-cpu {v['faiss-cpu']}, "
        f"vector-quantize-pytorch {v['vector-quantize-pytorch']}, vqkit {v['vqkit']}",
        f"- load average (1/5/15 min) at start: {la_s[0]:.2f}/{la_s[1]:.2f}/{la_s[2]:.2f}"
        + (f", at end: {la_e[0]:.2f}/{la_e[1]:.2f}/{la_e[2]:.2f}" if la_e else " (run incomplete)"),
        f"- settings: up to {meta['settings']['repeats']} timed repeats after 1 warm-up "
        f"(timed calls stop after {meta['settings']['time_budget_s']:.0f} s), "
        f"memory cap {meta['settings']['mem_cap_gib']} GiB (RLIMIT_AS) per worker, "
        f"timeout {meta['settings']['timeout_s']} s per worker",
        "- peak extra = VmHWM - VmRSS baseline (inputs and modules built), over the "
        "warm-up and timed calls; index agreement on the first "
        f"{meta['settings']['check_rows']} rows vs float64 cdist, near ties "
        f"(gap <= {meta['settings']['tie_rtol']:g} relative) allowed",
        "- vqkit layers take the channels-last flat input (1, N, D); vqp takes (1, N, D); "
        "faiss index build is not timed",
    ]
    if meta.get("note"):
        head.append(f"- note: {meta['note']}")
    (out_dir / f"{stem}.md").write_text("\n".join(head + [""] + lines) + "\n")


def rerender(json_path: str) -> None:
    """Rewrite the .md next to a results .json (after a change of the table format)."""
    path = Path(json_path)
    data = json.loads(path.read_text())
    records = data.pop("results")
    data.pop("targets", None)
    _write(path.parent, path.stem, data, records, list(data["shapes"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", help=f"comma list from {','.join(ALL_SHAPES)} (default S1..S5)")
    p.add_argument("--methods", help=f"comma list from {','.join(METHODS)} (default all)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up")
    p.add_argument("--time-budget", type=float, default=30.0,
                   help="stop timed repeats once they used this many seconds")
    p.add_argument("--mem-cap-gib", type=float, default=14.0,
                   help="address-space cap per worker (RLIMIT_AS), GiB")
    p.add_argument("--timeout", type=float, default=300.0, help="wall timeout per worker, s")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--quick", action="store_true", help="tiny shapes Q1,Q2 (smoke test)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads in the workers (default: torch's default)")
    p.add_argument("--no-check", action="store_true", help="skip the float64 index check")
    p.add_argument("--note", help="free text stored in the results (e.g. machine load)")
    p.add_argument("--rerender", metavar="JSON", help="rewrite the .md of a results .json")
    p.add_argument("--worker", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.rerender:
        rerender(args.rerender)
        return 0
    return _worker(args) if args.worker else _parent(args)


if __name__ == "__main__":
    sys.exit(main())
