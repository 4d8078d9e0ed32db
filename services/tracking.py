"""MLflow tracking: one parent run per pipeline, a nested run per stage.

Only DP outputs and public quantities are logged: the resolved config,
privacy parameters and epsilon, public-data metrics, the noisy histogram, the
selected public labels, synthetic samples, evaluation metrics (real test data
is marked non-private). Never sensitive images, labels or raw counts.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time as _t
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from privimage_core.config import Config


# MLflow 3 opens an experiment without a kind in its GenAI view (traces,
# assistant); these tags say it is model training and what its runs are.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": "PrivImage runs: each parent run is one pipeline (its name: method, "
                           "dataset, epsilon; its metrics: epsilon, accuracy, FID), with one "
                           "child run per stage. Evaluation on real data is non-private.",
}


# A saved view of the runs table (MLflow's "Views" list; an experiment tag
# `mlflow.sharedViewState.<id>` holding {name, createdAt, updatedAt, state}):
# MLflow's own default columns are Source, Models and Dataset, no metric, so
# without it a user adds columns by hand to compare runs.
RUNS_VIEW_ID = "privimage-compare"
RUNS_VIEW_NAME = "PrivImage: method, data, epsilon, accuracy, FID"
RUNS_VIEW_COLUMNS = ("params.`method`", "params.`data.sensitive`",
                     "params.`privacy.target_epsilon`", "metrics.`epsilon`",
                     "metrics.`accuracy`", "metrics.`fid`", "tags.`result`")


def runs_view_state() -> str:
    return json.dumps({"selectedColumns": list(RUNS_VIEW_COLUMNS),
                       "columnOrder": list(RUNS_VIEW_COLUMNS)})


def runs_view_url(base: str, experiment_id: str) -> str:
    """The MLflow UI address that opens an experiment's runs in that view."""
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW_ID}"


def _set_runs_view(client: MlflowClient, exp) -> None:
    key = f"mlflow.sharedViewState.{RUNS_VIEW_ID}"
    try:
        if json.loads(exp.tags.get(key, "{}")).get("state") == runs_view_state():
            return
    except ValueError:
        pass  # not ours or damaged: written again
    now = int(_t.time() * 1000)
    client.set_experiment_tag(exp.experiment_id, key, json.dumps({
        "name": RUNS_VIEW_NAME, "createdAt": now, "updatedAt": now,
        "state": runs_view_state()}))


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    # Clusters export MLFLOW_TRACKING_URI to drivers and workers (ray_cluster.yaml, deploy/).
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    # An absolute sqlite path: Tune trials change directory.
    out = Path(cfg.run.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}"


def _set_tracking_uri(uri: str) -> None:
    """mlflow.set_tracking_uri also writes os.environ["MLFLOW_TRACKING_URI"]
    (MLflow 3); left there, that value would look like the user's and send the
    next run of the same process (a test session, a notebook) to this run's
    store. MLflow reads its own setting first, so the environment is put back."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


class Tracker:
    """Thin wrapper so stages and remote workers log to the right run."""

    def __init__(self, cfg: Config, parent_run_id: str | None = None):
        # a new SQLite store's table creation is not news to the user of a run
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        _set_tracking_uri(self.uri)
        self.experiment_id = self._experiment(cfg.tracking.experiment)
        self.client = MlflowClient(self.uri)
        self.parent_run_id = parent_run_id
        self.run_id: str | None = None

    def _experiment(self, name: str) -> str:
        """With a local SQLite store the artifacts live beside it
        (<output_dir>/mlartifacts), not in ./mlruns of whatever directory the
        program was started from; a server or cluster store keeps its own."""
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            loc = None
            if self.uri.startswith("sqlite:///"):
                loc = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            try:
                mlflow.create_experiment(name, artifact_location=loc)
            except mlflow.exceptions.MlflowException:
                pass  # created meanwhile by a concurrent trial
            exp = mlflow.get_experiment_by_name(name)
        client = MlflowClient(self.uri)
        for key, value in EXPERIMENT_TAGS.items():  # opens in MLflow's model-training view
            if exp.tags.get(key) is None:
                client.set_experiment_tag(exp.experiment_id, key, value)
        _set_runs_view(client, exp)
        mlflow.set_experiment(experiment_id=exp.experiment_id)
        return exp.experiment_id

    @contextmanager
    def pipeline_run(self, run_name: str, tags: dict | None = None):
        tags = dict(tags or {})
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        with mlflow.start_run(run_name=run_name, experiment_id=self.experiment_id, tags=tags,
                              nested=bool(self.parent_run_id)) as run:
            self.run_id = run.info.run_id
            yield run

    @contextmanager
    def stage(self, name: str):
        """A nested run for one pipeline stage."""
        with mlflow.start_run(run_name=name, nested=True, experiment_id=self.experiment_id,
                              tags={"mlflow.parentRunId": self.run_id, "stage": name}) as run:
            yield run

    # plain helpers working on the active run
    @staticmethod
    def params(d: dict[str, Any]) -> None:
        items = list(d.items())
        for i in range(0, len(items), 90):
            mlflow.log_params({k: ("null" if v is None else v) for k, v in items[i:i + 90]})

    @staticmethod
    def metrics(d: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in d.items() if v is not None}, step=step)

    @staticmethod
    def json_artifact(obj: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(json.dumps(obj, indent=2, default=str))
            mlflow.log_artifact(str(p))

    @staticmethod
    def file_artifact(path: str | os.PathLike, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_curve(uri: str, run_id: str, key: str, points: list[tuple[int, float]]) -> None:
    """Log ``points`` (step, value) of one metric to a run, all stamped with
    the same time: a curve whose per-point timestamps would time the steps
    (a DP stage's step time follows its realised Poisson batch size)."""
    ts = int(_t.time() * 1000)
    MlflowClient(uri).log_batch(run_id, metrics=[Metric(key, float(v), ts, int(s))
                                                 for s, v in points])


def log_remote_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """From a Ray worker: log a batch of metrics to an existing run."""
    ts = int(_t.time() * 1000)
    MlflowClient(uri).log_batch(run_id, metrics=[Metric(k, float(v), ts, step)
                                                 for k, v in metrics.items()])
