"""Shared by the scripts that turn a run's summary.json into a committed
result block: argument parsing, the header, and appending to
benchmarks/results/<kind>-<date>.txt (several runs a day stay side by side)."""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from machine import cpu_name


def load(description: str) -> tuple[dict, str]:
    """(summary dict, note) from the command line: SUMMARY [--note TEXT]
    [--new-series]; the flag is kept in the dict as ``summary["new_series"]``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("summary", help="runs/<run>/summary.json")
    ap.add_argument("--note", default="", help="conditions of the run (load, what changed)")
    ap.add_argument("--new-series", action="store_true",
                    help="start summary.json's per-run lists anew (the defaults changed: "
                         "earlier runs measured other settings)")
    a = ap.parse_args()
    return {**json.loads(Path(a.summary).read_text()), "new_series": a.new_series}, a.note


def header(title: str, summary: dict, note: str) -> list[str]:
    lines = [f"# {title}, {datetime.date.today().isoformat()}",
             f"# machine: {cpu_name()}; run {Path(summary['run_dir']).name}"]
    return lines + ([f"# note: {note}"] if note else [])


def append(kind: str, lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / f"{kind}-{datetime.date.today().isoformat()}.txt"
    with out.open("a") as f:
        f.write(("\n" if out.exists() and out.stat().st_size else "") + text)
