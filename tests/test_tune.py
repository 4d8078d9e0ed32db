"""A real Ray Tune sweep (two tiny trials) with nested MLflow runs and the
sweep-level privacy composition. Opt-in: `bash scripts/test.sh -m slow`."""
import mlflow
import pytest

from privimage_core.config import from_dict
from tests.helpers import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]
# run_sweep starts the local Ray itself, with the trial drivers' CPUs on top
# of the machine's (part of what is tested): the ray_local fixture only stops it.
RAY_STARTED_BY_TEST = True


def test_sweep_runs_trials_as_nested_mlflow_runs(ray_local, tmp_path):
    from services.tune import run_sweep
    d = tiny_config(tmp_path)
    d["tune"] = {"search_space": {"generator.preset": ["tiny"],
                                  "selection.selection_ratio": [0.1, 0.2]},
                 "cpus_per_trial": 0.1}
    d["ray"]["cpus_per_worker"] = 1
    out = run_sweep(from_dict(d))
    assert len(out["trials"]) == 2 and all("accuracy" in t for t in out["trials"])
    eps = [t["epsilon"] for t in out["trials"]]
    # the sweep as a whole spends more than any single trial
    assert out["sweep_epsilon_composed"] > max(eps)
    # composed from the trials' run directories (services.tune.sweep_ledgers)
    assert out["trials_charged"] == 2 and out["sweep_epsilon_complete"] is True
    assert out["best"]["accuracy"] == max(t["accuracy"] for t in out["trials"])  # tune.mode max
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("privimage")
    runs = client.search_runs([exp.experiment_id])
    sweep = [r for r in runs if r.data.tags.get("kind") == "tune-sweep"]
    assert len(sweep) == 1
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep[0].info.run_id]
    assert len(trials) == 2
