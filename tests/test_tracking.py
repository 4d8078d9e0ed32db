"""MLflow's set_tracking_uri writes MLFLOW_TRACKING_URI into the environment;
a second run in the same process (a sweep, a test session, a notebook) must
still log to its own store, and a user's exported URI must still win."""
from __future__ import annotations

import os

from privimage_core.config import from_dict
from services.tracking import Tracker, tracking_uri


def test_a_second_run_in_the_same_process_gets_its_own_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a = Tracker(from_dict({"run": {"output_dir": str(tmp_path / "a")}}))
    b = Tracker(from_dict({"run": {"output_dir": str(tmp_path / "b")}}))
    assert a.uri.endswith("a/mlflow.db") and b.uri.endswith("b/mlflow.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_an_exported_uri_wins_and_stays(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'cluster.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = from_dict({"run": {"output_dir": str(tmp_path / "x")}})
    Tracker(from_dict({"run": {"output_dir": str(tmp_path / "y")},
                       "tracking": {"mlflow_uri": f"sqlite:///{tmp_path / 'own.db'}"}}))
    assert os.environ["MLFLOW_TRACKING_URI"] == uri
    assert tracking_uri(cfg) == uri


def test_local_artifacts_live_beside_the_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    t = Tracker(from_dict({"run": {"output_dir": str(tmp_path / "out")}}))
    with t.pipeline_run("r"):
        t.json_artifact({"a": 1}, "x.json")
    assert list((tmp_path / "out" / "mlartifacts").rglob("x.json"))
    assert not (tmp_path / "mlruns").exists()
