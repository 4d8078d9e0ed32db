"""Ctrl-C (SIGINT) and ``ray job stop`` (SIGTERM) stop a run within seconds,
keep what it computed, leave no Ray process behind and print the command
that resumes it (services/interrupts.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from services import interrupts
from services.run_store import STATE_FILE, resume_ledger
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
# Lines of the tools underneath that a run keeps out of its log (docs/log.md).
QUIETED = ("PreemptionWatcher", "Secure RNG", "Token authentication", "mlflow.store.db",
           "Loading weights", "Traceback")


@pytest.fixture
def handlers():
    saved = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    interrupts.reset()
    assert interrupts.install()
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    interrupts.reset()


def _kill_soon(sig, delay=0.5):
    threading.Timer(delay, os.kill, (os.getpid(), sig)).start()


def test_a_signal_stops_a_call_that_waits_in_a_thread(handlers):
    """Like Ray Train's fit in the main thread, the call below installs a
    SIGINT handler that swallows the signal; run through run_interruptible it
    cannot (it is not in the main thread), so the run's handler stops it."""
    def fit_like():
        try:
            signal.signal(signal.SIGINT, lambda *a: None)
        except ValueError:
            pass  # not the main thread: Ray Train skips its handler the same way
        time.sleep(3)
        return "finished"

    _kill_soon(signal.SIGTERM)
    t0 = time.time()
    with pytest.raises(interrupts.RunInterrupted) as e:
        interrupts.run_interruptible(fit_like, "fit")
    assert e.value.signal_name == "SIGTERM" and e.value.exit_code == 143
    assert time.time() - t0 < 2
    # control: called in the main thread, it swallows Ctrl-C and runs on
    interrupts.reset()
    interrupts.install()
    _kill_soon(signal.SIGINT)
    assert fit_like() == "finished"


def test_a_dp_stage_stopped_before_its_first_checkpoint_restarts_from_its_beginning(tmp_path):
    """In the run's own checkpoint directory no checkpoint means none was
    written, so the stage restarts; in other storage it stays refused."""
    from privimage_core.errors import PrivacyBudgetError
    from privimage_core.privacy.ledger import PrivacyLedger

    run = tmp_path / "r"
    run.mkdir()
    ledger = PrivacyLedger(5.0, 1e-4).state_dict()
    state = {"ledger": ledger, "stages": {},
             "dp_plans": {"finetune": {"mechanism": "dp_sgd_finetune", "noise_multiplier": 1.0,
                                       "sample_rate": 0.05, "total_steps": 10}}}
    led, resume = resume_ledger(state, str(run / "ray_train"), run)
    assert resume == {} and led.steps_of("dp_sgd_finetune") == 0
    with pytest.raises(PrivacyBudgetError, match="cannot be accounted"):
        resume_ledger(state, str(tmp_path / "elsewhere"), run)


def _start(args, env):
    return subprocess.Popen([sys.executable, "-m", "services.cli", "run", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _stop_when(p, trigger: str, sig, delay: float) -> tuple[int, str, float, set[int]]:
    """Send ``sig`` ``delay`` s after ``trigger`` appears in the output; returns
    (exit status, output, seconds from signal to exit, child pids seen)."""
    kids, out, sent = set(), [], {}

    def watch():
        while p.poll() is None:
            try:
                kids.update(c.pid for c in psutil.Process(p.pid).children(recursive=True))
            except psutil.Error:
                pass
            time.sleep(0.3)

    def fire():
        time.sleep(delay)
        sent["t"] = time.time()
        p.send_signal(sig)

    threading.Thread(target=watch, daemon=True).start()
    for line in p.stdout:
        out.append(line)
        if trigger and trigger in line:
            threading.Thread(target=fire, daemon=True).start()
            trigger = None
    rc = p.wait(timeout=120)
    return rc, "".join(out), time.time() - sent.get("t", time.time()), kids


def _alive(pids: set[int]) -> list[str]:
    time.sleep(2)
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc.name())
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
def test_sigterm_during_dp_sgd_and_sigint_during_evaluation_stop_and_resume(tmp_path):
    cfg = tiny_config(tmp_path, **{"finetune.steps": 40})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    # 1. SIGTERM (ray job stop) while DP-SGD steps run
    rc, out, took, kids = _stop_when(_start(["--config", str(tmp_path / "cfg.json")], env),
                                     "DP fine-tuning:", signal.SIGTERM, 2.0)
    assert rc == 143, out[-3000:]
    assert took < 20 and not _alive(kids)
    run_dir = next((tmp_path / "runs").glob("e2e-*"))
    assert f"privimage run --resume {run_dir}" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["stage"] == "finetune"
    assert "finetune" not in json.loads((run_dir / STATE_FILE).read_text())["stages"]
    # 2. resumed, then SIGINT (Ctrl-C) during the evaluation
    rc, out, took, kids = _stop_when(_start(["--resume", str(run_dir)], env),
                                     "stage 7/7: evaluate", signal.SIGINT, 1.0)
    assert rc == 130, out[-3000:]
    assert took < 20 and not _alive(kids)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "evaluate" and summary["signal"] == "SIGINT"
    assert summary["epsilon"]["confirmed"] <= cfg["privacy"]["target_epsilon"]
    # 3. resumed again: it finishes, the DP stage not taken twice
    rc, out, _, _ = _stop_when(_start(["--resume", str(run_dir)], env), "", signal.SIGINT, 0)
    assert rc in (0, 4), out[-3000:]  # 4: finished, but the tiny model is at chance
    # the log carries none of the lines docs/log.md says a run turns down
    assert [n for n in QUIETED if n in out] == [], out[-3000:]
    state = json.loads((run_dir / STATE_FILE).read_text())
    assert state["stages"].get("done") and "stopped" not in state
    assert "stage 5/7: finetune" not in out  # restored, not run again
    # MLflow: the two stopped attempts are KILLED parent runs that carry the
    # epsilon spent; the third finished
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("privimage")  # the default experiment
    parents = client.search_runs([exp.experiment_id], "tags.`mlflow.parentRunId` IS NULL",
                                 order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in parents] == ["KILLED", "KILLED", "FINISHED"]
    assert all("epsilon" in r.data.metrics for r in parents)
    assert [r.data.tags.get("result") for r in parents[:2]] == ["stopped", "stopped"]
