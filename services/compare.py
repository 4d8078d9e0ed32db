"""``privimage compare``: a Tune grid over methods x budgets x seeds (any
search space, services/tune.py) and one comparison table, mean +- std over
the repetitions, as Markdown and HTML, written beside the runs and attached
to the sweep's MLflow run. The table states the sweep's composed epsilon:
every trial read the same sensitive data."""
from __future__ import annotations

import html
import math
import time
from pathlib import Path

import mlflow
import numpy as np

from privimage_core.config import Config
from services.tune import run_sweep

METRICS = (("accuracy", "accuracy (%)", 100.0), ("fid", "FID", 1.0), ("kid", "KID x1e3", 1e3),
           ("epsilon", "epsilon", 1.0), ("total_seconds", "wall s / trial", 1.0))


def _cell(vals: list[float], scale: float) -> str:
    v = np.array([x for x in vals if x is not None and not math.isnan(x)], float) * scale
    if len(v) == 0:
        return "—"
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def comparison_rows(trials: list[dict], by: list[str]) -> list[dict]:
    """One row per value of ``by`` (in first-seen order): mean ± std cells."""
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        groups.setdefault(tuple(t["overrides"].get(k) for k in by), []).append(t)
    rows = []
    for key, ts in groups.items():
        ok = [t for t in ts if "error" not in t]
        row = {k: v for k, v in zip(by, key)}
        row.update({label: _cell([t.get(m) for t in ok], s) for m, label, s in METRICS})
        row["runs"] = f"{len(ok)}/{len(ts)}"
        rows.append(row)
    return rows


def render(rows: list[dict], by: list[str], out: dict, title: str) -> tuple[str, str]:
    cols = list(by) + [label for _, label, _ in METRICS] + ["runs"]
    md = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    note = (f"Every trial read the same sensitive data: the sweep as a whole composes to "
            f"epsilon {out.get('sweep_epsilon_composed', float('nan')):.3f} at delta "
            f"{out.get('delta', float('nan')):.2g} ({out.get('trials_charged', 0)} trials "
            f"charged{'' if out.get('sweep_epsilon_complete', True) else ', LOWER BOUND'}). "
            "Accuracy and FID are non-private evaluation on the real test split; nothing "
            "was selected on it.")
    md += ["", note, ""]
    h = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"]
    h += ["<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols) + "</tr>"
          for r in rows]
    page = (f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h1>{html.escape(title)}</h1>{''.join(h)}</table><p>{html.escape(note)}</p>"
            "</body></html>")
    return "\n".join(md), page


def run_compare(cfg: Config, log=print) -> dict:
    by = cfg.tune.compare_by or [k for k in cfg.tune.search_space if k != "run.seed"]
    out = run_sweep(cfg, log=log)
    if out["unfinished_trials"]:  # no table of a partial grid: restoring finishes it
        return {**out, "table": None}
    rows = comparison_rows(out["trials"], by)
    title = f"{cfg.run.name}: comparison ({time.strftime('%Y-%m-%d')})"
    md, page = render(rows, by, out, title)
    d = Path(cfg.run.output_dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    md_path, html_path = d / f"{cfg.run.name}-comparison.md", d / f"{cfg.run.name}-comparison.html"
    md_path.write_text(md)
    html_path.write_text(page)
    with mlflow.start_run(run_id=out["mlflow_run_id"]):
        mlflow.log_artifact(str(md_path))
        mlflow.log_artifact(str(html_path))
    return {**out, "table": md, "table_path": str(md_path), "html_path": str(html_path)}
