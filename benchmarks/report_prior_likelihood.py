"""The likelihood table of docs/results.md ("The masked prior beside the autoregressive one
on CIFAR-10") from the two priors' own final evaluations, committed beside the table:

    python -m benchmarks.report_prior_likelihood --ar runs/c10-autoregressive \\
        --masked runs/c10-masked --out benchmarks/results/prior_likelihood_cifar10

copies each run's ``eval.json``, ``config.json`` and ``metrics.jsonl`` into ``--out``
(``ar/``, ``masked/``) and writes ``likelihood.md`` from the copies; ``--report`` rewrites
the table from the committed copies alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

FILES = ("eval.json", "config.json", "metrics.jsonl")


def table(out: Path) -> str:
    ar = json.loads((out / "ar" / "eval.json").read_text())
    mk = json.loads((out / "masked" / "eval.json").read_text())
    n_ar, n_mk = ar.get("eval_sequences"), mk.get("eval_sequences")
    rows = [
        "| prior | figure | bits per code |",
        "|---|---|---:|",
        f"| autoregressive | `test_bits`: -log2 p(c_t given the codes before it), "
        f"{n_ar} test maps | {ar['test_bits']:.2f} |",
    ]
    for pct in (25, 50, 90):
        rows.append(
            f"| masked | `test_masked_bits_{pct}`: per hidden code, {pct} % of the map hidden, "
            f"{n_mk} test maps | {mk[f'test_masked_bits_{pct}']:.2f} |"
        )
    head = (
        "# Prior likelihood on CIFAR-10 test maps\n\n"
        f"From `ar/eval.json` (step {ar['step']}) and `masked/eval.json` (step {mk['step']}), "
        "the priors' final evaluations; their options in `*/config.json`, every record in "
        "`*/metrics.jsonl`. Made by `python -m benchmarks.report_prior_likelihood`.\n\n"
    )
    return head + "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ar", type=Path)
    ap.add_argument("--masked", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--report", action="store_true", help="only rewrite the table")
    args = ap.parse_args()
    if not args.report:
        for name, run in (("ar", args.ar), ("masked", args.masked)):
            (args.out / name).mkdir(parents=True, exist_ok=True)
            for f in FILES:
                shutil.copyfile(run / f, args.out / name / f)
    text = table(args.out)
    (args.out / "likelihood.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
