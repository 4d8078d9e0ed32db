"""Live metrics for the pipeline (trainer, selector, evaluator), through Ray.

Every process of a run (the job driver, the selector actor, the Ray Train
workers) records its metrics with Ray's metrics API (``ray.util.metrics``).
Ray ships them to the metrics agent of the node the process runs on, which
serves them, next to Ray's own ``ray_node_*`` metrics, on that node's metrics
export port (``ray start --metrics-export-port=8080``; a local run prints its
port). So one scrape of a node shows everything a running job does there, and
Prometheus finds every node through Ray's service discovery file
(``deploy/prometheus/prometheus.yml``). Nothing here opens a port of its own.

Names as Prometheus sees them (measured with Ray 2.60, see ``METRIC_NAMES``):
Ray's exporter prefixes ``ray_`` and counters gain ``_total``. Ray adds its own
labels (``SessionName``, ``NodeAddress``, ``WorkerId``, ``Component``,
``Version``, ``otel_scope_*``), so one metric may have a series per process:
aggregate with ``sum by (run_id, stage)`` (counters) or ``max by (run_id)``.

Ray forgets a gauge series about two report intervals
(``RAY_metrics_report_interval_ms``, default 10 s) after its process last set
it. A background thread therefore re-sets this process's last gauge values
every half interval while the process lives; a finished worker's gauges age
out, counters stay.

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
- epsilon, the public index size, the number of selected public images
  (post-processing of the noisy histogram) and evaluation metrics (FID /
  accuracy of synthetic data against the held-out test split, which the
  project treats as public) are fine.

Outside Ray (``ray.is_initialized()`` false) the calls only update this
process's in-memory mirror (``snapshot()``), which the unit tests read.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any

import ray
from ray.util.metrics import Counter, Gauge

log = logging.getLogger(__name__)

TRAIN_STAGES = frozenset({"pretrain", "finetune"})
# Stage and metric names become label values: keep them short identifiers so a
# bug cannot turn free text (or data) into unbounded label cardinality.
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# MLflow run ids (32 hex) and test ids; never free text.
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Ray's Prometheus exporter namespace (ray._private.telemetry).
RAY_PREFIX = "ray_"

# key -> (kind, name given to ray.util.metrics, description, tag keys)
SPECS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "train_steps": ("counter", "privimage_train_steps",
                    "Optimizer steps taken (DP steps in finetune).", ("run_id", "stage")),
    "train_samples": ("counter", "privimage_train_samples",
                      "Training samples processed; finetune counts the expected (public) "
                      "batch size.", ("run_id", "stage")),
    "samples_per_second": ("gauge", "privimage_train_samples_per_second",
                           "Training throughput of one worker (expected batch size in finetune).",
                           ("run_id", "stage", "worker")),
    "train_loss": ("gauge", "privimage_train_loss",
                   "Training loss (finetune only when non-private export is enabled).",
                   ("run_id", "stage")),
    "epsilon_spent": ("gauge", "privimage_epsilon_spent",
                      "Privacy budget spent so far (accountant epsilon).", ("run_id",)),
    "epsilon_target": ("gauge", "privimage_epsilon_target",
                       "Total privacy budget of the run.", ("run_id",)),
    "public_images": ("gauge", "privimage_selector_public_images",
                      "Images in the public index.", ("run_id",)),
    "selected_images": ("gauge", "privimage_selector_selected_images",
                        "Public images selected for pre-training (from the noisy histogram).",
                        ("run_id",)),
    "stage_seconds": ("gauge", "privimage_stage_seconds",
                      "Wall time of finished pipeline stages.", ("run_id", "stage")),
    "eval_metric": ("gauge", "privimage_eval_metric",
                    "Evaluation metrics of the synthetic data (fid, accuracy).",
                    ("run_id", "metric")),
}


def exported_name(key: str) -> str:
    """The sample name Prometheus scrapes for ``SPECS[key]`` (Ray 2.60)."""
    kind, name, _, _ = SPECS[key]
    return RAY_PREFIX + name + ("_total" if kind == "counter" else "")


# Exported names as a scrape of Ray's metrics export port shows them; the
# Grafana dashboard and tests check their queries against this set, and
# tests/test_live_metrics.py checks it against a real scrape.
METRIC_NAMES = frozenset(exported_name(k) for k in SPECS)

# Per-process state. Survives importlib.reload (the module dict is reused).
if "_STATE" not in globals():
    _STATE: dict[str, Any] = {"pid": None, "ray": {}, "thread": None}
    _LOCK = threading.Lock()
    # Mirror of what this process recorded: (key, tags) -> value.
    _COUNTERS: dict[tuple[str, tuple], float] = {}
    _GAUGES: dict[tuple[str, tuple], float] = {}


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"{kind} must be a short lowercase identifier, got {value!r}")
    return value


def _ray_ready() -> bool:
    try:
        return ray.is_initialized()
    except Exception:
        return False


def _ray_metric(key: str):
    """This process's ray.util.metrics object for ``key`` (created once per pid)."""
    if _STATE["pid"] != os.getpid():  # forked child: fresh objects, fresh thread
        _STATE.update(pid=os.getpid(), ray={}, thread=None)
    m = _STATE["ray"].get(key)
    if m is None:
        kind, name, desc, tags = SPECS[key]
        m = (Counter if kind == "counter" else Gauge)(name, description=desc, tag_keys=tags)
        _STATE["ray"][key] = m
    return m


def refresh_seconds() -> float:
    """Half of Ray's report interval: gauges are re-set before Ray drops them."""
    try:
        ms = ray._config.metrics_report_interval_ms()
    except Exception:
        ms = 10_000
    return max(0.5, max(ms, 1000) / 2000.0)


def _keepalive() -> None:
    me = os.getpid()
    while _STATE["pid"] == me:
        time.sleep(refresh_seconds())
        if not _ray_ready():
            continue
        with _LOCK:
            items = list(_GAUGES.items())
        for (key, tags), value in items:
            try:
                _ray_metric(key).set(value, tags=dict(tags))
            except Exception as e:  # metrics must never break a run
                log.debug("metric refresh failed: %s", e)


def _record(key: str, tags: dict[str, str], value: float) -> None:
    kind = SPECS[key][0]
    tkey = (key, tuple(sorted(tags.items())))
    with _LOCK:
        if kind == "counter":
            _COUNTERS[tkey] = _COUNTERS.get(tkey, 0.0) + value
        else:
            _GAUGES[tkey] = value
    if not _ray_ready():
        return
    try:
        m = _ray_metric(key)
        if kind == "counter":
            if value > 0:
                m.inc(value, tags=tags)
        else:
            m.set(value, tags=tags)
            with _LOCK:
                if _STATE["thread"] is None:
                    t = threading.Thread(target=_keepalive, name="privimage-metrics", daemon=True)
                    _STATE["thread"] = t
                    t.start()
    except Exception as e:  # metrics must never break a run
        log.warning("metric %s not recorded: %s", key, e)


def snapshot() -> list[tuple[str, dict[str, str], float]]:
    """(exported name, labels, value) of everything this process recorded."""
    with _LOCK:
        items = list(_COUNTERS.items()) + list(_GAUGES.items())
    return [(exported_name(k), dict(t), v) for (k, t), v in items]


def forget(run_id: str) -> None:
    """Stop re-setting this run's gauges (its series then age out in Ray)."""
    with _LOCK:
        for k in [k for k in _GAUGES if ("run_id", run_id) in k[1]]:
            del _GAUGES[k]


def linger_seconds() -> float:
    """How long a process should stay alive after its last update so that Ray
    exports it once more (one report interval, plus a margin)."""
    return 2 * refresh_seconds() + 1.0


class PipelineMetrics:
    """Facade bound to one run id. Cheap to create; many may coexist.

    Holds only the run id and flags, so it pickles into Ray workers; the
    metric objects themselves are created per process.
    """

    def __init__(self, run_id: str, export_nonprivate_loss: bool = False):
        if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
            raise ValueError(f"run_id must be a short id, got {run_id!r}")
        self.run_id = run_id
        self.export_nonprivate_loss = export_nonprivate_loss

    def train_step(self, stage: str, n_samples: int, loss: float | None = None,
                   samples_per_second: float | None = None, worker: str | int = "0") -> None:
        """One optimizer step. For ``finetune`` pass the expected batch size."""
        if stage not in TRAIN_STAGES:
            raise ValueError(f"stage must be one of {sorted(TRAIN_STAGES)}, got {stage!r}")
        if n_samples < 0:
            raise ValueError("n_samples must be >= 0")
        worker = str(worker)
        if not worker.isdigit():
            raise ValueError(f"worker must be a rank, got {worker!r}")
        tags = {"run_id": self.run_id, "stage": stage}
        _record("train_steps", tags, 1.0)
        _record("train_samples", tags, float(n_samples))
        if samples_per_second is not None:
            _record("samples_per_second", {**tags, "worker": worker}, float(samples_per_second))
        if loss is not None and (stage == "pretrain" or self.export_nonprivate_loss):
            _record("train_loss", tags, float(loss))

    def stage_steps(self, stage: str, steps: int, n_samples: int) -> None:
        """A whole stage's steps and samples at once: how a DP stage reports
        them, at its end, so no per-step timing leaves the process."""
        if stage not in TRAIN_STAGES:
            raise ValueError(f"stage must be one of {sorted(TRAIN_STAGES)}, got {stage!r}")
        tags = {"run_id": self.run_id, "stage": stage}
        _record("train_steps", tags, float(steps))
        _record("train_samples", tags, float(n_samples))

    def epsilon(self, spent: float, target: float) -> None:
        _record("epsilon_spent", {"run_id": self.run_id}, float(spent))
        _record("epsilon_target", {"run_id": self.run_id}, float(target))

    def public_images(self, n: int) -> None:
        _record("public_images", {"run_id": self.run_id}, float(int(n)))

    def selected(self, n: int) -> None:
        _record("selected_images", {"run_id": self.run_id}, float(int(n)))

    def stage_done(self, stage: str, seconds: float) -> None:
        _record("stage_seconds", {"run_id": self.run_id, "stage": _check_name("stage", stage)},
                float(seconds))

    def eval_metric(self, name: str, value: float) -> None:
        _record("eval_metric", {"run_id": self.run_id, "metric": _check_name("metric", name)},
                float(value))

    def close(self, linger: bool = False) -> None:
        """End of the run: optionally wait until Ray has exported the final
        values (a job driver exits right after), then let them age out."""
        if linger and _ray_ready():
            time.sleep(linger_seconds())
        forget(self.run_id)
