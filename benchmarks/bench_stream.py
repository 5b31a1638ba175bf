"""Peak memory of streaming shards versus loading the split into memory.

For each dataset (synthetic 32x32 RGB noise at 10k and 50k images, and the CIFAR-10
JPEG train split when ``../shared/data/cifar10-jpeg.tar.gz`` is present), the parent
packs shards with ``vqkit.data.pack.pack`` into a temporary folder, then runs one child
process per mode and samples the child's process tree every 50 ms (psutil):

* ``stream``: ``ShardLoader(batch_size=256, num_workers=2)`` through one epoch;
* ``memory``: ``open_shards(...).load()`` (the whole split decoded into an ImageData)
  and one epoch of ``BatchLoader`` over it, for contrast.

Recorded per child: VmRSS after imports and setup (baseline), VmHWM (peak RSS of the main
process, reset after the baseline with ``echo 5 > /proc/self/clear_refs``), the largest
worker's peak RSS (``RUSAGE_CHILDREN``), and the tree's peak summed RSS and PSS from the
sampler (RSS double-counts the pages forked workers share with the main process; PSS
splits them). Writes ``benchmarks/results/stream_memory/results.{json,md}``.

    python -m benchmarks.bench_stream                 # ~1-2 minutes on 2 cores
    python -m benchmarks.bench_stream --sizes 10000 --no-cifar
    python -m benchmarks.bench_stream --sizes 1000 --no-cifar --out-dir /tmp/bs  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import malloc_trim, reset_hwm, status_kib

MODULE = "benchmarks.bench_stream"
ROOT = common.REPO_ROOT
MIB = 1024  # KiB per MiB


# ----------------------------------------------------------------------------- child


def _child(args: argparse.Namespace) -> int:
    import torch

    from vqkit.data import BatchLoader, ShardLoader, open_shards

    torch.set_num_threads(1)  # the workers decode; keep the main process to one core
    shards = open_shards(args.shards)
    malloc_trim()
    base = status_kib("VmRSS")
    hwm_reset = reset_hwm()
    t0 = time.perf_counter()
    if args.child == "stream":
        loader = ShardLoader(shards, args.batch_size, num_workers=args.num_workers)
        steps = loader.batches_per_epoch
        for _ in range(steps):
            loader.next_batch()
        loader.close()
    else:
        data = shards.load()
        loader = BatchLoader(data, args.batch_size)
        steps = loader.batches_per_epoch
        for _ in range(steps):
            loader.next_batch()
    wall = time.perf_counter() - t0
    rec = {
        "status": "ok",
        "images": steps * args.batch_size,
        "wall_s": round(wall, 2),
        "images_per_s": round(steps * args.batch_size / wall),
        "baseline_mib": round(base / MIB, 1),
        "peak_main_mib": round(status_kib("VmHWM") / MIB, 1),
        "peak_extra_main_mib": round((status_kib("VmHWM") - base) / MIB, 1),
        "hwm_reset": hwm_reset,
        "peak_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / MIB, 1),
    }
    print("RESULT " + json.dumps(rec), flush=True)
    return 0


# ---------------------------------------------------------------------------- parent


def _tree_memory(proc) -> tuple[int, int | None]:
    """(summed RSS, summed PSS or None) in bytes of a process and its descendants."""
    import psutil

    rss, pss = 0, 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss += p.memory_info().rss
            if pss is not None:
                pss += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            pss = None if not isinstance(pss, int) else pss
    return rss, pss


def _run_child(mode: str, shards: Path, args: argparse.Namespace) -> dict:
    import psutil

    cmd = common.child_cmd(
        MODULE,
        "--child",
        mode,
        "--shards",
        shards,
        "--batch-size",
        args.batch_size,
        "--num-workers",
        args.num_workers,
    )
    # -m benchmarks.bench_stream resolves from the repository root; vqkit as for the parent
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        try:
            rss, pss = _tree_memory(ps)
        except psutil.NoSuchProcess:
            break
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss or 0)
        time.sleep(0.05)
    out, err = proc.communicate()
    rec = next((json.loads(x[7:]) for x in out.splitlines() if x.startswith("RESULT ")), None)
    if rec is None:
        return {"status": "crash", "error": err.strip().splitlines()[-3:]}
    return {
        **rec,
        "peak_tree_rss_mib": round(peak_rss / 2**20, 1),
        "peak_tree_pss_mib": round(peak_pss / 2**20, 1) if peak_pss else None,
    }


def _synthetic(n: int):
    import numpy as np
    import torch

    from vqkit.data import ImageData

    g = np.random.default_rng(0)
    images = torch.from_numpy(g.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8))
    return ImageData(images, torch.from_numpy(g.integers(0, 10, size=n)), source=f"noise-{n}")


def _write(records: list[dict], meta: dict, out_dir: Path) -> None:
    lines = [
        "# Streaming shards: peak memory (CPU)",
        "",
        *common.meta_lines(
            meta,
            ("torch", "vqkit", "webdataset", "pillow", "psutil"),
            f", Python {meta['machine']['python']}",
        ),
        f"- settings: batch 256, {meta['num_workers']} DataLoader workers, shuffle buffer "
        "1000, one epoch; main process torch threads 1",
        *([f"- note: {meta['note']}"] if meta.get("note") else []),
        "- baseline = VmRSS of the child after imports and opening the shards; main peak = "
        "VmHWM (reset after the baseline); worker peak = largest worker's max RSS; tree = "
        "summed over main + workers, sampled every 50 ms (RSS counts the pages workers "
        "share with the main process once per process; PSS splits them)",
        "",
        "| dataset | images | shards MiB | mode | images/s | baseline MiB | main peak MiB "
        "| main extra MiB | worker peak MiB | tree RSS MiB | tree PSS MiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {r['dataset']} | {r['n']} | | {r['mode']} | {r.get('error')} |")
            continue
        lines.append(
            f"| {r['dataset']} | {r['n']} | {r['shard_mib']} | {r['mode']} | {r['images_per_s']} "
            f"| {r['baseline_mib']} | {r['peak_main_mib']} | {r['peak_extra_main_mib']} "
            f"| {r['peak_worker_mib']} | {r['peak_tree_rss_mib']} | {r['peak_tree_pss_mib']} |"
        )
    ok = [r for r in records if r.get("status") == "ok"]
    for mode in ("stream", "memory"):
        rows = sorted((r for r in ok if r["mode"] == mode), key=lambda r: r["n"])
        if len(rows) > 1:
            lo, hi = rows[0], rows[-1]
            lines.append(
                f"\n{mode}: main-process peak extra {lo['peak_extra_main_mib']} MiB at "
                f"{lo['n']} images ({lo['dataset']}), {hi['peak_extra_main_mib']} MiB at "
                f"{hi['n']} ({hi['dataset']}); tree PSS {lo['peak_tree_pss_mib']} -> "
                f"{hi['peak_tree_pss_mib']} MiB."
            )
    common.write_results(out_dir, "results", {"meta": meta, "records": records}, lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,50000", help="synthetic dataset sizes")
    p.add_argument("--no-cifar", action="store_true", help="skip the CIFAR-10 JPEG train split")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--out-dir", default=str(common.out_dir("stream_memory")))
    p.add_argument("--note", default="")
    p.add_argument("--child", choices=("stream", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)
    from vqkit.data.pack import pack

    started = time.perf_counter()
    meta = {**common.run_meta(MODULE, args.note or None), "num_workers": args.num_workers}
    from importlib import metadata

    meta["machine"]["versions"].update(
        {k: metadata.version(k) for k in ("webdataset", "pillow", "psutil")}
    )
    sizes = [int(n) for n in args.sizes.split(",") if n]
    jobs: list[tuple[str, object]] = [(f"noise32-{n}", _synthetic) for n in sizes]
    shared = Path(os.environ.get("VQKIT_SHARED_DATA", ROOT.parent / "shared/data"))
    cifar = shared / "cifar10-jpeg.tar.gz"
    if not args.no_cifar and cifar.is_file():
        jobs.append(("cifar10-jpeg-train", cifar))
    records: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="vqkit-bench-stream-"))
    try:
        for name, src in jobs:
            t0 = time.perf_counter()
            source = src(int(name.rsplit("-", 1)[1])) if callable(src) else src
            entry = pack(source, work / name, 1000)
            del source
            n = entry["num_images"]
            size = sum(f.stat().st_size for f in (work / name).glob("*.tar")) / 2**20
            pack_s = time.perf_counter() - t0
            for mode in ("stream", "memory"):
                rec = {
                    "dataset": name,
                    "n": n,
                    "mode": mode,
                    "shard_mib": round(size, 1),
                    "pack_s": round(pack_s, 1),
                    **_run_child(mode, work / name, args),
                }
                records.append(rec)
                print(json.dumps(rec), flush=True)
                _write(records, meta, Path(args.out_dir))
            shutil.rmtree(work / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    common.finish_meta(meta)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    _write(records, meta, Path(args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
