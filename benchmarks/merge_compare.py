"""Merge the trials of several `privimage compare` output directories (e.g.
one sweep per seed) into one Markdown table: per method and target epsilon,
mean +- std of CNN accuracy over the runs with each run's value (a run whose
release is at chance level, status "failed", counts and is marked), KID (and the
FID of the same features, at the size the trials used), the spent epsilon,
the canary and memorisation verdicts, and wall time; then the ordering by
accuracy at each budget. Reads each trial's summary.json and its saved
config (pipeline_state.json) only.

    .venv/bin/python benchmarks/merge_compare.py OUT_DIR [OUT_DIR ...]
    .venv/bin/python benchmarks/merge_compare.py OUT_DIR ... --write compare-<date>.md

--write puts the table (with the date, machine and commit) in
benchmarks/results/<name> and that path in summary.json's compare_table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

from machine import cpu_name, git_commit
from summary_json import update

ORDER = ("privimage", "pdp_diffusion", "dpdm", "dp_ldm", "privimage_g", "dpgan")
VERDICT = {1.0: "memorisation", 0.0: "no evidence", -1.0: "inconclusive"}


def trials(dirs: list[str]) -> list[dict]:
    out = []
    for d in dirs:
        for f in sorted(Path(d).glob("*/summary.json")):
            s = json.loads(f.read_text())
            # "failed" with an accuracy: the release was scored and is at chance
            # level, a result to count (leaving it out would flatter the method)
            if s.get("status") not in ("finished", "failed") or s.get("accuracy") is None:
                continue
            cfg = json.loads((f.parent / "pipeline_state.json").read_text())["config"]
            ev = s.get("evaluation", {})
            out.append({"method": s["method"], "target": cfg["privacy"]["target_epsilon"],
                        "seed": cfg["run"]["seed"], "accuracy": s.get("accuracy"),
                        "kid": ev.get("kid"), "fid": s.get("fid"),
                        "fid_images": cfg["evaluation"]["fid_images"],
                        "epsilon": s["epsilon"], "seconds": s["total_seconds"],
                        "canary_lb": ev.get("canary_eps_lb"), "canary_max": ev.get("canary_eps_max"),
                        "dcr": VERDICT.get(ev.get("memorisation_dcr_pixel_verdict"), "-"),
                        "recon": VERDICT.get(ev.get("memorisation_recon_verdict"), "n/a"),
                        "at_chance": s["status"] == "failed", "run": f.parent.name})
    return out


def _mean_sd(vals: list[float], fmt: str) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(statistics.mean(vals), fmt)} ± {format(statistics.stdev(vals), fmt)}"


def _canary(t: dict) -> str:
    return f"{t['canary_lb']:.2f} ({t['canary_max']:.2f})" if t["canary_lb"] is not None else "-"


def table(ts: list[dict]) -> list[str]:
    sizes = sorted({t["fid_images"] for t in ts})
    lines = ["| method | target epsilon | CNN accuracy (%) | runs (seed: %) | KID x1e3 | "
             f"FID ({'/'.join(map(str, sizes))} per side) | epsilon spent | "
             "canary bound (max showable) | DCR / reconstruction | wall s per run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for target in sorted({t["target"] for t in ts}):
        for m in ORDER:
            g = sorted((t for t in ts if t["method"] == m and t["target"] == target),
                       key=lambda t: t["seed"])
            if not g:
                continue
            lines.append(
                f"| {m} | {target:g} | {_mean_sd([100 * t['accuracy'] for t in g], '.1f')} | "
                + ", ".join(f"{t['seed']}: {100 * t['accuracy']:.1f}"
                            + (" (at chance: failed)" if t["at_chance"] else "") for t in g) + " | "
                f"{_mean_sd([None if t['kid'] is None else 1e3 * t['kid'] for t in g], '.1f')} | "
                f"{_mean_sd([t['fid'] for t in g], '.1f')} | "
                f"{max(t['epsilon'] for t in g):.3f} | "
                f"{', '.join(_canary(t) for t in g)} | "
                f"{', '.join(sorted({t['dcr'] + ' / ' + t['recon'] for t in g}))} | "
                f"{statistics.mean(t['seconds'] for t in g):.0f} |")
    return lines


def ordering(ts: list[dict]) -> list[str]:
    out = []
    for target in sorted({t["target"] for t in ts}):
        means = {m: statistics.mean(100 * t["accuracy"] for t in ts
                                    if t["method"] == m and t["target"] == target)
                 for m in ORDER if any(t["method"] == m and t["target"] == target for t in ts)}
        ranked = sorted(means, key=means.get, reverse=True)
        out.append(f"epsilon {target:g}: " + " > ".join(f"{m} {means[m]:.1f}" for m in ranked))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="privimage compare output directories")
    ap.add_argument("--write", metavar="NAME", help="benchmarks/results/NAME (Markdown)")
    ap.add_argument("--code-commit", default=None,
                    help="the commit the trials ran (default: this checkout's)")
    a = ap.parse_args()
    ts = trials(a.dirs)
    text = "\n".join([*table(ts), "", "Ordering by mean CNN accuracy (%):",
                      *(f"- {line}" for line in ordering(ts))])
    print(text)
    if a.write:
        out = Path(__file__).parent / "results" / a.write
        out.write_text(f"# Methods x budgets x seeds at equal compute, "
                       f"{datetime.date.today().isoformat()}\n\nMerged by "
                       f"`benchmarks/merge_compare.py` from {len(ts)} scored trials; machine "
                       f"{cpu_name()}, trials run on commit {a.code_commit or git_commit()}.\n\n{text}\n")
        update({"compare_table": str(out.relative_to(out.parents[2]))})


if __name__ == "__main__":
    main()
