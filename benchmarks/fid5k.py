"""FID(5k) of a finished run's release by the evaluation protocol, filed.

    .venv/bin/python benchmarks/fid5k.py runs/<run> --series quickstart --note "idle machine"
    .venv/bin/python benchmarks/fid5k.py --metrics <evaluation_metrics.json> --series quickstart

The first form runs `privimage evaluate --run <run> --config
configs/eval-fid5k.yaml` (5,000 synthetic against 5,000 real test images,
the size published FIDs use; the real side is cached after its first run);
the second files an evaluation already made (its metrics file, as the
command writes it). Either appends a block to
benchmarks/results/fid5k-<date>.txt and, with --series, files the FID into
summary.json:

  quickstart    quickstart_fid_5k, one entry per run of the quickstart's
                defaults at epsilon 10 (--new-series when the defaults changed)
  quality_cpu   quality_cpu_fid_5k, a run of configs/quality-cpu.yaml

An evaluation below the protocol's size is refused: its FID compares with
nothing. Which defaults the run used is the caller's statement, checked only
for the target epsilon (quickstart: 10).
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run_summary  # noqa: E402
from machine import cpu_name, git_commit  # noqa: E402
import summary_json  # noqa: E402

from privimage_core.evaluation.protocol import fidelity_line, meets_protocol  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL_CONFIG = ROOT / "configs" / "eval-fid5k.yaml"
SERIES_KEYS = {"quickstart": "quickstart_fid_5k", "quality_cpu": "quality_cpu_fid_5k"}


def evaluate(run_dir: Path) -> Path:
    """`privimage evaluate` on the run at the protocol's size; its metrics file."""
    cmd = [sys.executable, "-m", "services.cli", "evaluate", "--run", str(run_dir),
           "--config", str(PROTOCOL_CONFIG)]
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit("privimage evaluate failed; see its output above (nothing was filed)")
    return run_dir / "evaluation" / "evaluation_metrics.json"


def target_epsilon(metrics: dict) -> float | None:
    """The run's target epsilon from its pipeline_state.json, where the
    synthetic set's run directory is still there."""
    state = Path(metrics.get("synthetic", "")).parent / "pipeline_state.json"
    if not state.is_file():
        return None
    return json.loads(state.read_text())["config"]["privacy"]["target_epsilon"]


def refuse_below_protocol(metrics: dict, path: Path) -> None:
    if not meets_protocol(metrics):
        raise SystemExit(f"{path}: FID on {int(metrics.get('fid_images', 0)):,} images per side, "
                         "below the protocol's 5,000; evaluate with --config "
                         "configs/eval-fid5k.yaml (nothing was filed)")


def file_series(series: str, metrics: dict, new_series: bool) -> None:
    key = SERIES_KEYS[series]
    if series == "quickstart":
        eps = target_epsilon(metrics)
        if eps is not None and eps != 10.0:
            raise SystemExit(f"the run's target epsilon is {eps:g}; quickstart_fid_5k keeps the "
                             "quickstart at its default epsilon 10")
        cur = json.loads(summary_json.PATH.read_text()) if summary_json.PATH.is_file() else {}
        # An older summary held a single figure here: a list starts anew from it.
        fresh = new_series or not isinstance(cur.get(key), list)
        summary_json.update({key: round(metrics["fid"], 2)}, append=(key,), new_series=fresh)
    else:
        summary_json.update({key: round(metrics["fid"], 2)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("run", nargs="?", type=Path, help="runs/<run>: evaluate it now")
    src.add_argument("--metrics", type=Path, help="an evaluation_metrics.json already written")
    ap.add_argument("--series", choices=sorted(SERIES_KEYS),
                    help="file the FID into summary.json under this series (default: block only)")
    ap.add_argument("--new-series", action="store_true",
                    help="start quickstart_fid_5k anew (the defaults changed)")
    ap.add_argument("--note", default="", help="conditions (load, where the run came from)")
    a = ap.parse_args()
    path = a.metrics or evaluate(a.run.resolve())
    metrics = json.loads(path.read_text())
    refuse_below_protocol(metrics, path)
    lines = [f"# FID(5k) by the protocol, {datetime.date.today().isoformat()}",
             f"# machine: {cpu_name()}; commit {git_commit()}; metrics {path}",
             *([f"# note: {a.note}"] if a.note else []),
             f"# synthetic: {metrics.get('synthetic')} ({metrics.get('num_synthetic')} images), "
             f"epsilon {metrics.get('ledger_epsilon', metrics.get('epsilon', float('nan'))):.4f}",
             f"fidelity: {fidelity_line(metrics)}",
             *([f"utility: CNN {metrics['accuracy_cnn']:.4f} on the real test split "
                "(retrained here, its own seed)"] if "accuracy_cnn" in metrics else []),
             f"seconds: Inception {metrics.get('inception_features_seconds', 0):.0f}, "
             f"evaluation {metrics.get('evaluation_seconds', 0):.0f}"]
    run_summary.append("fid5k", lines)
    if a.series:
        file_series(a.series, metrics, a.new_series)


if __name__ == "__main__":
    main()
