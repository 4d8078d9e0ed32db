"""Ray Tune sweeps over any set of config keys (``tune.search_space``), and
``privimage compare`` on top of them (services/compare.py).

Each trial runs the whole pipeline as a nested MLflow run under one sweep
run, so the MLflow UI compares trials side by side. The grid is expanded
here, and trials whose resolved configs are identical run once.

Privacy note: every trial reads the same sensitive data. The sweep's total
cost is the composition of all trials' ledgers (failed ones charged their
plan), computed with the same Opacus accountant and logged as
``sweep_epsilon_composed``. With ``tune.sweep_epsilon`` set, each trial's
target is split from it so that the composition provably fits. Picking the
best trial by a metric on the real test split is non-private model
selection and is labelled as such. An interrupted sweep restores from its
Tune experiment directory (``Tuner.restore``) and keeps its MLflow run.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import mlflow
from ray import tune

from privimage_core.config import Config, from_dict, resolve_defaults
from privimage_core.privacy.ledger import compose_ledgers
from services import ray_runtime
from services.pipeline import run_pipeline
from services.run_store import STATE_FILE, spent_upper_bound
from services.tracking import Tracker

REPORTED = ("accuracy", "fid", "kid", "epsilon", "total_seconds")


def trial_run_dir(output_dir: str, sweep_run_id: str, trial_id: str) -> Path:
    """The run directory of one Tune trial: fixed by the trial, so a trial
    Tune retries or a restored sweep restarts resumes its own run (its
    ledger continues) instead of reading the data again under a new one."""
    return Path(output_dir) / f"sweep-{sweep_run_id[:12]}" / trial_id


def _trial(config: dict) -> None:
    cfg = from_dict(config["trial"]["config"])
    d = trial_run_dir(cfg.run.output_dir, config["parent_run_id"], tune.get_context().get_trial_id())
    if (d / STATE_FILE).is_file():
        s = run_pipeline(None, resume_dir=str(d), parent_run_id=config["parent_run_id"])
    else:
        s = run_pipeline(cfg, parent_run_id=config["parent_run_id"], run_dir=str(d))
    ev = s.get("evaluation") or {}
    tune.report({"accuracy": s.get("accuracy") or 0.0, "fid": _num(s.get("fid")),
                 "kid": _num(ev.get("kid")), "epsilon": s["epsilon"],
                 "total_seconds": s["total_seconds"], "ledger": s["ledger"],
                 "run_dir": s["run_dir"]})


def trial_rows(results) -> list[dict]:
    """One row per trial of a ResultGrid: its overrides and what it reported,
    or why it has nothing to report (its error, or "unfinished")."""
    rows = []
    for r in results:
        ov = (r.config or {}).get("trial", {}).get("overrides", {})
        # a trial stopped mid-way has Tune's own metrics but never reported ours
        if r.error or not r.metrics or "run_dir" not in r.metrics:
            rows.append({"overrides": ov, "error": str(r.error) if r.error else "unfinished"})
            continue
        rows.append({"overrides": ov, **{k: r.metrics.get(k) for k in REPORTED},
                     "run_dir": r.metrics["run_dir"]})
    return rows


def unfinished_trials(results) -> int:
    """Trials of a ResultGrid that neither finished nor failed: the sweep
    was stopped before them (or during them)."""
    return len(results) - results.num_terminated - results.num_errors


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def expand_grid(cfg: Config) -> list[dict]:
    """[{"overrides": {...}, "config": resolved dict}] for every distinct trial.

    Trials are distinct by their resolved config (the run name aside), so two
    values that resolve to the same settings run once. With
    ``tune.sweep_epsilon`` each trial's target is (sweep_epsilon / T,
    delta / T) over the T runs Tune makes: the distinct trials times
    ``tune.num_samples`` (basic composition)."""
    space = cfg.tune.search_space
    base = cfg
    trials, seen = [], set()
    for values in itertools.product(*space.values()):
        ov = dict(zip(space.keys(), values))
        resolved = base.with_overrides(ov)
        # told apart by the numbers they would run with (a null default and
        # the value it resolves to are one trial)
        numbers = resolve_defaults(resolved).to_dict()
        key = json.dumps({**numbers, "run": {**numbers["run"], "name": ""}},
                         sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        name = base.run.name + "-" + "-".join(f"{k.split('.')[-1]}={v}" for k, v in ov.items())
        trials.append({"overrides": ov, "config": resolved.with_overrides({"run.name": name})})
    if cfg.tune.sweep_epsilon is not None:
        t = len(trials) * cfg.tune.num_samples
        for tr in trials:
            c = tr["config"]
            delta = c.privacy.target_delta or 1e-5
            tr["config"] = c.with_overrides({"privacy.target_epsilon": cfg.tune.sweep_epsilon / t,
                                             "privacy.target_delta": delta / t})
    for tr in trials:
        tr["config"] = tr["config"].to_dict()
    return trials


def sweep_ledgers(output_dir: str, sweep_run_id: str) -> dict[str, dict | None]:
    """run_dir -> upper bound on the budget (``spent_upper_bound``; None if it
    never touched the sensitive data) of every trial of this sweep whose run
    directory this machine can see, finished or failed."""
    out = {}
    files = [*Path(output_dir).glob(f"*/{STATE_FILE}"),
             *Path(output_dir).glob(f"sweep-{sweep_run_id[:12]}/*/{STATE_FILE}")]
    for state_file in sorted(files):
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


def _sweep_run_id(tracker, exp_dir: Path, name: str) -> tuple[str, bool]:
    """The sweep's MLflow run id: the one an interrupted sweep started, so a
    restored sweep composes every trial that ever touched the data."""
    marker = exp_dir / "mlflow_sweep_run_id"
    if marker.is_file():
        return marker.read_text().strip(), True
    run = tracker.client.create_run(tracker.experiment_id, run_name=name,
                                    tags={"kind": "tune-sweep", "mlflow.runName": name})
    exp_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(run.info.run_id)
    return run.info.run_id, False


def run_sweep(cfg: Config, log=print) -> dict:
    # Absolute paths: trials run in other working directories.
    cfg = cfg.with_overrides({"run.output_dir": os.path.abspath(cfg.run.output_dir)})
    # A local Ray gets the trial drivers' fractional CPUs on top of the
    # machine's: a trial only drives (its actors and Ray Train workers ask for
    # their own CPUs), and without this a 2-core box cannot start a trial's
    # 2-CPU training worker beside the trial's own 0.1 CPU (Ray CPUs are
    # logical; the drivers sleep while training runs).
    extra = math.ceil(cfg.tune.cpus_per_trial * cfg.tune.max_concurrent_trials)
    ray_runtime.ensure_ray(cfg.ray, num_cpus=(os.cpu_count() or 1) + extra)
    tracker = Tracker(cfg)
    cfg = cfg.with_overrides({"tracking.mlflow_uri": tracker.uri})
    t = cfg.tune
    trials = expand_grid(cfg)
    name = f"{cfg.run.name}-sweep"
    storage = os.path.join(cfg.run.output_dir, "ray_tune")
    exp_dir = Path(storage) / name
    run_id, restored = _sweep_run_id(tracker, exp_dir, name)
    log(f"[privimage] sweep {name}: {len(trials)} distinct trials"
        + (" (restored)" if restored else ""))
    with mlflow.start_run(run_id=run_id):
        if not restored:
            tracker.params(cfg.flat())
        space = {"parent_run_id": run_id, "trial": tune.grid_search(trials)}
        trainable = tune.with_resources(_trial, {"cpu": t.cpus_per_trial})
        if restored and tune.Tuner.can_restore(str(exp_dir)):
            tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_errored=False,
                                       restart_errored=True, param_space=space)
        else:
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode,
                                            num_samples=t.num_samples,
                                            max_concurrent_trials=t.max_concurrent_trials),
                run_config=tune.RunConfig(name=name, storage_path=storage))
        results = tuner.fit()  # a ResultGrid
        # Ctrl-C: Tune saves the experiment and returns with trials neither
        # finished nor failed; the same command restores the sweep (above).
        unfinished = unfinished_trials(results)
        if unfinished:
            mlflow.set_tag("sweep_status", f"stopped: {unfinished} of {len(results)} trials "
                                           "unfinished; run the same command to restore it")
        rows = trial_rows(results)
        out = {"trials": rows, "num_trials": len(trials), "unfinished_trials": unfinished,
               "trial_runs": len(results)}
        # Every trial that read the sensitive data counts, failed ones included
        # (their run directories carry their ledgers and DP plans).
        ledgers, complete = compose_sweep(results, cfg.run.output_dir, run_id)
        if ledgers:
            delta = sum(led["target_delta"] for led in ledgers) if t.sweep_epsilon else \
                ledgers[0]["target_delta"]
            out["sweep_epsilon_composed"] = compose_ledgers(ledgers, delta, cfg.privacy.accountant)
            out["delta"] = delta
            out["trials_charged"] = len(ledgers)
            out["sweep_epsilon_complete"] = complete
            if t.sweep_epsilon is not None:
                out["sweep_epsilon_target"] = t.sweep_epsilon
            mlflow.log_metric("sweep_epsilon_composed", out["sweep_epsilon_composed"])
            mlflow.set_tag("sweep_epsilon", "complete" if complete else
                           "LOWER BOUND: some trials' run directories are not visible here; "
                           "put run.output_dir on shared storage")
        done = [r for r in rows if r.get(t.metric) == r.get(t.metric) and t.metric in r]
        if done:
            pick = max if t.mode == "max" else min
            best = dict(pick(done, key=lambda r: r[t.metric]))
            # the selected model carries the sweep's composed epsilon, not its own
            best["epsilon_with_selection"] = out.get("sweep_epsilon_composed")
            out["best"] = best
            mlflow.set_tag("model_selection", "non-private: best trial chosen on the real test split")
        tracker.json_artifact(out, "sweep_results.json")
        out["mlflow_run_id"] = run_id
        return out
