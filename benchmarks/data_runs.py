"""A run of one of issue 11's data targets, from its summary.json: one
result block in benchmarks/results/data-runs-<date>.txt and its summary.json
key.

  fmnist     Fashion-MNIST sensitive, public glyphs + MNIST:
             fmnist_cnn_accuracy = CNN accuracy on the real test split
  folder400  a user ImageFolder of 400 images per class:
             folder400_relative_accuracy = CNN accuracy / the same report's
             train-on-real CNN ceiling
  quality_cpu  MNIST with configs/quality-cpu.yaml (60-minute budget):
             quality_cpu_cnn_accuracy and quality_cpu_driver_seconds, one
             entry per run (lists)

Both figures are non-private evaluation (they read the real test split);
nothing is selected on them.

  python benchmarks/data_runs.py fmnist runs/<run>/summary.json --note "..."
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import run_summary
from bench_dp_step import cpu_name
from summary_json import update

KINDS = {"fmnist": "fmnist_cnn_accuracy", "folder400": "folder400_relative_accuracy",
         "quality_cpu": "quality_cpu_cnn_accuracy"}


def figure(kind: str, evaluation: dict) -> float:
    acc = evaluation["accuracy_cnn"]
    if kind in ("fmnist", "quality_cpu"):
        return round(acc, 4)
    return round(acc / evaluation["ceiling_accuracy_cnn"], 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=sorted(KINDS))
    ap.add_argument("summary", help="runs/<run>/summary.json")
    ap.add_argument("--note", default="", help="conditions of the run (load, what changed)")
    a = ap.parse_args()
    s = json.loads(Path(a.summary).read_text())
    e = s["evaluation"]
    value = figure(a.kind, e)
    lines = [f"# {a.kind} run, {datetime.date.today().isoformat()}",
             f"# machine: {cpu_name()}; run {Path(s['run_dir']).name}"]
    lines += [f"# note: {a.note}"] if a.note else []
    lines.append("CNN / MLP / LR (%): " + " / ".join(f"{100 * e[f'accuracy_{c}']:.1f}"
                                                 for c in ("cnn", "mlp", "lr")))
    lines.append("train-on-real ceiling CNN / MLP / LR (%): " + " / ".join(
        f"{100 * e[f'ceiling_accuracy_{c}']:.1f}" for c in ("cnn", "mlp", "lr")))
    lines.append(f"FID ({e.get('fid_images')} images) {e.get('fid', float('nan')):.1f}; "
                 f"KID {e.get('kid', float('nan')):.4f} +- {e.get('kid_std', float('nan')):.4f}")
    lines.append(f"epsilon {s['epsilon']:.4f} delta {s['delta']:.1e}; driver "
                 f"{s['total_seconds']:.0f} s; selection warning: {s.get('selection_warning')}")
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}"
                                               for k, v in s.get("stage_seconds", {}).items()))
    lines.append(f"{KINDS[a.kind]} = {value}")
    run_summary.append("data-runs", lines)
    if a.kind == "quality_cpu":  # several runs of one setting: lists
        update({KINDS[a.kind]: value, "quality_cpu_driver_seconds": round(s["total_seconds"], 1)},
               append=(KINDS[a.kind], "quality_cpu_driver_seconds"))
    else:
        update({KINDS[a.kind]: value})


if __name__ == "__main__":
    main()
