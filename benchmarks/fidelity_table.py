"""A table of fidelity and utility per setting from benchmarks/quality_explore.py's
JSON lines (run with --fid-images): validation FID / KID against validation
CNN accuracy, every figure on the validation split (train images
55,000-59,999), none on the test split.

    python benchmarks/quality_explore.py --init ... --fid-images 5000 >> rows.jsonl
    python benchmarks/fidelity_table.py rows.jsonl --note "idle machine"

Appends the table and the raw lines to benchmarks/results/fidelity-<date>.txt
(``--name`` another prefix; ``--utility-only`` also keeps rows without FID,
e.g. the coloured-digit folder's rows, whose validation split is its own).
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from machine import cpu_name, git_commit
from run_summary import append

COLUMNS = (("note", "setting", "{}"), ("solver", "solver", "{}"),
           ("sampler_steps", "steps", "{}"), ("val_fid", "FID", "{:.2f}"),
           ("val_kid", "KID", "{:.4f}"), ("val_kid_std", "KID std", "{:.4f}"),
           ("val_accuracy_cnn", "CNN", "{:.4f}"), ("epsilon", "epsilon", "{:.3f}"),
           ("sample_s", "sampling s", "{:.0f}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", help="quality_explore.py output (JSON lines; other lines skipped)")
    ap.add_argument("--note", default="", help="conditions of the runs (load, what changed)")
    ap.add_argument("--name", default="fidelity", help="the results file's prefix")
    ap.add_argument("--utility-only", action="store_true",
                    help="keep the rows without FID too")
    a = ap.parse_args()
    rows = [json.loads(ln) for ln in Path(a.rows).read_text().splitlines()
            if ln.startswith("{") and ("val_fid" in ln or a.utility_only)]
    lines = [f"# {a.name}: settings against validation scores, {datetime.date.today().isoformat()}",
             f"# machine: {cpu_name()}; commit {git_commit()}"]
    lines += [f"# note: {a.note}"] if a.note else []
    lines += ["| " + " | ".join(c[1] for c in COLUMNS) + " |",
              "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt.format(r[k]) if r.get(k) is not None else ""
                                for k, _, fmt in COLUMNS) + " |" for r in rows]
    lines += ["", "# raw lines (benchmarks/quality_explore.py)"]
    lines += [json.dumps(r) for r in rows]
    append(a.name, lines)


if __name__ == "__main__":
    main()
