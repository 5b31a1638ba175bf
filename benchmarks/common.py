"""What the benchmark scripts share: the child-process protocol, the timing and memory
measurement, run metadata, result writers and small formatting helpers.

Run the scripts as modules from the repository root (``python -m benchmarks.bench_search
--quick``); each writes ``benchmarks/results/<what>/<stem>.{md,json}``.

Child protocol: the parent starts one worker process per measurement (``run_child``),
which caps its address space (``cap_address_space``), builds its inputs, measures
(``measure``) and prints one ``RESULT {json}`` line (``emit``). A method that needs more
memory than the cap fails with an allocation error, reported as ``OOM``
(``is_oom``), instead of swapping or taking the machine down.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.util
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
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path

MIB = 2**20
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
# Where the CIFAR-10 archive lives next to the checkout (see README).
CIFAR10_JPEG = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

# Nearest-code search shapes (bench_search, profile_search). name: (N, D, K, note)
SEARCH_SHAPES: dict[str, tuple[int, int, int, str]] = {
    "S1": (32768, 64, 512, "VQ-VAE CIFAR setting (B=128, 16x16 latents)"),
    "S2": (65536, 64, 8192, ""),
    "S3": (65536, 256, 16384, ""),
    "S4": (16384, 8, 65536, ""),
    "S5": (32768, 64, 65536, "one N x K fp32 matrix = 8 GiB"),
}
SEARCH_QUICK_SHAPES: dict[str, tuple[int, int, int, str]] = {
    "Q1": (2048, 16, 256, "smoke test"),
    "Q2": (1024, 8, 4096, "smoke test"),
}


def search_inputs(n: int, d: int, k: int, seed: int = 0):
    """The search benchmark's inputs: X (N, D) then codebook W (K, D), ``randn`` from one
    generator seeded with ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(k, d, generator=g)
    return x, w


def out_dir(what: str, quick: bool = False) -> Path:
    """Default results folder of a benchmark: ``benchmarks/results/<what>[_quick]``."""
    return RESULTS_DIR / (f"{what}_quick" if quick else what)


# --------------------------------------------------------------------------- formatting


def fmt(v: float | None, spec: str) -> str:
    """``format(v, spec)``, or an en dash for a missing value."""
    return "–" if v is None else format(v, spec)


def check_choices(values: Iterable[str], allowed: Iterable[str], what: str) -> None:
    """Exit with a message naming the valid choices if any of ``values`` is unknown."""
    allowed = list(allowed)
    for v in values:
        if v not in allowed:
            sys.exit(f"unknown {what} {v!r}; choose from {', '.join(allowed)}")


def parse_list(
    value: str | None, default: Sequence[str], allowed: Iterable[str], what: str
) -> list[str]:
    """A comma list from the command line (``default`` when empty), checked."""
    items = value.split(",") if value else list(default)
    check_choices(items, allowed, what)
    return items


def md_table(
    columns: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None
) -> list[str]:
    """Markdown table lines. ``align``: one letter per column, ``l`` or ``r`` (default:
    first column left, the others right)."""
    align = align or "l" + "r" * (len(columns) - 1)

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    sep = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return [line(columns), sep, *map(line, rows)]


# --------------------------------------------------------------------------- run metadata


def git_commit() -> str:
    """Short hash of HEAD of this checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=BENCH_DIR,
            timeout=10,
        )
        return out.stdout.strip() or "(no commit)"
    except (OSError, subprocess.SubprocessError):
        return "(unknown)"


def git_dirty() -> bool | None:
    """Whether the checkout has uncommitted changes in src/ or the benchmark scripts."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "benchmarks/*.py"],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=10,
        )
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """CPU model, cores, RAM and the versions of the packages the benchmarks use."""
    info: dict = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
    }
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
    info["versions"] = {
        p: version(p) for p in ("torch", "faiss-cpu", "vector-quantize-pytorch", "vqkit", "numpy")
    }
    return info


def vqkit_path() -> str | None:
    """The vqkit package this interpreter imports (PYTHONPATH or the installed one)."""
    spec = importlib.util.find_spec("vqkit")
    return str(Path(spec.origin).parent) if spec and spec.origin else None


def top() -> list[str]:
    """The busiest processes now (other jobs share the cores)."""
    try:
        out = subprocess.run(
            ["top", "-bn1", "-w", "160"], capture_output=True, text=True, timeout=10
        ).stdout
        return out.splitlines()[:15]
    except (OSError, subprocess.SubprocessError):
        return []


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """How this run was started, as ``python -m <module> <args>``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "-m", module, *args])


def run_meta(module: str, note: str | None = None, argv: Sequence[str] | None = None) -> dict:
    """What every results file records about the run: command, commit, date, machine, load."""
    meta = {
        "command": command_line(module, argv),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "vqkit_path": vqkit_path(),
        "loadavg_start": os.getloadavg(),
        "top_start": top(),
    }
    if note:
        meta["note"] = note
    return meta


def finish_meta(meta: dict) -> None:
    """Stamp the end load and time into ``meta``."""
    meta["loadavg_end"] = os.getloadavg()
    meta["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def meta_lines(
    meta: dict, packages: Sequence[str] = ("torch", "vqkit"), machine_extra: str = ""
) -> list[str]:
    """The Markdown header lines about the run: command, commit and date, machine and
    package versions, load average at start and end."""
    mach = meta["machine"]
    v = mach["versions"]
    pk = ", ".join(f"{p} {v.get(p)}" for p in packages)
    la_s, la_e = meta["loadavg_start"], meta.get("loadavg_end")
    commit = meta["git_commit"] + (" (+ uncommitted changes)" if meta.get("git_dirty") else "")
    return [
        f"- command: `{meta['command']}`",
        f"- git commit: {commit}, date (UTC): {meta['date_utc']}",
        f"- machine: {mach['cpu_model']}, {mach['affinity_cpus']} cores usable, "
        f"{mach['ram_gib']} GiB RAM; {pk}{machine_extra}",
        f"- load average (1/5/15 min) at start: {la_s[0]:.2f}/{la_s[1]:.2f}/{la_s[2]:.2f}"
        + (f", at end: {la_e[0]:.2f}/{la_e[1]:.2f}/{la_e[2]:.2f}" if la_e else " (run incomplete)"),
    ]


def write_results(out: Path, stem: str, data: dict, md_lines: Sequence[str]) -> Path:
    """Write ``out/stem.json`` (``data``) and ``out/stem.md`` (the lines); returns the .md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    md = out / f"{stem}.md"
    md.write_text("\n".join(md_lines) + "\n")
    return md


# --------------------------------------------------------------------------- child side


def status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), -1 if absent."""
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    return int(m.group(1)) if m else -1


def malloc_trim() -> None:
    """Hand freed heap back to the OS (so it cannot hide later allocations)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark VmHWM; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_OOM_MESSAGES = (
    "can't allocate memory",
    "out of memory",
    "bad_alloc",
    "cannot allocate memory",
    "failed to allocate",
)


def is_oom(exc: BaseException | str) -> bool:
    """Whether an exception (or an error message) is an allocation failure."""
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc).lower()
    return any(s in msg for s in _OOM_MESSAGES)


def error_fields(exc: BaseException, phase: str) -> dict:
    """Record fields of a failed setup or run: status ``OOM`` or ``error``."""
    return {
        "status": "OOM" if is_oom(exc) else "error",
        "error": f"{type(exc).__name__}: {str(exc)[:300]}",
        "phase": phase,
    }


def cap_address_space(gib: float) -> None:
    """RLIMIT_AS for this process: allocations past ``gib`` GiB fail (-> OOM)."""
    cap = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def torch_setup(threads: int) -> dict:
    """Set torch's intra-op threads (0: keep torch's default); returns the record fields
    ``threads`` and ``vqkit_src``."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return {"threads": torch.get_num_threads(), "vqkit_src": vqkit_fingerprint()}


def vqkit_fingerprint() -> str:
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


def emit(rec: dict) -> int:
    """Print the worker's result line for the parent; returns exit code 0."""
    print("RESULT " + json.dumps(rec), flush=True)
    return 0


def measure(
    run: Callable[[], object], cleanup: Callable[[], object], repeats: int, time_budget: float
) -> dict:
    """One warm-up call, then up to ``repeats`` timed calls (fewer once they used
    ``time_budget`` s, or when the warm-up alone took over 10 s); peak extra memory is
    the kernel's RSS high-water mark above the RSS just before the warm-up.
    ``cleanup()`` runs after every call, outside the timed region.

    Returns record fields with ``status`` "ok", "OOM" or "error"."""
    gc.collect()
    malloc_trim()
    base_kib = status_kib("VmRSS")
    hwm_reset = reset_hwm()
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
        peak = status_kib("VmHWM")
        out.update(error_fields(e, "run"), times_s=times, peak_extra_mib=(peak - base_kib) / 1024)
        return out
    peak_kib = (
        status_kib("VmHWM") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    out.update(
        status="ok",
        warmup_s=warm,
        times_s=times,
        median_s=statistics.median(times),
        min_s=min(times),
        baseline_rss_mib=base_kib / 1024,
        peak_rss_mib=peak_kib / 1024,
        peak_extra_mib=(peak_kib - base_kib) / 1024,
    )
    return out


# --------------------------------------------------------------------------- parent side


def child_cmd(module: str, *args: object) -> list[str]:
    """Command line of a worker: this interpreter, ``-m module`` and ``args``."""
    return [sys.executable, "-m", module, *map(str, args)]


def child_env() -> dict:
    """The environment of a worker: ours, with the repository root on PYTHONPATH so
    that ``-m benchmarks.<script>`` resolves from any working directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_child(cmd: list[str], base: dict, timeout: float) -> dict:
    """Run one worker process (killed with its group after ``timeout`` s) and return
    ``base`` merged with its ``RESULT`` line, or a timeout / OOM / crash record."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=child_env(),
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        return {
            **base,
            "status": "timeout",
            "wall_s": time.perf_counter() - t0,
            "error": f"no result within {timeout} s",
        }
    rec = None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            rec = json.loads(line[len("RESULT ") :])
    if rec is None:
        tail = err.strip().splitlines()[-3:]
        oom = any(is_oom(t) for t in tail) or proc.returncode == -9
        rec = {
            "status": "OOM" if oom else "crash",
            "error": f"exit code {proc.returncode}: {' | '.join(tail)[:400]}",
        }
    return {**base, **rec, "wall_s": time.perf_counter() - t0}


def run_jobs(
    jobs: list[tuple],
    run: Callable[..., dict],
    label: Callable[[tuple], str],
    write: Callable[[list[dict]], object],
    meta: dict,
) -> list[dict]:
    """Run each job (``run(*job)`` -> record) in turn, print one progress line per job
    (``label(job)`` in front) and ``write(records)`` after each, so partial results
    survive an interruption; then stamp the end load and time into ``meta``."""
    records: list[dict] = []
    for i, job in enumerate(jobs, 1):
        rec = run(*job)
        records.append(rec)
        msg = (
            f"[{i}/{len(jobs)}] {label(job)} {rec['status']:6s} "
            f"median={fmt(rec.get('median_s'), '.3f')}s "
            f"peak_extra={fmt(rec.get('peak_extra_mib'), ',.0f')}MiB "
            f"wall={rec['wall_s']:.1f}s load={rec['loadavg_before'][0]:.2f}"
        )
        if rec["status"] != "ok":
            msg += f" ({rec.get('error', '')[:120]})"
        print(msg, file=sys.stderr, flush=True)
        write(records)
    finish_meta(meta)
    write(records)
    return records


def add_child_args(p, time_budget: float, repeats: int | None = None) -> None:
    """The options of the child-process benchmarks (bench_search, bench_quantizers,
    bench_large_codebooks); ``repeats`` None: see :func:`default_repeats`."""
    p.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help="timed repeats after one warm-up (default "
        + ("5; 2 with --quick)" if repeats is None else f"{repeats})"),
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=time_budget,
        help="stop timed repeats once they used this many seconds",
    )
    p.add_argument(
        "--mem-cap-gib",
        type=float,
        default=14.0,
        help="address-space cap per worker (RLIMIT_AS), GiB",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="wall timeout per worker, s")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads in the workers (default: torch's default)",
    )
    p.add_argument("--note", help="free text stored in the results (e.g. machine load)")


def default_repeats(args) -> None:
    """Fill in ``args.repeats``: 5, or 2 for a ``--quick`` smoke test."""
    if args.repeats is None:
        args.repeats = 2 if getattr(args, "quick", False) else 5


def child_settings(args) -> dict:
    """The settings of a child-process benchmark run, as stored in its results."""
    return {
        "repeats": args.repeats,
        "mem_cap_gib": args.mem_cap_gib,
        "timeout_s": args.timeout,
        "time_budget_s": args.time_budget,
        "threads": args.threads or "torch default",
    }


def child_args(args) -> list[str]:
    """The options a parent passes on to its workers."""
    out = [
        "--repeats",
        str(args.repeats),
        "--mem-cap-gib",
        str(args.mem_cap_gib),
        "--time-budget",
        str(args.time_budget),
    ]
    if getattr(args, "no_check", False):
        out.append("--no-check")
    if args.threads:
        out += ["--threads", str(args.threads)]
    return out
