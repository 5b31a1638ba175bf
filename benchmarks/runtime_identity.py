"""Bit-identity of fixed-seed runs before and after a refactor (issue 32: the runtime).

``benchmarks/runtime_identity_runs.sh DIR`` runs, with fixed seeds, a short MSE
tokenizer run, an adversarial one (``--preset vqgan``), an autoregressive and a masked
prior on the first, samples of both priors and ``vqkit compress`` of four sample images.
This script compares two such directories (one made at the old commit, one at the new)
and writes what is identical:

    python -m benchmarks.runtime_identity BEFORE AFTER --out benchmarks/results/runtime_identity

* every record of every ``metrics.jsonl`` (wall-time rates aside; ``renamed`` figure names
  mapped), key for key;
* every tensor of every checkpoint (``last.pt``, ``best.pt``, the prior's pinned
  tokenizer), of ``model.safetensors`` and of the sampled ``.npy`` maps; PNGs byte for
  byte; ``.vqz`` files byte for byte, and which bytes differ where they differ.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

RATES = {"images_per_s", "codes_per_s"}
RENAMED = {"disc_weight": "d_weight"}  # logged figures renamed by the change


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out: dict[str, torch.Tensor] = {}
    items = (
        obj.items()
        if isinstance(obj, dict)
        else enumerate(obj)
        if isinstance(obj, (list, tuple))
        else ()
    )
    for k, v in items:
        out.update(_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        rec = {RENAMED.get(k, k): v for k, v in json.loads(line).items() if k not in RATES}
        out.append(rec)
    return out


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    tensors = _tensors(ckpt)
    # the rng moved from {"torch": t} to one entry per rank, [{"torch": t}]
    return {k.replace("rng.0.", "rng."): v for k, v in tensors.items()}


def _pinned(run: Path) -> Path | None:
    found = sorted((run / "tokenizer").glob("*.pt")) if (run / "tokenizer").is_dir() else []
    return found[0] if found else None


def compare(before: Path, after: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"records": {}, "checkpoints": {}, "files": {}, "vqz": {}}
    for m in sorted(before.rglob("metrics.jsonl")):
        rel = m.relative_to(before)
        if not (after / rel).exists():
            continue
        a, b = _records(m), _records(after / rel)
        report["records"][str(rel)] = {
            "records": len(a),
            "identical": sum(x == y for x, y in zip(a, b, strict=False)),
            "count_after": len(b),
        }
    pairs = [(p, after / p.relative_to(before)) for p in sorted(before.rglob("checkpoints/*.pt"))]
    pairs = [(a, b) for a, b in pairs if b.exists()]
    for run in ("ar", "mk"):
        pa, pb = _pinned(before / run), _pinned(after / run)
        if pa and pb and pa != pb:
            pairs.append((pa, pb))
    for pa, pb in pairs:
        a, b = _checkpoint(pa), _checkpoint(pb)
        common = sorted(set(a) & set(b))
        report["checkpoints"][str(pa.relative_to(before))] = {
            "tensors": len(common),
            "identical": sum(torch.equal(a[k], b[k]) for k in common),
            "only_before": sorted(set(a) - set(b)),
            "only_after": sorted(set(b) - set(a)),
        }
    for st in sorted(before.rglob("model.safetensors")):
        rel = st.relative_to(before)
        if not (after / rel).exists():
            continue
        fa, fb = safe_open(str(st), "pt"), safe_open(str(after / rel), "pt")
        keys = list(fa.keys())
        same = sum(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in keys)
        report["files"][str(rel)] = {
            "tensors": len(keys),
            "identical": same,
            "metadata_identical": fa.metadata() == fb.metadata(),
        }
    for f in sorted([*before.rglob("sample_*.npy"), *before.rglob("sample_*.png")]):
        rel = f.relative_to(before)
        g = after / rel
        if not g.exists():
            continue
        if f.suffix == ".npy":
            same = np.array_equal(np.load(f), np.load(g))
        else:
            same = f.read_bytes() == g.read_bytes()
        report["files"][str(rel)] = {"identical": bool(same)}
    for f in sorted(before.rglob("*.vqz")):
        rel = f.relative_to(before)
        if not (after / rel).exists():
            continue
        a, b = f.read_bytes(), (after / rel).read_bytes()
        diff = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
        report["vqz"][str(rel)] = {"bytes": len(a), "identical": a == b, "differing": diff}
    return report


def _table(name: str, report: dict[str, Any]) -> list[str]:
    rec = report["records"]
    ck = report["checkpoints"]
    files = report["files"]
    vqz = report["vqz"]
    n_rec = sum(r["records"] for r in rec.values())
    same_rec = sum(r["identical"] for r in rec.values())
    n_t = sum(c["tensors"] for c in ck.values())
    same_t = sum(c["identical"] for c in ck.values())
    samples = [v for k, v in files.items() if "sample_" in k]
    st = {k: v for k, v in files.items() if k.endswith("model.safetensors")}
    diff_bytes = sorted({tuple(v["differing"]) for v in vqz.values()})
    return [
        f"| {name} | {same_rec} / {n_rec} | {same_t} / {n_t} | "
        f"{sum(v['identical'] for v in st.values())} / {sum(v['tensors'] for v in st.values())} "
        f"({sum(v['metadata_identical'] for v in st.values())} / {len(st)} metadata) | "
        f"{sum(v['identical'] for v in samples)} / {len(samples)} | "
        f"{sum(v['identical'] for v in vqz.values())} / {len(vqz)}"
        + (f" (differing bytes {list(diff_bytes[0])})" if diff_bytes and diff_bytes[0] else "")
        + " |"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--cross", type=Path, help="the new code's samples/compress of BEFORE's runs")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--report", action="store_true", help="rewrite the table from the JSON")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "runtime_identity.json"
    if not args.report:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        data = {
            "command": " ".join(sys.argv),
            "commit": commit,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "new_runs": compare(args.before, args.after),
        }
        if args.cross:
            data["new_code_on_old_runs"] = compare(args.before, args.cross)
        raw.write_text(json.dumps(data, indent=1))
    data = json.loads(raw.read_text())
    lines = [
        "# Fixed-seed runs before and after the runtime (issue 32)",
        "",
        f"From `{raw.name}` (`{data['command']}`, commit {data['commit'][:7]}). Runs:",
        "`benchmarks/runtime_identity_runs.sh` at each commit (1 thread).",
        "",
        "| comparison | metrics records equal | checkpoint tensors equal | "
        "model.safetensors tensors equal | sample maps / PNGs equal | .vqz byte-identical |",
        "|---|---:|---:|---:|---:|---:|",
        *_table("new code, new runs vs old", data["new_runs"]),
    ]
    if "new_code_on_old_runs" in data:
        lines += _table(
            "new code sampling / compressing the old runs", data["new_code_on_old_runs"]
        )
    (args.out / "runtime_identity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
