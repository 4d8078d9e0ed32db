"""Ray Tune sweep over generator size and selection ratio.

Each trial runs the whole pipeline as a nested MLflow run under one sweep run,
so the MLflow UI compares trials side by side.

Privacy note: every trial reads the same sensitive data. The sweep's total
cost is the composition of all trials' ledgers, which we compute with the same
Opacus accountant and log as ``sweep_epsilon_composed``; picking the best
trial by a metric on the real test split is non-private model selection and is
labelled as such.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from privimage_core.config import Config
from privimage_core.privacy_ledger import compose_ledgers


def _trial(config: dict) -> None:
    from ray import tune

    from privimage_core.config import from_dict
    from services.pipeline import run_pipeline

    base = from_dict(config["base"])
    overrides = {k: v for k, v in config.items() if k not in ("base", "parent_run_id")}
    cfg = base.with_overrides({**overrides, "run.name": base.run.name + "-" + "-".join(
        f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items()))})
    s = run_pipeline(cfg, parent_run_id=config["parent_run_id"])
    tune.report({"accuracy": s.get("accuracy") or 0.0, "fid": s.get("fid") or float("nan"),
                 "epsilon": s["epsilon"], "ledger": s["ledger"], "run_dir": s["run_dir"]})


def sweep_ledgers(output_dir: str, sweep_run_id: str) -> dict[str, dict | None]:
    """run_dir -> upper bound on the budget (``spent_upper_bound``; None if it
    never touched the sensitive data) of every trial of this sweep whose run
    directory this machine can see, finished or failed."""
    from services.run_store import STATE_FILE, spent_upper_bound

    out = {}
    for state_file in sorted(Path(output_dir).glob(f"*/{STATE_FILE}")):
        try:
            parent = json.loads(state_file.read_text()).get("parent_run_id")
        except ValueError:
            continue
        if parent == sweep_run_id:
            out[str(state_file.parent.resolve())] = spent_upper_bound(state_file.parent)
    return out


def compose_sweep(results, output_dir: str, sweep_run_id: str) -> tuple[list[dict], bool]:
    """The ledgers to compose for a sweep and whether the result is complete.

    Run directories (which also hold failed trials' plans) come first; a
    finished trial whose directory this machine cannot see (no shared
    ``run.output_dir`` on a multi-node cluster) is charged the ledger it
    reported. A failed trial whose directory is not visible cannot be
    charged: the composition is then only a lower bound, and says so."""
    ledgers = sweep_ledgers(output_dir, sweep_run_id)
    results = list(results)
    for r in results:
        if r.metrics and "ledger" in r.metrics:
            ledgers.setdefault(str(Path(r.metrics["run_dir"]).resolve()), r.metrics["ledger"])
    complete = len(ledgers) >= len(results)  # every trial's spend is known
    return [v for v in ledgers.values() if v is not None], complete


def run_sweep(cfg: Config) -> dict:
    import mlflow
    from ray import tune

    from services import ray_runtime
    from services.tracking import Tracker

    # Absolute paths: trials run in other working directories.
    cfg = cfg.with_overrides({"run.output_dir": os.path.abspath(cfg.run.output_dir)})
    ray_runtime.ensure_ray(cfg.ray)
    tracker = Tracker(cfg)
    cfg = cfg.with_overrides({"tracking.mlflow_uri": tracker.uri})
    t = cfg.tune
    with tracker.pipeline_run(f"{cfg.run.name}-sweep", tags={"kind": "tune-sweep"}) as run:
        tracker.params(cfg.flat())
        space = {"base": cfg.to_dict(), "parent_run_id": run.info.run_id,
                 "generator.preset": tune.grid_search(t.presets),
                 "selection.selection_ratio": tune.grid_search(t.selection_ratios)}
        tuner = tune.Tuner(
            tune.with_resources(_trial, {"cpu": t.cpus_per_trial}),
            param_space=space,
            tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.num_samples,
                                        max_concurrent_trials=t.max_concurrent_trials),
            run_config=tune.RunConfig(name=f"{cfg.run.name}-sweep",
                                      storage_path=os.path.join(cfg.run.output_dir, "ray_tune")))
        results = tuner.fit()
        rows = []
        for r in results:
            if r.error or not r.metrics:
                rows.append({"config": {k: v for k, v in r.config.items() if k != "base"},
                             "error": str(r.error)})
                continue
            rows.append({"preset": r.config["generator.preset"],
                         "selection_ratio": r.config["selection.selection_ratio"],
                         "accuracy": r.metrics["accuracy"], "fid": r.metrics["fid"],
                         "epsilon": r.metrics["epsilon"], "run_dir": r.metrics["run_dir"]})
        out = {"trials": rows}
        # Every trial that read the sensitive data counts, failed ones included
        # (their run directories carry their ledgers and fine-tuning plans).
        ledgers, complete = compose_sweep(results, cfg.run.output_dir, run.info.run_id)
        if ledgers:
            delta = ledgers[0]["target_delta"]
            out["sweep_epsilon_composed"] = compose_ledgers(ledgers, delta, cfg.privacy.accountant)
            out["delta"] = delta
            out["trials_charged"] = len(ledgers)
            out["sweep_epsilon_complete"] = complete
            mlflow.log_metric("sweep_epsilon_composed", out["sweep_epsilon_composed"])
            mlflow.set_tag("sweep_epsilon", "complete" if complete else
                           "LOWER BOUND: some trials' run directories are not visible here; "
                           "put run.output_dir on shared storage")
        done = [r for r in rows if t.metric in r and r[t.metric] == r[t.metric]]  # not NaN
        if done:
            pick = max if t.mode == "max" else min
            out["best"] = pick(done, key=lambda r: r[t.metric])
            mlflow.set_tag("model_selection", "non-private: best trial chosen on the real test split")
        tracker.json_artifact(out, "sweep_results.json")
        return out
