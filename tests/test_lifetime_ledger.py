"""The lifetime ledger: runs on one dataset compose, a crashed run stays
charged its plan, and concurrent runs cannot overspend the lifetime budget."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privimage_core.privacy import lifetime as lifetime_ledger
from privimage_core.errors import PrivacyBudgetError
from privimage_core.privacy.ledger import PrivacyLedger, compose_ledgers

REPO = Path(__file__).resolve().parents[1]
DIGEST = "ab" * 32
DELTA = 1e-5


def _plan(steps: int = 300) -> dict:
    """A run's ledger: the histogram query plus ``steps`` DP-SGD steps (about
    eps 2.57 alone at DELTA; two compose to 3.42, three to 4.13)."""
    led = PrivacyLedger(1e9, DELTA)
    led.record_gaussian("semantic_distribution_query", 20.0)
    led.begin_dp_sgd("dp_sgd", 1.0, 0.02).steps = steps
    return led.state_dict()


def _open(store, lifetime):
    return lifetime_ledger.open(store, DIGEST, lifetime, DELTA, "rdp")


def _reserve_in_subprocess(store, lifetime, run_id, then: str = "", wait_for: Path | None = None):
    """A separate process that prints "ready" once imported, then (when
    ``wait_for`` exists) reserves ``run_id`` and prints ok/refused."""
    code = f"""
import json, os, sys, time
from pathlib import Path
from privimage_core.privacy import lifetime as lifetime_ledger
from privimage_core.errors import PrivacyBudgetError
led = lifetime_ledger.open({str(store)!r}, {DIGEST!r}, {lifetime}, {DELTA}, "rdp")
plan = json.loads(sys.argv[1])
print("ready", flush=True)
go = {str(wait_for) if wait_for else None!r}
while go and not Path(go).exists():
    time.sleep(0.01)
try:
    led.reserve({run_id!r}, plan)
    print("ok", flush=True)
except PrivacyBudgetError:
    print("refused", flush=True)
{then}
"""
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(_plan())], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_two_runs_compose_and_the_third_is_refused(tmp_path):
    led = _open(tmp_path, 4.0)
    assert led.composed_epsilon() == 0.0
    led.reserve("r1", _plan())
    led.settle("r1", _plan())
    led.reserve("r2", _plan())
    assert led.composed_epsilon() == pytest.approx(compose_ledgers([_plan()] * 2, DELTA))
    assert led.composed_epsilon() < 2 * compose_ledgers([_plan()], DELTA)  # the accountant's, not a sum
    assert led.would_exceed(_plan()) and not led.would_exceed(_plan(1))
    with pytest.raises(PrivacyBudgetError) as e:
        led.reserve("r3", _plan())
    msg = str(e.value)
    assert "> 4" in msg and "raise the lifetime budget knowingly or use new data" in msg
    assert "\n" not in msg
    reopened = _open(tmp_path, 4.0)  # another process's view: the file is the truth
    assert set(reopened.runs()) == {"r1", "r2"}
    assert reopened.runs()["r2"]["status"] == "reserved"
    _open(tmp_path, 5.0).reserve("r3", _plan())  # a knowingly raised budget lets it in


def test_a_crash_between_reserve_and_settle_is_charged_the_plan(tmp_path):
    proc = _reserve_in_subprocess(tmp_path, 10.0, "crashed", then="os._exit(1)")
    out, _ = proc.communicate(timeout=120)
    assert out.strip() == "ok" and proc.returncode == 1
    led = _open(tmp_path, 10.0)
    assert led.runs()["crashed"]["status"] == "reserved"
    assert led.composed_epsilon() == pytest.approx(compose_ledgers([_plan()], DELTA))
    led.settle("crashed", _plan(100))  # a later settle replaces the plan by the actual
    assert led.composed_epsilon() == pytest.approx(compose_ledgers([_plan(100)], DELTA))
    with pytest.raises(PrivacyBudgetError, match="settled with more steps"):
        led.settle("crashed", _plan(50))
    with pytest.raises(PrivacyBudgetError, match="no lifetime-ledger reservation"):
        led.settle("never-reserved", _plan())


def test_concurrent_reservations_cannot_both_take_the_last_budget(tmp_path):
    go = tmp_path / "go"
    procs = [_reserve_in_subprocess(tmp_path / "store", 3.0, f"run{i}", wait_for=go)
             for i in range(2)]
    go.touch()  # both are imported and waiting: they race for the lock
    results = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert results == ["ok", "refused"]
    assert len(_open(tmp_path / "store", 3.0).runs()) == 1


def test_a_reservation_waits_for_the_lock(tmp_path):
    (tmp_path / "store").mkdir()
    fd = os.open(tmp_path / "store" / f"{DIGEST}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = _reserve_in_subprocess(tmp_path / "store", 10.0, "waiting")
        time.sleep(1.5)  # it is imported: a reservation takes well under this
        assert proc.poll() is None, "reserved while another process held the lock"
    finally:
        os.close(fd)
    assert proc.communicate(timeout=120)[0].strip() == "ok"


def test_resume_reserves_idempotently_and_bad_input_is_refused(tmp_path):
    led = _open(tmp_path, 10.0)
    led.reserve("r", _plan())
    led.reserve("r", _plan())  # a resumed run re-reserving its plan
    with pytest.raises(PrivacyBudgetError, match="another plan"):
        led.reserve("r", _plan(10))
    stored = (tmp_path / f"{DIGEST}.json").read_text()
    assert json.loads(stored)["runs"]["r"]["ledger"] == _plan()
    with pytest.raises(PrivacyBudgetError, match="not a SHA-256 hex digest"):
        lifetime_ledger.open(tmp_path, "../../etc/x", 10.0, DELTA)
    with pytest.raises(PrivacyBudgetError, match="lifetime epsilon must be > 0"):
        lifetime_ledger.open(tmp_path, DIGEST, 0.0, DELTA)
    with pytest.raises(PrivacyBudgetError, match="not a PrivacyLedger state"):
        led.reserve("s", {"records": [{"bogus": 1}]})
    (tmp_path / f"{DIGEST}.json").write_text("{not json")
    with pytest.raises(PrivacyBudgetError, match="unreadable.*deleting it would forget"):
        led.composed_epsilon()
    assert not list(tmp_path.glob("*.tmp"))
