"""Live Prometheus metrics for the pipeline (trainer, selector, evaluator).

Privacy rule: only public or differentially private quantities leave the
process. Labels are run ids, stage names, worker ranks and metric names, never
class names or anything derived from sensitive records. In particular:

- ``n_samples`` / ``samples_per_second`` of the DP fine-tuning stage must be
  computed from the *expected* (logical) batch size, a public hyper-parameter.
  The realised length of a Poisson-sampled batch is a function of the
  sensitive data set and is not covered by the DP guarantee.
- The fine-tuning loss is computed on sensitive mini-batches without noise, so
  it is outside the DP guarantee too: it is dropped unless the caller opts in
  with ``PipelineMetrics(run_id, export_nonprivate_loss=True)`` (a debugging
  switch for operators, off by default). Pre-training runs on public data and
  its loss is always exported.
- epsilon, the number of selected public images (post-processing of the noisy
  histogram) and evaluation metrics (FID / accuracy of synthetic data against
  the held-out test split, which the project treats as public) are fine.

The metrics live in a module-private ``CollectorRegistry`` (not the global
default one) so that importing this module never collides with other
exporters in the same process (Ray, MLflow), and a guarded ``globals()`` check
keeps ``importlib.reload`` from registering them twice.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import start_wsgi_server

log = logging.getLogger(__name__)

TRAIN_STAGES = frozenset({"pretrain", "finetune"})
# Stage and metric names become label values: keep them short identifiers so a
# bug cannot turn free text (or data) into unbounded label cardinality.
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def _build_metrics() -> dict[str, Any]:
    reg = CollectorRegistry(auto_describe=True)
    return {
        "registry": reg,
        "train_steps": Counter(
            "privimage_train_steps", "Optimizer steps taken (DP steps in finetune).",
            ["run_id", "stage"], registry=reg),
        "train_samples": Counter(
            "privimage_train_samples",
            "Training samples processed; finetune counts the expected (public) batch size.",
            ["run_id", "stage"], registry=reg),
        "samples_per_second": Gauge(
            "privimage_train_samples_per_second", "Training throughput of one worker.",
            ["run_id", "stage", "worker"], registry=reg),
        "train_loss": Gauge(
            "privimage_train_loss",
            "Training loss (finetune only when non-private export is enabled).",
            ["run_id", "stage"], registry=reg),
        "epsilon_spent": Gauge(
            "privimage_epsilon_spent", "Privacy budget spent so far (accountant epsilon).",
            ["run_id"], registry=reg),
        "epsilon_target": Gauge(
            "privimage_epsilon_target", "Total privacy budget of the run.",
            ["run_id"], registry=reg),
        "selected_images": Gauge(
            "privimage_selector_selected_images",
            "Public images selected for pre-training (from the noisy histogram).",
            ["run_id"], registry=reg),
        "stage_seconds": Gauge(
            "privimage_stage_seconds", "Wall time of finished pipeline stages.",
            ["run_id", "stage"], registry=reg),
        "eval_metric": Gauge(
            "privimage_eval_metric", "Evaluation metrics of the synthetic data (fid, accuracy).",
            ["run_id", "metric"], registry=reg),
    }


# Survives importlib.reload (the module dict is reused), so metrics are
# registered exactly once per module object.
if "_M" not in globals():
    _M: dict[str, Any] = _build_metrics()
    _SERVER: dict[str, Any] = {}
    _SERVER_LOCK = threading.Lock()

REGISTRY: CollectorRegistry = _M["registry"]

# Exported names as Prometheus exposes them (counters gain ``_total``); the
# Grafana dashboard and tests check their queries against this set.
METRIC_NAMES = frozenset({
    "privimage_train_steps_total", "privimage_train_samples_total",
    "privimage_train_samples_per_second", "privimage_train_loss",
    "privimage_epsilon_spent", "privimage_epsilon_target",
    "privimage_selector_selected_images", "privimage_stage_seconds",
    "privimage_eval_metric",
})


def start_metrics_server(port: int = 0, host: str = "127.0.0.1") -> int:
    """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns the bound port.

    Loopback by default: the exporter has no authentication, so exposing it
    beyond the node is an explicit choice. ``port=0`` lets the OS pick a free
    port (several trainers on one node cannot collide). Idempotent per
    process: later calls return the first server's port. The pid check makes
    a forked child start its own server instead of reporting the parent's.
    """
    with _SERVER_LOCK:
        if _SERVER.get("pid") == os.getpid():
            if port and port != _SERVER["port"]:
                log.warning("metrics server already on port %s; ignoring port %s",
                            _SERVER["port"], port)
            return _SERVER["port"]
        httpd, thread = start_wsgi_server(port, addr=host, registry=REGISTRY)
        bound = int(httpd.server_address[1])
        _SERVER.clear()
        _SERVER.update(pid=os.getpid(), port=bound, host=host, httpd=httpd, thread=thread)
        log.info("privimage metrics on http://%s:%d/metrics", host, bound)
        return bound


def metrics_server_address() -> tuple[str, int] | None:
    """(host, port) of this process's exporter, or None if not started."""
    if _SERVER.get("pid") == os.getpid():
        return _SERVER["host"], _SERVER["port"]
    return None


def stop_metrics_server() -> None:
    """Shut the exporter down (tests; long-lived drivers between runs)."""
    with _SERVER_LOCK:
        if _SERVER.get("pid") == os.getpid():
            _SERVER["httpd"].shutdown()
            _SERVER["httpd"].server_close()
        _SERVER.clear()


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"{kind} must be a short lowercase identifier, got {value!r}")
    return value


class PipelineMetrics:
    """Facade bound to one run id. Cheap to create; many may coexist.

    Holds only the run id and flags, so it pickles into Ray workers; the
    metric objects themselves stay module-level in each process.
    """

    def __init__(self, run_id: str, export_nonprivate_loss: bool = False):
        if not run_id or not isinstance(run_id, str):
            raise ValueError("run_id must be a non-empty string")
        self.run_id = run_id
        self.export_nonprivate_loss = export_nonprivate_loss

    def train_step(self, stage: str, n_samples: int, loss: float | None = None,
                   samples_per_second: float | None = None, worker: str | int = "0") -> None:
        """One optimizer step. For ``finetune`` pass the expected batch size."""
        if stage not in TRAIN_STAGES:
            raise ValueError(f"stage must be one of {sorted(TRAIN_STAGES)}, got {stage!r}")
        if n_samples < 0:
            raise ValueError("n_samples must be >= 0")
        _M["train_steps"].labels(self.run_id, stage).inc()
        _M["train_samples"].labels(self.run_id, stage).inc(n_samples)
        if samples_per_second is not None:
            _M["samples_per_second"].labels(self.run_id, stage, str(worker)).set(
                float(samples_per_second))
        if loss is not None and (stage == "pretrain" or self.export_nonprivate_loss):
            _M["train_loss"].labels(self.run_id, stage).set(float(loss))

    def epsilon(self, spent: float, target: float) -> None:
        _M["epsilon_spent"].labels(self.run_id).set(float(spent))
        _M["epsilon_target"].labels(self.run_id).set(float(target))

    def selected(self, n: int) -> None:
        _M["selected_images"].labels(self.run_id).set(int(n))

    def stage_done(self, stage: str, seconds: float) -> None:
        _M["stage_seconds"].labels(self.run_id, _check_name("stage", stage)).set(float(seconds))

    def eval_metric(self, name: str, value: float) -> None:
        _M["eval_metric"].labels(self.run_id, _check_name("metric", name)).set(float(value))
