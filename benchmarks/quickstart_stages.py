"""Wall time per stage of the quickstart, from a finished run's summary.json.

    bash scripts/quickstart.sh            # writes runs/<run>/summary.json
    .venv/bin/python benchmarks/quickstart_stages.py runs/<run>/summary.json --note "idle machine"
Appends one block per run to benchmarks/results/quickstart-<date>.txt (say in
--note what else the CPU was doing) and the run to summary.json's lists
(--new-series on the first run of new defaults); a run of the defaults at
--set privacy.target_epsilon=1 goes to eps1_cnn_accuracy instead.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run_summary  # noqa: E402

from privimage_core.evaluation.protocol import meets_protocol  # noqa: E402


def main() -> None:
    s, note = run_summary.load(__doc__.splitlines()[0])
    cfg = json.loads((Path(s["run_dir"]) / "pipeline_state.json").read_text())["config"]
    target = cfg["privacy"]["target_epsilon"]
    if target not in (1.0, 10.0):
        sys.exit(f"{s['run_dir']}: target epsilon {target:g}; summary.json keeps the quickstart at "
                 "epsilon 10 (its default) and 1 (--set privacy.target_epsilon=1) only")
    lines = run_summary.header(f"quickstart wall time per stage, target epsilon {target:g}", s, note)
    lines.append("stage            seconds")
    lines += [f"{k:<16} {v:>7.1f}" for k, v in s["stage_seconds"].items()]
    lines.append(f"{'total (driver)':<16} {s['total_seconds']:>7.1f}")
    ev = s.get("evaluation", {})
    fid = "FID not computed" if s.get("fid") is None else \
        f"FID {s['fid']:.2f} ({int(ev.get('fid_images', 0)):,} images per side)"
    lines.append(f"# epsilon {s['epsilon']:.4f} delta {s['delta']:.1e} "
                 f"{fid} accuracy {s['accuracy']:.4f}")
    extra = [f"{k} {ev[k]:.4f}" for k in ("kid", "kid_std", "accuracy_mlp", "accuracy_lr",
                                          "precision", "recall") if k in ev]
    if extra:
        lines.append("# " + ", ".join(extra))
    run_summary.append("quickstart", lines)
    from summary_json import update
    if target == 1.0:
        update({"eps1_cnn_accuracy": s["accuracy"]}, append=("eps1_cnn_accuracy",),
               new_series=s["new_series"])
        return
    fid5k = s["fid"] if meets_protocol(ev) else None  # FID at fewer images compares with nothing
    kid = {"quickstart_kid": [round(ev["kid"], 4), round(ev["kid_std"], 4)],
           "quickstart_kid_images": int(ev["fid_images"])} if "kid" in ev else {}
    update({"quickstart_driver_seconds": round(s["total_seconds"], 1),
            "quickstart_cnn_accuracy": s["accuracy"], **kid,
            **({"quickstart_fid_5k": fid5k} if fid5k is not None else {})},
           append=("quickstart_driver_seconds", "quickstart_cnn_accuracy"),
           new_series=s["new_series"])


if __name__ == "__main__":
    main()
