"""A real failure: a Ray Train worker process is killed (SIGKILL, by its pid)
in the middle of DP fine-tuning. With ray.max_failures >= 1 the worker group
restarts from the last committed checkpoint and the run ends with the ledger
of an uninterrupted run of the same plan: the same steps, sigma, q and
epsilon, never more."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from privimage_core.config import from_dict
from tests.helpers import tiny_config

# Opt-in (-m slow): 110 s of a 20-minute default suite on 2 cores. The
# default suite keeps the driver-restart resume (tests/test_pipeline_e2e.py).
pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS, EVERY = 20, 5


def _train_workers() -> list:
    """The Ray Train workers of this test's own Ray (the module's local Ray
    is started by this process, so its workers are descendants of it): never
    another Ray's on a shared host."""
    import psutil
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RayTrainWorker" in cmd:
            out.append(p)
    return out


def _checkpointed_steps(storage: Path) -> int:
    best = 0
    for f in storage.glob("*-finetune/checkpoint_*/ledger.json"):
        try:
            recs = json.loads(f.read_text())["records"]
        except (OSError, ValueError):
            continue
        best = max(best, sum(r["steps"] for r in recs if r["name"] == "dp_sgd_finetune"))
    return best


def test_killed_worker_recovers_with_the_uninterrupted_ledger(ray_local, tmp_path):
    from privimage_core.methods import get_method
    from privimage_core.privacy.plan import planned_ledger
    from services.pipeline import run_pipeline

    d = tiny_config(tmp_path, **{"finetune.steps": STEPS, "finetune.batch_size": 100,
                                 "finetune.physical_batch_size": 50,
                                 "ray.max_failures": 2, "ray.checkpoints_per_stage": STEPS // EVERY,
                                 "metrics.enabled": False})
    d["pretrain"]["steps"] = 2
    cfg = from_dict({**d, "method": "dpdm"})
    out: dict = {}

    def run():
        try:
            out["summary"] = run_pipeline(cfg, log=lambda _: None)
        except BaseException as e:  # surfaced below
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    killed = None
    deadline = time.time() + 400
    while time.time() < deadline and t.is_alive() and killed is None:
        runs = list((tmp_path / "runs").glob("e2e-*/ray_train"))
        if runs and EVERY <= _checkpointed_steps(runs[0]) < STEPS:
            workers = _train_workers()
            if workers:
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    t.join(timeout=600)
    assert killed is not None, "fine-tuning ended before a worker could be killed mid-stage"
    assert "error" not in out, out.get("error")
    s = out["summary"]
    plan = planned_ledger(cfg, get_method("dpdm"), 1000, s["delta"])
    rec = s["ledger"]["records"]
    assert [(r["name"], r["steps"]) for r in rec] == [("dp_sgd_finetune", STEPS)]
    assert rec[0]["noise_multiplier"] == plan.records[0].noise_multiplier
    assert rec[0]["sample_rate"] == plan.records[0].sample_rate
    assert s["epsilon"] == pytest.approx(plan.epsilon(), rel=1e-12)
    assert s["epsilon"] <= cfg.privacy.target_epsilon
