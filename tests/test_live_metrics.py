"""One Prometheus scrape of a running job shows its progress: the head's
metrics export port (Ray's metrics agent) is scraped every second while the
pipeline submitted by tests/test_job_submit.py's fixture runs
(tests/ray_head_job.py); the trainer's steps and the epsilon spent move
between scrapes, the selector's and evaluator's metrics appear, and nothing
sensitive is in a label or a sample."""
from __future__ import annotations

import re

import pytest

from services import metrics
from services.actors import Evaluator

pytest_plugins = ["tests.ray_head_job"]
pytestmark = pytest.mark.ray

# Labels Ray adds to every application metric (Ray 2.60), and ours.
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId",
              "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"}
OUR_LABELS = {"run_id", "stage", "worker", "metric"}
# aggregate evaluation results only: never a class name or a per-record value
EVAL_METRICS = set(Evaluator.LIVE_METRICS) | {"synthetic_images"}
STAGES = {"pretrain", "finetune", "index", "semantic_query", "selection", "synthesize", "evaluate"}


def _ok(job):
    assert not job.error, job.error
    assert job.scrapes, "the metrics export port never answered"


def _run_id(job) -> str:
    return re.search(r"MLflow run ([0-9a-f]{32})", job.logs).group(1)


def _value(samples, name, agg=sum, **labels):
    vals = [v for n, lab, v in samples
            if n == name and all(lab.get(k) == x for k, x in labels.items())]
    return agg(vals) if vals else None


def test_progress_moves_between_scrapes(submitted_job):
    """Public pre-training's steps move between scrapes; a DP stage's steps
    and epsilon appear only when the stage is over (per-step times would
    follow the realised Poisson batch sizes), as one value each."""
    _ok(submitted_job)
    job = submitted_job
    run = _run_id(job)
    running = [s for s in job.scrapes if s.job_status == "RUNNING"]

    def seen(name, agg=sum, **labels):
        vals = [_value(s.samples, name, agg, run_id=run, **labels) for s in running]
        return vals, sorted({v for v in vals if v})

    pre, seen_pre = seen("ray_privimage_train_steps_total", stage="pretrain")
    assert len(seen_pre) >= 2, f"pretrain steps seen: {seen_pre}"
    pairs = [(a, b) for a, b in zip(pre, pre[1:]) if a and b]
    assert all(b >= a for a, b in pairs), "a counter went backwards"
    _, seen_ft = seen("ray_privimage_train_steps_total", stage="finetune")
    _, seen_eps = seen("ray_privimage_epsilon_spent", max)
    ft = job.cfg["finetune"]
    target = job.cfg["privacy"]["target_epsilon"]
    # the DP stage: only its final count, and epsilon before and after it
    assert seen_ft == [ft["steps"]], f"finetune steps seen: {seen_ft}"
    assert seen_eps and max(seen_eps) <= target and len(seen_eps) <= 3, seen_eps
    assert not any(_value(s.samples, "ray_privimage_train_samples_per_second", stage="finetune")
                   for s in job.scrapes)
    # one scrape while the job still ran shows the steps, epsilon spent and target together
    both = [s for s in running
            if _value(s.samples, "ray_privimage_train_steps_total", run_id=run, stage="finetune")
            and _value(s.samples, "ray_privimage_epsilon_spent", max, run_id=run)
            and _value(s.samples, "ray_privimage_epsilon_target", max, run_id=run) == target]
    assert both, "no single scrape showed fine-tuning progress and epsilon together"


def test_every_metric_seen_and_names_match_the_code(submitted_job):
    """METRIC_NAMES (which the Grafana dashboard is checked against) is what
    Ray really exports."""
    _ok(submitted_job)
    job = submitted_job
    run = _run_id(job)
    seen = {n for s in job.scrapes for n, lab, _ in s.samples if lab.get("run_id") == run}
    assert seen == set(metrics.METRIC_NAMES)
    last = {}
    for s in job.scrapes:
        for n, lab, v in s.samples:
            if lab.get("run_id") == run:
                last[(n, lab.get("stage"), lab.get("metric"))] = v
    assert last[("ray_privimage_selector_public_images", None, None)] > 0
    assert last[("ray_privimage_selector_selected_images", None, None)] > 0
    acc = last[("ray_privimage_eval_metric", None, "accuracy_lr")]
    assert 0.0 <= acc <= 1.0
    # recorded by the evaluator actor itself while it lived
    assert last[("ray_privimage_eval_metric", None, "synthetic_images")] > 0
    assert last[("ray_privimage_stage_seconds", "finetune", None)] > 0


def test_no_sensitive_content_in_labels_or_samples(submitted_job):
    _ok(submitted_job)
    job = submitted_job
    run = _run_id(job)
    for s in job.scrapes:
        for name, labels, value in s.samples:
            assert name in metrics.METRIC_NAMES, name
            assert set(labels) <= RAY_LABELS | OUR_LABELS, sorted(labels)
            assert labels["run_id"] == run
            if "stage" in labels:
                assert labels["stage"] in STAGES, labels["stage"]
            if "worker" in labels:
                assert labels["worker"].isdigit()
            if "metric" in labels:
                assert labels["metric"] in EVAL_METRICS, labels
            # the loss on sensitive batches is not DP: never exported by default
            assert not (name == "ray_privimage_train_loss" and labels.get("stage") == "finetune")
    # finetune samples are the expected (public) batch size times the steps,
    # not the realised Poisson batch sizes.
    last = job.scrapes[-1].samples
    steps = _value(last, "ray_privimage_train_steps_total", run_id=run, stage="finetune")
    samples = _value(last, "ray_privimage_train_samples_total", run_id=run, stage="finetune")
    ft = job.cfg["finetune"]
    assert steps == ft["steps"]
    assert samples == ft["steps"] * ft["batch_size"]
