"""Do `.vqz` files decode on other kernels? Bits and speed before and after (issue 34).

    python -m benchmarks.bench_exact_coding --prior runs/c10-autoregressive \\
        --data ../shared/data/cifar10-jpeg.tar.gz --base-src ../base/src --name exact_coding_cifar10

Every phase is a fresh worker process (``--phase``), so that the ATen / oneDNN kernel
set and the thread count are chosen by its environment, and "before" runs the vqkit
at ``--base-src`` (a checkout of the commit before the exact coding model, put first on
``PYTHONPATH``):

1. ``prepare``: the tokenizer's codes of the split and the float prior's teacher-forced
   NLL (bits per code).
2. ``encode``: every image as its own file (what ``vqkit compress`` writes), written to
   the work folder, plus streams of 250 maps; ideal bits and payload bytes.
3. ``decode`` under each kernel configuration (:data:`CONFIGS`): every file decoded in a
   fresh process (side by side, as ``vqkit decompress`` does); codes equal to the
   encoder's, refused, or different (never expected).
4. ``before``: the same with the vqkit at ``--base-src`` (version-1 files, float
   probabilities) on ``--before-files`` files; and the new decoder on those files.
5. ``speed``: files one at a time (encode: tokenizer + coder; decode: coder + tokenizer
   decoder) and streams of 250, before and after, alternating, ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

MODULE = "benchmarks.bench_exact_coding"
CONFIGS = {
    "this machine's kernels, 1 thread": {},
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "ATEN_CPU_CAPABILITY=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "ATEN_CPU_CAPABILITY=avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "ONEDNN_MAX_CPU_ISA=AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "2 threads": {"THREADS": "2"},
}


# ------------------------------------------------------------------ worker phases


def _setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def _codec(args):
    import vqkit.compress.codec as cc

    return cc, cc.load_codec(args.prior, device="cpu")


def phase_prepare(args) -> dict:
    torch = _setup(1)
    import numpy as np

    from vqkit.data import load_dataset

    cc, codec = _codec(args)
    data = load_dataset(args.data, "test", image_size=codec.image_size, channels=codec.channels)
    n = len(data) if args.limit is None else min(args.limit, len(data))
    images, labels = data.images[:n], data.labels[:n]
    codes = torch.cat([cc.images_to_codes(codec, images[i : i + 256]) for i in range(0, n, 256)])
    work = Path(args.work)
    np.save(work / "codes.npy", codes.numpy())
    np.save(work / "labels.npy", labels.numpy())
    prior = codec.prior.eval()
    nats = 0.0
    with torch.no_grad():
        for i in range(0, n, 256):
            nats += float(-prior.log_prob(codes[i : i + 256], labels[i : i + 256]).double().sum())
    return {
        "images": n,
        "code_shape": list(codec.code_shape),
        "num_symbols": codec.num_symbols,
        "nll_bits_per_code": nats / (n * prior.seq_len) / math.log(2),
        "exact_hash": getattr(codec, "exact_hash", "")[:16],
        "prior_hash": codec.prior_hash[:16],
    }


def _load_inputs(args):
    import numpy as np

    work = Path(args.work)
    return np.load(work / "codes.npy"), np.load(work / "labels.npy")


def phase_encode(args) -> dict:
    """After: every map its own file (encode_many: side by side), and streams of 250."""
    _setup(1)
    cc, codec = _codec(args)
    codes, labels = _load_inputs(args)
    n = len(codes) if args.count is None else min(args.count, len(codes))
    out = Path(args.files)
    out.mkdir(parents=True, exist_ok=True)
    stats = [{} for _ in range(n)]
    t0 = time.perf_counter()
    blobs = cc.encode_many(
        codec, [(codes[i : i + 1], int(labels[i])) for i in range(n)], stats=stats
    )
    enc_s = time.perf_counter() - t0
    for i, b in enumerate(blobs):
        (out / f"{i:05d}.vqz").write_bytes(b)
    t_len = codes[0].size
    res = {
        "files": n,
        "encode_side_by_side_s": enc_s,
        "ideal_bits_per_code": sum(s["ideal_bits"] for s in stats) / (n * t_len),
        "file_payload_bits_per_code": 8 * sum(s["payload_bytes"] for s in stats) / (n * t_len),
        "file_bits_per_code": 8 * sum(len(b) for b in blobs) / (n * t_len),
        "header_bytes": stats[0]["header_bytes"],
    }
    sb = 250
    st = [{} for _ in range(0, n, sb)]
    streams = cc.encode_many(
        codec,
        [(codes[i : i + sb], [int(v) for v in labels[i : i + sb]]) for i in range(0, n, sb)],
        stats=st,
    )
    res["stream_payload_bits_per_code"] = 8 * sum(s["payload_bytes"] for s in st) / (n * t_len)
    res["stream_bits_per_code"] = 8 * sum(len(s) for s in streams) / (n * t_len)
    res["stream_ideal_bits_per_code"] = sum(s["ideal_bits"] for s in st) / (n * t_len)
    return res


def phase_encode_v1(args) -> dict:
    """Before: the vqkit at --base-src writes version-1 files, one per map."""
    _setup(1)
    cc, codec = _codec(args)
    codes, labels = _load_inputs(args)
    n = min(args.count, len(codes))
    out = Path(args.files)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (out / f"{i:05d}.vqz").write_bytes(cc.encode_maps(codec, codes[i : i + 1], int(labels[i])))
    return {"files": n}


def phase_decode(args) -> dict:
    """Every file of --files decoded in this process (its kernels and threads)."""
    torch = _setup(int(os.environ.get("THREADS", "1")))
    import numpy as np

    cc, codec = _codec(args)
    codes, _ = _load_inputs(args)
    paths = sorted(Path(args.files).glob("*.vqz"))
    datas = [p.read_bytes() for p in paths]
    equal = refused = differ = 0
    reasons: dict[str, int] = {}
    t0 = time.perf_counter()
    decode_many = getattr(cc, "decode_many", None)  # absent in the vqkit before
    if decode_many is not None and not args.one_by_one:
        try:
            results = [m for m, _ in decode_many(codec, datas, [p.name for p in paths])]
        except ValueError:  # one bad file refuses the batch: fall back to one by one
            results = None
    else:
        results = None
    if results is None:
        results = []
        for p, d in zip(paths, datas, strict=True):
            try:
                results.append(cc.decode_maps(codec, d, p.name)[0])
            except ValueError as e:
                results.append(None)
                key = str(e).split(": ", 1)[-1][:90]
                reasons[key] = reasons.get(key, 0) + 1
    dec_s = time.perf_counter() - t0
    for p, m in zip(paths, results, strict=True):
        if m is None:
            refused += 1
        elif np.array_equal(m[0], codes[int(p.stem)]):
            equal += 1
        else:
            differ += 1
    return {
        "files": len(paths),
        "equal": equal,
        "refused": refused,
        "different": differ,
        "refusals": reasons,
        "decode_s": dec_s,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def phase_speed(args) -> dict:
    """Files one at a time and streams of 250, through the public API (1 thread, or
    THREADS)."""
    torch = _setup(int(os.environ.get("THREADS", "1")))
    from vqkit.data import load_dataset

    cc, codec = _codec(args)
    data = load_dataset(args.data, "test", image_size=codec.image_size, channels=codec.channels)
    nf, ns = args.speed_files, args.speed_streams * 250
    images, labels = data.images[: max(nf, ns)], data.labels[: max(nf, ns)]
    t0 = time.perf_counter()
    files = [
        cc.encode_maps(codec, cc.images_to_codes(codec, images[i : i + 1]), int(labels[i]))
        for i in range(nf)
    ]
    enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in files:
        m, _ = cc.decode_maps(codec, b)
        cc.codes_to_images(codec, m)
    dec = time.perf_counter() - t0
    res = {"files_encode_per_s": nf / enc, "files_decode_per_s": nf / dec}
    decode_many = getattr(cc, "decode_many", None)
    if decode_many is not None:
        t0 = time.perf_counter()
        maps = decode_many(codec, files)
        cc.codes_to_images(codec, torch.cat([torch.as_tensor(m) for m, _ in maps]).numpy())
        res["files_decode_side_by_side_per_s"] = nf / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    streams = [
        cc.encode(images[i : i + 250], codec, labels=labels[i : i + 250]) for i in range(0, ns, 250)
    ]
    s_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in streams:
        cc.decode(s, codec)
    s_dec = time.perf_counter() - t0
    res.update(streams_encode_per_s=ns / s_enc, streams_decode_per_s=ns / s_dec)
    return res


PHASES = {
    "prepare": phase_prepare,
    "encode": phase_encode,
    "encode_v1": phase_encode_v1,
    "decode": phase_decode,
    "speed": phase_speed,
}


# ------------------------------------------------------------------ the parent


def _worker(args, phase: str, *, base: bool = False, env: dict | None = None, **kw) -> dict:
    cmd = [sys.executable, "-m", MODULE, "--phase", phase, "--prior", args.prior,
           "--data", args.data, "--work", args.work]  # fmt: skip
    for k, v in kw.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v is not None and v is not False:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    penv = common.child_env()
    if base:  # the vqkit before: its source first on the path
        penv["PYTHONPATH"] = os.pathsep.join([args.base_src, penv["PYTHONPATH"]])
    penv.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})})
    if "THREADS" in (env or {}):
        penv["OMP_NUM_THREADS"] = penv["MKL_NUM_THREADS"] = env["THREADS"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=penv, timeout=args.timeout)
    if res.returncode != 0:
        raise SystemExit(f"worker {phase} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    print(f"  {phase} {env or ''} base={base}: {json.dumps(out)[:300]}", flush=True)
    return out


def run(args) -> None:
    meta = common.run_meta(MODULE, args.note)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"meta": meta}
    result["prepare"] = _worker(args, "prepare")
    after = work / "v2"
    shutil.rmtree(after, ignore_errors=True)
    result["encode"] = _worker(args, "encode", files=after)
    result["decode"] = {
        name: _worker(args, "decode", env=env, files=after) for name, env in CONFIGS.items()
    }
    before = work / "v1"
    shutil.rmtree(before, ignore_errors=True)
    _worker(args, "encode_v1", base=True, files=before, count=args.before_files)
    result["before_decode"] = {
        name: _worker(args, "decode", base=True, env=env, files=before, one_by_one=True)
        for name, env in CONFIGS.items()
    }
    result["v1_with_new_decoder"] = {
        name: _worker(args, "decode", env=env, files=before, one_by_one=True)
        for name, env in list(CONFIGS.items())[:3]
    }
    result["speed"] = {"before": [], "after": []}
    result["speed_threads"] = []
    for _ in range(args.rounds):
        result["speed"]["before"].append(_worker(args, "speed", base=True))
        result["speed"]["after"].append(_worker(args, "speed"))
        result["speed_threads"].append(_worker(args, "speed", env={"THREADS": "2"}))
    common.finish_meta(meta)
    out = common.RESULTS_DIR / args.name
    (out).mkdir(parents=True, exist_ok=True)
    (out / "exact_coding.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out / 'exact_coding.json'}; tables: python -m benchmarks.report_exact_coding")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prior", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--work", default="/tmp/bench_exact_coding")
    p.add_argument("--base-src", default=None, help="src/ of the vqkit before (version 1)")
    p.add_argument("--name", default="exact_coding")
    p.add_argument("--limit", type=int, default=None, help="images of the split (default all)")
    p.add_argument("--before-files", type=int, default=1000)
    p.add_argument("--speed-files", type=int, default=300)
    p.add_argument("--speed-streams", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--note", default=None)
    # worker side
    p.add_argument("--phase", choices=sorted(PHASES), default=None)
    p.add_argument("--files", default=None)
    p.add_argument("--count", type=int, default=None)
    p.add_argument("--one-by-one", action="store_true")
    args = p.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return
    if not args.base_src:
        p.error("--base-src is required (the vqkit before, for the comparison)")
    run(args)


if __name__ == "__main__":
    main()
