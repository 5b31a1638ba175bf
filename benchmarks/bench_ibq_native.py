"""IBQ's C kernel against its eager PyTorch passes in the K = 16384 training step, in ONE
process: the kernel as the library builds it (``-march=native``, ``omp simd``
reductions), the same C file built portably (no ``-march=native``, the reduction
pragmas removed: fixed-order scalar row sums, ``-O3 -ffp-contract=off``; what a
``torch.library`` op with bits independent of the host's vector width could keep) and
the eager passes (``VQKIT_NATIVE=0``).

    python -m benchmarks.bench_ibq_native --data ../shared/data/cifar10-jpeg.tar.gz \\
        --rounds 7 --src <checkout with quantizers/ibq_native.py>/src
    python -m benchmarks.bench_ibq_native --report benchmarks/results/<name>/ibq_native.json

The kernel was retired after this measurement (docs/results.md, "Large codebooks at
the floor"): ``--src`` names a checkout that still has it (commit 395b9c3 or earlier,
e.g. ``git archive 395b9c3 src | tar -x -C /tmp/ibq-kernel``; default: the vqkit on the
path); its git commit is recorded where it is a git checkout (``null`` for an
archive). Each configuration of ``benchmarks.bench_step`` (``--only``) gets one trainer
per way (same seed); each round times ``--steps`` steps of every (configuration, way),
the ways' order rotated from round to round so that load drifts hit all alike. 1 torch
thread. Writes ``benchmarks/results/<--out-dir>/ibq_native.{json,md}``; ``--report``
rewrites the table from a JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODULE = "benchmarks.bench_ibq_native"
STEM = "ibq_native"
WAYS = ("native", "portable", "eager")
PORTABLE_FLAGS = (
    "-O3 -fno-math-errno -fno-trapping-math -ffp-contract=off -fopenmp-simd -shared -fPIC"
)
DEFAULT_CONFIGS = ("ibq K=16384 (entropy 0.05)", "ibq K=16384 (no entropy)")


def _portable_lib(native):  # type: ignore[no-untyped-def]
    """The kernel's C file without its ``omp simd reduction`` pragmas, built without
    ``-march=native`` through the module's own loader (argument types set there)."""
    src = Path(native.SOURCE).read_text()
    stripped = re.sub(r"^\s*#pragma omp simd reduction.*\n", "", src, flags=re.M)
    removed = src.count("#pragma omp simd reduction")
    flags, source = native.FLAGS, native.SOURCE
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ibq_kernels_portable.c"
        path.write_text(stripped)
        native.FLAGS, native.SOURCE = PORTABLE_FLAGS, path
        try:
            lib = native._build()
        finally:
            native.FLAGS, native.SOURCE = flags, source
    return lib, removed


def _src_commit(src: str) -> str | None:
    res = subprocess.run(
        ["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return res.stdout.strip() or None


def render(rec: dict) -> list[str]:
    """The Markdown lines of a record: per configuration and way the median ms per step,
    and the per-round ratios of the eager passes to each build of the kernel (paired
    within a round, so that the machine's load drifting between rounds cancels)."""
    from benchmarks import common

    s = rec["settings"]
    lines = [
        "# IBQ's C kernel against its eager passes in the training step (CPU, 1 thread)",
        "",
        *common.meta_lines(rec, machine_extra=f", {s['torch_threads']} torch threads"),
        f"- measured checkout: `{s['src']}` at {s['src_commit']}; kernel flags: native "
        f"`{s['native_flags']}`, portable `{s['portable_flags']}` "
        f"({s['pragmas_removed']} `omp simd reduction` pragmas removed)",
        f"- batch {s['batch_size']}, {s['steps']} timed steps per round after "
        f"{s['warmup']} warm-up, {s['rounds']} rounds, ways rotated each round; "
        f"data: {s['data']}",
        f"- load average seen before each round (1 min): "
        f"{', '.join(f'{x:.2f}' for x in rec['loadavg_rounds'])}",
        *([f"- note: {rec['note']}"] if rec.get("note") else []),
        "",
    ]
    body = []
    for row in rec["rows"]:
        ms = {w: row["ways"][w]["rounds_ms"] for w in row["ways"]}
        for w in row["ways"]:
            ratios = [e / t for e, t in zip(ms["eager"], ms[w], strict=True)]
            ratio = statistics.median(ratios)
            body.append(
                [
                    row["config"],
                    w,
                    f"{statistics.median(ms[w]):.1f}",
                    " / ".join(f"{t:.0f}" for t in ms[w]),
                    f"{ratio:.3f}",
                    f"{min(ratios):.3f}-{max(ratios):.3f}",
                    f"{100 * (1 / ratio - 1):+.1f} %",
                ]
            )
    head = [
        "configuration",
        "way",
        "ms/step (median)",
        "ms/step per round",
        "eager / way, median of rounds",
        "eager / way, range",
        "step time vs eager (1 / median ratio - 1)",
    ]
    return [*lines, *common.md_table(head, body)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", help="vqkit source folder with quantizers/ibq_native.py")
    ap.add_argument("--data", help="dataset (default: bench_step's)")
    ap.add_argument("--only", nargs="*", default=list(DEFAULT_CONFIGS))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round and way")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out-dir", default="benchmarks/results/ibq_native_step_k14")
    ap.add_argument("--note")
    ap.add_argument("--report", help="only rewrite the .md of this JSON record")
    args = ap.parse_args(argv)
    from benchmarks import common

    if args.report:
        rec = json.loads(Path(args.report).read_text())
        md = Path(args.report).with_suffix(".md")
        md.write_text("\n".join(render(rec)) + "\n")
        print(f"wrote {md}", file=sys.stderr)
        return 0
    if args.src:
        sys.path.insert(0, str(Path(args.src).resolve()))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    try:
        from vqkit.quantizers import ibq_native as native
    except ImportError:
        sys.exit(
            f"{MODULE}: this vqkit has no IBQ C kernel (retired); pass --src <a checkout "
            "that has src/vqkit/quantizers/ibq_native.py>/src"
        )
    from benchmarks import bench_step

    common.check_choices(args.only, bench_step.CONFIGS, "configuration")
    data = args.data or str(common.CIFAR10_JPEG)
    meta = common.run_meta(MODULE, args.note, argv)
    libs = {"native": native._lib()}
    if libs["native"] is None:
        sys.exit(f"{MODULE}: the kernel did not build here: {native._state.get('error')}")
    libs["portable"], removed = _portable_lib(native)

    def use(way: str) -> None:
        os.environ[native.ENV] = "0" if way == "eager" else "1"
        if way != "eager":
            native._state["lib"] = libs[way]

    times: dict[tuple[str, str], list[float]] = {}
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for c in args.only:
            for w in WAYS:
                use(w)
                trainers[c, w] = bench_step.build(c, data, args.batch_size, f"{tmp}/{w}")
                bench_step.time_steps(trainers[c, w], args.warmup)
                times[c, w] = []
        for r in range(args.rounds):
            loads.append(os.getloadavg()[0])
            order = WAYS[r % 3 :] + WAYS[: r % 3]
            t0 = time.perf_counter()
            for c in args.only:
                for w in order:
                    use(w)
                    times[c, w].append(1e3 * bench_step.time_steps(trainers[c, w], args.steps))
            print(
                f"round {r + 1} ({time.perf_counter() - t0:.0f} s, load {loads[-1]:.2f}): "
                + "; ".join(f"{c} {w} {times[c, w][-1]:.0f}" for c in args.only for w in WAYS),
                file=sys.stderr,
            )
    common.finish_meta(meta)
    meta["settings"] = {
        "src": str(Path(native.__file__).parents[2]),
        "src_commit": _src_commit(str(Path(native.__file__).parent)),
        "native_flags": native.FLAGS,
        "portable_flags": PORTABLE_FLAGS,
        "pragmas_removed": removed,
        "data": data,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    meta["loadavg_rounds"] = loads
    meta["rows"] = [
        {
            "config": c,
            "options": bench_step.CONFIGS[c],
            "ways": {w: {"rounds_ms": times[c, w]} for w in WAYS},
        }
        for c in args.only
    ]
    md = common.write_results(Path(args.out_dir), STEM, meta, render(meta))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
