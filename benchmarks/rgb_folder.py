"""An RGB ImageFolder against the grayscale default public pool: coloured
MNIST digits (scripts/make_coloured_digits.py: 400 per class from MNIST
train, 100 per class of test images from MNIST test, 32x32 RGB, random
contrasting stroke and background colours) through the pipeline at the
defaults, with

  data.sensitive: folder:<dir>/train    data.sensitive_test: folder:<dir>/test
  data.channels: 3                      data.image_size: 32
  evaluation.fid: false   (15 minutes of Inception on 2 CPU cores; FID is not
                           part of the target, and nothing else changes)

Writes a result block to benchmarks/results/rgb-folder-<date>.txt and, unless
--variant, the summary.json keys

  rgb_folder_relative_accuracy   CNN accuracy on the test folder over the same
                                 report's train-on-real CNN ceiling
  rgb_folder_significant_classes classes whose DP selection is significant

Target: at least 8 of 10 classes significant at epsilon 10 and a relative
accuracy of at least 0.8. The accuracies are non-private evaluation (they
read the real data); nothing is selected on them.

  python benchmarks/rgb_folder.py [--digits DIR] [--set key=value ...] [--note TEXT]
  python benchmarks/rgb_folder.py --summary runs/<run>/summary.json   # an earlier run
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import run_summary
from machine import git_commit
from summary_json import update

ROOT = Path(__file__).resolve().parents[1]
TARGET_SIGNIFICANT, TARGET_RELATIVE = 8, 0.8
FAILED_RELEASE_EXIT = 4  # services/cli.py: the run's status is "failed"


def run_pipeline(digits: Path, output_dir: Path, extra: list[str]) -> tuple[Path, float]:
    """`privimage run` on the folders (this checkout's code); its
    summary.json and the wall time of the command."""
    if not (digits / "train").is_dir():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_coloured_digits.py"),
                        str(digits)], check=True)
    sets = [f"data.sensitive=folder:{digits / 'train'}",
            f"data.sensitive_test=folder:{digits / 'test'}", "data.channels=3",
            "data.image_size=32", "evaluation.fid=false", "run.name=rgb-folder",
            f"run.output_dir={output_dir}", *extra]
    cmd = [sys.executable, "-m", "services.cli", "run"] + [a for s in sets for a in ("--set", s)]
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    wall = time.time() - t0
    # 4: the run finished but its release failed (downstream accuracy at
    # chance): a result to record, not a crash of the benchmark.
    if rc not in (0, FAILED_RELEASE_EXIT):
        raise SystemExit(f"privimage run exited with status {rc}; see its output above")
    newest = max(output_dir.glob("rgb-folder-*/summary.json"), key=lambda p: p.stat().st_mtime)
    return newest, wall


def significance(summary: dict) -> dict | None:
    """The run's significance verdict (pipeline_state.json: DP output), or
    None for a method without a semantic query."""
    state = json.loads((Path(summary["run_dir"]) / "pipeline_state.json").read_text())
    return next((st["significance"] for st in state["stages"].values()
                 if isinstance(st, dict) and "significance" in st), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", type=Path, default=Path("/tmp/privimage-coloured-digits"),
                    help="the folders' directory; written by the generator when missing")
    ap.add_argument("--output-dir", type=Path, default=ROOT / "runs")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="a further config override (key=value), e.g. for a variant")
    ap.add_argument("--summary", type=Path, help="read this run instead of running one")
    ap.add_argument("--note", default="", help="conditions of the run (load, what changed)")
    ap.add_argument("--variant", action="store_true",
                    help="write the block only, leave summary.json's keys alone")
    a = ap.parse_args()
    wall = None
    path = a.summary or None
    if path is None:
        path, wall = run_pipeline(a.digits.resolve(), a.output_dir.resolve(), a.sets)
    s = json.loads(path.read_text())
    e = s["evaluation"]
    sig = significance(s)
    relative = round(e["accuracy_cnn"] / e["ceiling_accuracy_cnn"], 4)
    n_sig = None if sig is None else int(sig["num_significant"])
    lines = run_summary.header("rgb-folder run", s, a.note)
    lines.insert(2, f"# commit {git_commit()}; method {s['method']}; overrides: "
                    f"{', '.join(a.sets) or 'none'} (beside the folders, 3 channels, 32 px, FID off)")
    lines.append("significant classes: " + ("no semantic query" if sig is None else
                 f"{n_sig}/{len(sig['significant'])} (threshold {sig['threshold']:.1f}); "
                 f"pre-training fallback: {s.get('pretrain_data_fallback')}"))
    lines.append(f"run status: {s.get('status', 'finished')}")
    lines.append("CNN / MLP / LR (%): " + " / ".join(f"{100 * e[f'accuracy_{c}']:.1f}"
                                                 for c in ("cnn", "mlp", "lr")))
    lines.append("train-on-real ceiling CNN / MLP / LR (%): " + " / ".join(
        f"{100 * e[f'ceiling_accuracy_{c}']:.1f}" for c in ("cnn", "mlp", "lr")))
    lines.append(f"epsilon {s['epsilon']:.4f} delta {s['delta']:.1e}; driver "
                 f"{s['total_seconds']:.0f} s" + (f"; command wall {wall:.0f} s" if wall else ""))
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}"
                                               for k, v in s.get("stage_seconds", {}).items()))
    met = n_sig is not None and n_sig >= TARGET_SIGNIFICANT and relative >= TARGET_RELATIVE
    lines.append(f"rgb_folder_relative_accuracy = {relative}; rgb_folder_significant_classes = "
                 f"{n_sig}; target (>= {TARGET_SIGNIFICANT} classes, >= {TARGET_RELATIVE}): "
                 f"{'met' if met else 'missed'}" + (" (variant, not the headline keys)"
                                                     if a.variant else ""))
    run_summary.append("rgb-folder", lines)
    if not a.variant:
        update({"rgb_folder_relative_accuracy": relative, "rgb_folder_significant_classes": n_sig})


if __name__ == "__main__":
    main()
