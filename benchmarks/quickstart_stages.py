"""Wall time per stage of the quickstart, from a finished run's summary.json.

    bash scripts/quickstart.sh            # writes runs/<run>/summary.json
    .venv/bin/python benchmarks/quickstart_stages.py runs/<run>/summary.json
Writes benchmarks/results/quickstart-<date>.txt.
"""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_dp_step import cpu_name  # noqa: E402


def main() -> None:
    s = json.loads(Path(sys.argv[1]).read_text())
    date = datetime.date.today().isoformat()
    lines = [f"# quickstart wall time per stage, {date}",
             f"# machine: {cpu_name()}; run {s['run_dir']}",
             "stage            seconds"]
    for k, v in s["stage_seconds"].items():
        lines.append(f"{k:<16} {v:>7.1f}")
    lines.append(f"{'total (driver)':<16} {s['total_seconds']:>7.1f}")
    lines.append(f"# epsilon {s['epsilon']:.4f} delta {s['delta']:.1e} "
                 f"FID {s['fid']:.2f} accuracy {s['accuracy']:.4f}")
    text = "\n".join(lines) + "\n"
    print(text)
    (Path(__file__).parent / "results" / f"quickstart-{date}.txt").write_text(text)


if __name__ == "__main__":
    main()
