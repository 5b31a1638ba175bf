"""The tables of ``bench_exact_coding`` from its committed raw JSON.

    python -m benchmarks.report_exact_coding \\
        benchmarks/results/exact_coding_cifar10/exact_coding.json

Writes ``exact_coding.md`` beside the JSON: portability (files decoded to the encoder's
codes under each kernel configuration, before and after), bits per code against the
float prior's NLL, and speed before and after (median of the rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks import common


def _row(name: str, r: dict) -> str:
    # each reason's first clause (the bench keeps 90 characters of it)
    why = "; ".join(
        f"{k.split(' (')[0].split(':')[0]} ({v})" for k, v in r.get("refusals", {}).items()
    )
    return (
        f"| {name} | {r['cpu_capability']} | {r['threads']} | {r['files']} | {r['equal']} | "
        f"{r['refused']} | {r['different']} | {why} |"
    )


def report(data: dict) -> list[str]:
    meta, prep, enc = data["meta"], data["prepare"], data["encode"]
    lines = [f"# Files that decode anywhere: {prep['images']} CIFAR-10 test images", ""]
    lines += common.meta_lines(meta)
    lines += [
        f"- code maps {prep['code_shape']} of K = {prep['num_symbols']}; exact twin "
        f"{prep['exact_hash']}, float prior {prep['prior_hash']}",
        "",
        "## Portability: every file decoded in a fresh process under each configuration",
        "",
        "Files encoded once, one per image, under this machine's kernels on one thread.",
        "",
        "| decoder | ATen capability | threads | files | same codes | refused | other codes "
        "| why refused |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for title, key in (
        ("after: version-2 files, exact twin", "decode"),
        ("before: version-1 files, float prior (the vqkit before)", "before_decode"),
        ("version-1 files read by the new decoder", "v1_with_new_decoder"),
    ):
        lines.append(f"| **{title}** | | | | | | | |")
        lines += [_row(name, r) for name, r in data[key].items()]
    nll = prep["nll_bits_per_code"]

    def rel(v: float) -> str:
        return f"{100 * (v / nll - 1):+.4f}%"

    lines += [
        "",
        "## Bits per code against the float prior's NLL",
        "",
        "| what | bits/code | vs float NLL |",
        "|---|---:|---:|",
        f"| float prior, teacher-forced NLL (float32) | {nll:.5f} | |",
        f"| exact twin, ideal (sum -log2 of the integer frequencies), files | "
        f"{enc['ideal_bits_per_code']:.5f} | {rel(enc['ideal_bits_per_code'])} |",
        f"| files: payload | {enc['file_payload_bits_per_code']:.5f} | "
        f"{rel(enc['file_payload_bits_per_code'])} |",
        f"| files: with the {enc['header_bytes']}-byte header | "
        f"{enc['file_bits_per_code']:.4f} | |",
        f"| streams of 250: ideal | {enc['stream_ideal_bits_per_code']:.5f} | "
        f"{rel(enc['stream_ideal_bits_per_code'])} |",
        f"| streams of 250: payload | {enc['stream_payload_bits_per_code']:.5f} | "
        f"{rel(enc['stream_payload_bits_per_code'])} |",
        f"| streams of 250: with header | {enc['stream_bits_per_code']:.5f} | |",
        "",
        "## Speed (images/s, whole path, one thread; median of "
        f"{len(data['speed']['after'])} alternating rounds)",
        "",
        "| what | before (float, v1) | after (exact, v2) | after / before |",
        "|---|---:|---:|---:|",
    ]
    keys = [
        ("files one at a time: encode", "files_encode_per_s"),
        ("files one at a time: decode", "files_decode_per_s"),
        ("streams of 250: encode", "streams_encode_per_s"),
        ("streams of 250: decode", "streams_decode_per_s"),
        ("files decoded side by side (decode_many)", "files_decode_side_by_side_per_s"),
    ]
    for label, k in keys:
        b = [r[k] for r in data["speed"]["before"] if k in r]
        a = [r[k] for r in data["speed"]["after"] if k in r]
        bm = statistics.median(b) if b else None
        am = statistics.median(a) if a else None
        ratio = f"{am / bm:.2f}" if am and bm else ""
        lines.append(f"| {label} | {common.fmt(bm, '.1f')} | {common.fmt(am, '.1f')} | {ratio} |")
    extra = data.get("speed_threads")
    if extra:
        lines += ["", "Two threads (after only; the float path had to run on one):", ""]
        lines += ["| what | images/s |", "|---|---:|"]
        for label, k in keys:
            vals = [r[k] for r in extra if k in r]
            if vals:
                lines.append(f"| {label} | {statistics.median(vals):.1f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", type=Path)
    args = p.parse_args()
    data = json.loads(args.json.read_text())
    md = args.json.with_suffix(".md")
    md.write_text("\n".join(report(data)) + "\n")
    print(md.read_text())


if __name__ == "__main__":
    main()
