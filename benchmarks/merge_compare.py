"""Merge the trials of several `privimage compare` output directories (e.g.
one sweep per seed) into one Markdown table: per method, mean +- std of CNN
accuracy over the runs, each run's value, epsilon, the canary verdict and the
memorisation verdicts, and wall time. Reads each trial's summary.json only.

    .venv/bin/python benchmarks/merge_compare.py OUT_DIR [OUT_DIR ...]
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ORDER = ("privimage", "pdp_diffusion", "dpdm", "privimage_g", "dpgan", "dp_ldm")
VERDICT = {1.0: "memorisation", 0.0: "no evidence", -1.0: "inconclusive"}


def trials(dirs: list[str]) -> list[dict]:
    out = []
    for d in dirs:
        for f in sorted(Path(d).glob("*/summary.json")):
            s = json.loads(f.read_text())
            ev = s.get("evaluation", {})
            out.append({"method": s["method"], "accuracy": s.get("accuracy"),
                        "epsilon": s["epsilon"], "seconds": s["total_seconds"],
                        "canary_lb": ev.get("canary_eps_lb"), "canary_max": ev.get("canary_eps_max"),
                        "dcr": VERDICT.get(ev.get("memorisation_dcr_pixel_verdict"), "-"),
                        "recon": VERDICT.get(ev.get("memorisation_recon_verdict"), "n/a"),
                        "fallback": s.get("pretrain_data_fallback"), "run": f.parent.name})
    return out


def _canary(t: dict) -> str:
    return f"{t['canary_lb']:.2f} ({t['canary_max']:.2f})" if t["canary_lb"] is not None else "-"


def main(dirs: list[str]) -> None:
    ts = trials(dirs)
    print("| method | CNN accuracy (%) | runs | epsilon | canary bound (max showable) | "
          "DCR / reconstruction | wall s per run |")
    print("|---|---|---|---|---|---|---|")
    for m in ORDER:
        g = [t for t in ts if t["method"] == m and t["accuracy"] is not None]
        if not g:
            continue
        acc = [100 * t["accuracy"] for t in g]
        cell = f"{acc[0]:.1f}" if len(acc) == 1 else \
            f"{statistics.mean(acc):.1f} ± {statistics.stdev(acc):.1f}"
        print(f"| {m} | {cell} | {', '.join(f'{a:.1f}' for a in acc)} | "
              f"{max(t['epsilon'] for t in g):.3f} | "
              f"{', '.join(_canary(t) for t in g)} | "
              f"{', '.join(sorted({t['dcr'] + ' / ' + t['recon'] for t in g}))} | "
              f"{statistics.mean(t['seconds'] for t in g):.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
