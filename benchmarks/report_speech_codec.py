"""Speech codec evaluations side by side (issue 35's evidence): tables made from the
``eval.json`` files of ``vqkit train`` / ``vqkit eval`` on codec runs.

    python -m benchmarks.report_speech_codec \\
        --runs "1,200 steps=runs/fsdd-codec/eval-test/eval.json" \\
               "4,800 steps=runs/fsdd-codec-long/eval-test/eval.json" \\
        --seen runs/fsdd-codec/eval-test/eval.json \\
        --holdout george=runs/fsdd-codec-holdout/eval-test/eval.json \\
        --out benchmarks/results/fsdd_codec_report

* ``--runs NAME=EVAL ...``: per stage count, kbit/s, PESQ-NB, STOI, SI-SDR and mel
  distance of each evaluation (the means over the speakers, as ``eval.json`` has them).
* ``--seen EVAL --holdout S=EVAL ...``: the held-out-speaker comparison, a table per
  held-out speaker ``S``. The evaluations must cover every speaker's test clips with
  ``per_speaker`` scores (``vqkit eval RUN``): ``--seen`` of a model trained on every
  speaker, each ``--holdout`` of one trained without ``S`` (``--holdout-speaker S``).
  Per stage count: PESQ-NB / STOI on ``S``'s clips (unseen by the held-out model only)
  and on the other speakers' clips (seen by both; their mean), under each model.

Every input is copied into ``--out`` (``<name>.json``) and the tables are made from the
copies, so the committed table is reproducible from committed files (``--from-copies``
rebuilds it from them alone). Writes ``report.md`` and ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from benchmarks import common

MODULE = "benchmarks.report_speech_codec"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def stage_rows(ev: dict) -> dict[int, dict]:
    return {int(r["num_stages"]): r for r in ev["stages"]}


def per_speaker(row: dict, where: str) -> dict[str, dict]:
    each = row.get("per_speaker")
    if not each:
        raise SystemExit(f"{where}: no per_speaker scores (evaluate it with vqkit eval RUN)")
    return each


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_table(runs: dict[str, dict]) -> list[str]:
    """One row per (stage count, run)."""
    f = common.fmt
    rows = []
    counts = sorted({n for ev in runs.values() for n in stage_rows(ev)})
    for n in counts:
        for name, ev in runs.items():
            r = stage_rows(ev).get(n)
            if r is None:
                continue
            rows.append([n, name, f(r["kbps"], ".1f"), f(r.get("pesq_nb"), ".2f"),
                         f(r.get("stoi"), ".3f"), f(r["si_sdr"], ".1f"),
                         f(r["mel_distance"], ".3f")])  # fmt: skip
    return common.md_table(
        ["stages", "model", "kbit/s", "PESQ-NB", "STOI", "SI-SDR dB", "mel distance"],
        rows,
        "rlrrrrr",
    )


def holdout_rows(seen: dict, held: dict, speaker: str) -> list[dict]:
    """Per stage count both models have: the held-out speaker's and the others' mean
    PESQ-NB / STOI under each model."""
    out = []
    held_rows = stage_rows(held)
    for n, s_row in sorted(stage_rows(seen).items()):
        if n not in held_rows:
            continue
        a, b = per_speaker(s_row, "--seen"), per_speaker(held_rows[n], "--holdout")
        if speaker not in a or speaker not in b:
            raise SystemExit(f"speaker {speaker!r} is not in both evaluations ({sorted(a)})")
        others = sorted(set(a) & set(b) - {speaker})
        rec = {"num_stages": n, "kbps": s_row["kbps"], "others": others}
        for key in ("pesq_nb", "stoi"):
            rec[f"seen_{key}"] = a[speaker].get(key)
            rec[f"held_{key}"] = b[speaker].get(key)
            rec[f"seen_others_{key}"] = mean([a[o][key] for o in others if key in a[o]])
            rec[f"held_others_{key}"] = mean([b[o][key] for o in others if key in b[o]])
        out.append(rec)
    return out


def holdout_table(rows: list[dict], speaker: str) -> list[str]:
    f = common.fmt

    def change(a: float | None, b: float | None, spec: str) -> str:
        return f(b - a if a is not None and b is not None else None, spec)

    body = []
    for r in rows:
        for who, pre in ((speaker, ""), ("the other five", "others_")):
            seen_p, held_p = r[f"seen_{pre}pesq_nb"], r[f"held_{pre}pesq_nb"]
            seen_s, held_s = r[f"seen_{pre}stoi"], r[f"held_{pre}stoi"]
            body.append([r["num_stages"], f(r["kbps"], ".1f"), who,
                         f(seen_p, ".2f"), f(held_p, ".2f"),
                         change(seen_p, held_p, "+.2f"), f(seen_s, ".3f"), f(held_s, ".3f"),
                         change(seen_s, held_s, "+.3f")])  # fmt: skip
    return common.md_table(
        ["stages", "kbit/s", "test clips of", "PESQ-NB all 6", f"PESQ-NB without {speaker}",
         "change", "STOI all 6", f"STOI without {speaker}", "change"],
        body,
        "rrlrrrrrr",
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="*", default=[], help="NAME=EVAL_JSON evaluations")
    ap.add_argument("--seen", help="eval.json of the model trained on every speaker")
    ap.add_argument("--holdout", nargs="*", default=[],
                    help="SPEAKER=EVAL_JSON of a model trained without SPEAKER")  # fmt: skip
    ap.add_argument("--out", required=True, help="folder for the copies and the report")
    ap.add_argument("--from-copies", action="store_true",
                    help="rebuild report.md from the copies --out/report.json names")  # fmt: skip
    ap.add_argument("--note", help="free text stored in the results")
    args = ap.parse_args()
    out = Path(args.out)
    if args.from_copies:
        kept = json.loads((out / "report.json").read_text())["inputs"]
        runs, seen_file, held_files = kept["runs"], kept["seen"], kept["holdout"]
    else:
        out.mkdir(parents=True, exist_ok=True)
        runs, held_files = {}, {}
        for item in args.runs:
            name, _, path = item.partition("=")
            runs[name] = f"{slug(name)}.json"
            shutil.copyfile(path, out / runs[name])
        seen_file = "seen.json" if args.seen else None
        if args.seen:
            shutil.copyfile(args.seen, out / seen_file)
        for item in args.holdout:
            speaker, _, path = item.partition("=")
            held_files[speaker] = f"holdout_{slug(speaker)}.json"
            shutil.copyfile(path, out / held_files[speaker])
    meta = common.run_meta(MODULE, args.note)
    read = {name: json.loads((out / file).read_text()) for name, file in runs.items()}
    lines: list[str] = []
    inputs = {"runs": runs, "seen": seen_file, "holdout": held_files}
    result: dict = {"meta": meta, "inputs": inputs, "holdout_rows": {}}
    if read:
        lines += ["## By stage count", "", *run_table(read), ""]
    if held_files and not seen_file:
        raise SystemExit("--holdout needs --seen: the model trained on every speaker")
    seen = json.loads((out / seen_file).read_text()) if held_files else None
    for speaker, file in held_files.items():
        rows = holdout_rows(seen, json.loads((out / file).read_text()), speaker)
        result["holdout_rows"][speaker] = rows
        lines += [f"## Held-out speaker: {speaker}", "",
                  f"Each speaker's test clips joined and aligned; the model trained on all 6 "
                  f"speakers against the one trained without {speaker}.", "",
                  *holdout_table(rows, speaker), ""]  # fmt: skip
    common.finish_meta(meta)
    lines = ["# Speech codec evaluations", "", *common.meta_lines(meta), "", *lines]
    common.write_results(out, "report", result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
