"""A run of one of the data targets below, from its summary.json: one
result block in benchmarks/results/data-runs-<date>.txt and its summary.json
key.

  fmnist       Fashion-MNIST sensitive, public glyphs + MNIST:
               fmnist_cnn_accuracy = CNN accuracy on the real test split
  folder400    a user ImageFolder of 400 images per class:
               folder400_relative_accuracy = CNN accuracy / the same report's
               train-on-real CNN ceiling
  quality_cpu  MNIST with configs/quality-cpu.yaml (60-minute budget):
               quality_cpu_cnn_accuracy and quality_cpu_driver_seconds, one
               entry per run (lists), and quality_cpu_fid_5k where the run's
               FID is on the protocol's 5,000+ images per side

All figures are non-private evaluation (they read the real test split);
nothing is selected on them.

  python benchmarks/data_runs.py fmnist runs/<run>/summary.json --note "..."
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import run_summary
from summary_json import update

from privimage_core.evaluation.protocol import meets_protocol


class Kind(NamedTuple):
    key: str                        # the summary.json key of the accuracy figure
    relative: bool = False          # CNN accuracy over the report's train-on-real ceiling
    seconds_key: str | None = None  # set: a repeated setting, both keys are per-run lists
    fid_key: str | None = None      # the run's FID, where it meets the protocol (a list too)


KINDS = {"fmnist": Kind("fmnist_cnn_accuracy"),
         "folder400": Kind("folder400_relative_accuracy", relative=True),
         "quality_cpu": Kind("quality_cpu_cnn_accuracy", seconds_key="quality_cpu_driver_seconds",
                            fid_key="quality_cpu_fid_5k")}


def figure(kind: Kind, evaluation: dict) -> float:
    acc = evaluation["accuracy_cnn"]
    return round(acc / evaluation["ceiling_accuracy_cnn"] if kind.relative else acc, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=sorted(KINDS))
    ap.add_argument("summary", help="runs/<run>/summary.json")
    ap.add_argument("--note", default="", help="conditions of the run (load, what changed)")
    ap.add_argument("--variant", action="store_true",
                    help="a variant of the target's setting (another method or option): "
                         "the block is written, summary.json's key is left alone")
    a = ap.parse_args()
    s = json.loads(Path(a.summary).read_text())
    e = s["evaluation"]
    kind = KINDS[a.kind]
    value = figure(kind, e)
    lines = run_summary.header(f"{a.kind} run", s, a.note)
    lines.append("CNN / MLP / LR (%): " + " / ".join(f"{100 * e[f'accuracy_{c}']:.1f}"
                                                 for c in ("cnn", "mlp", "lr")))
    lines.append("train-on-real ceiling CNN / MLP / LR (%): " + " / ".join(
        f"{100 * e[f'ceiling_accuracy_{c}']:.1f}" for c in ("cnn", "mlp", "lr")))
    lines.append(f"FID ({e['fid_images']} images) {e['fid']:.1f}; KID {e['kid']:.4f} +- "
                 f"{e['kid_std']:.4f}" if "fid" in e else "FID / KID: not computed (evaluation.fid off)")
    lines.append(f"epsilon {s['epsilon']:.4f} delta {s['delta']:.1e}; driver "
                 f"{s['total_seconds']:.0f} s; selection warning: {s.get('selection_warning')}")
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}"
                                               for k, v in s.get("stage_seconds", {}).items()))
    lines.append(f"{kind.key}{' (variant, not the headline key)' if a.variant else ''} = {value}")
    run_summary.append("data-runs", lines)
    if a.variant:
        return
    if kind.seconds_key:
        fid = {kind.fid_key: round(e["fid"], 2)} if kind.fid_key and meets_protocol(e) else {}
        update({kind.key: value, kind.seconds_key: round(s["total_seconds"], 1), **fid},
               append=(kind.key, kind.seconds_key, *fid))
    else:
        update({kind.key: value})


if __name__ == "__main__":
    main()
