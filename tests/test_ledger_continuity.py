"""A run's privacy ledger survives failures: a resumed run continues from the
ledgers its fine-tuning checkpoints hold, and a sweep charges every trial that
touched the sensitive data, failed ones included (services/pipeline.py,
services/tune.py). No Ray needed: these read run directories."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from privimage_core.privacy.plan import DP_SGD_MECHANISM
from privimage_core.errors import ConfigError, PrivacyBudgetError
from privimage_core.privacy.ledger import PrivacyLedger, compose_ledgers
from privimage_core.selection.distribution import QUERY_MECHANISM
from services.run_store import STATE_FILE, resume_ledger, spent_upper_bound
from services.tune import sweep_ledgers

SIGMA, Q = 1.0, 0.01


def _ledger(dp_steps: int | None) -> dict:
    led = PrivacyLedger(10.0, 1e-5)
    led.record_gaussian(QUERY_MECHANISM, 20.0)
    if dp_steps is not None:
        led.begin_dp_sgd(DP_SGD_MECHANISM, SIGMA, Q).steps = dp_steps
    return led.state_dict()


def _run_dir(root: Path, name: str, *, parent: str | None, started_finetune: bool,
             finished: bool, planned: int = 200, dp_steps: int = 0) -> Path:
    d = root / name
    d.mkdir(parents=True)
    state = {"config": {}, "stages": {"selection": {}}, "parent_run_id": parent,
             "ledger": _ledger(dp_steps if finished else None)}
    if started_finetune:
        state["dp_plans"] = {"finetune": {"mechanism": DP_SGD_MECHANISM,
                                          "noise_multiplier": SIGMA, "sample_rate": Q,
                                          "total_steps": planned}}
    if finished:
        state["stages"]["finetune"] = {"steps": dp_steps}
    (d / STATE_FILE).write_text(json.dumps(state))
    return d


def _checkpoint(storage: Path, trainer: str, stamp: str, dp_steps: int | None) -> None:
    c = storage / trainer / f"checkpoint_{stamp}"
    c.mkdir(parents=True)
    if dp_steps is not None:
        (c / "ledger.json").write_text(json.dumps(_ledger(dp_steps)))


def test_resume_continues_the_checkpointed_ledger_not_the_saved_state(tmp_path):
    run = _run_dir(tmp_path, "r", parent=None, started_finetune=True, finished=False)
    state = json.loads((run / STATE_FILE).read_text())
    storage = tmp_path / "ray_train"
    _checkpoint(storage, "r-finetune", "2026-12-02_07-00-00", 50)
    _checkpoint(storage, "r-finetune", "2026-12-02_07-05-00", 100)
    _checkpoint(storage, "r-finetune", "2026-12-02_07-09-00", None)  # died while writing
    led, path = resume_ledger(state, str(storage), run)
    dp = next(r for r in led.records if r.name == DP_SGD_MECHANISM)
    assert dp.steps == 100  # the most steps any checkpoint recorded
    assert path == {"finetune": "r-finetune/checkpoint_2026-12-02_07-05-00"}  # restarts from it
    assert led.epsilon() > PrivacyLedger.from_state_dict(state["ledger"]).epsilon()


def test_resume_refuses_when_finetuning_started_but_no_checkpoint_survived(tmp_path):
    run = _run_dir(tmp_path, "r", parent=None, started_finetune=True, finished=False)
    state = json.loads((run / STATE_FILE).read_text())
    with pytest.raises(PrivacyBudgetError, match="cannot be accounted"):
        resume_ledger(state, str(tmp_path / "ray_train"), run)
    # surviving checkpoints older than the saved ledger: refused, not undercounted
    state["ledger"] = _ledger(80)
    _checkpoint(tmp_path / "ray_train", "r-finetune", "2026-12-02_07-00-00", 50)
    with pytest.raises(PrivacyBudgetError, match="later weights"):
        resume_ledger(state, str(tmp_path / "ray_train"), run)
    # a finished DP stage needs no checkpoint: its release and ledger are saved
    done = _run_dir(tmp_path, "d", parent=None, started_finetune=True, finished=True,
                    dp_steps=100)
    led, path = resume_ledger(json.loads((done / STATE_FILE).read_text()), str(tmp_path / "x"),
                              done)
    assert path == {} and led.steps_of(DP_SGD_MECHANISM) == 100


def test_checkpoints_found_in_train_v1_layout_and_opened_with_their_filesystem(tmp_path):
    from services.run_store import checkpoint_ledgers, open_checkpoint

    # Train V1 nests checkpoints in a trial directory
    _checkpoint(tmp_path / "ray_train", "r-finetune/TorchTrainer_0_x", "000003", 30)
    found = checkpoint_ledgers(str(tmp_path / "ray_train"), "r-finetune")
    assert [p for p, _ in found] == ["r-finetune/TorchTrainer_0_x/checkpoint_000003"]
    ck = open_checkpoint(str(tmp_path / "ray_train"), found[0][0])
    with ck.as_directory() as d:
        assert json.loads((Path(d) / "ledger.json").read_text())["records"][1]["steps"] == 30


def test_resume_before_finetuning_uses_the_saved_ledger(tmp_path):
    run = _run_dir(tmp_path, "r", parent=None, started_finetune=False, finished=False)
    state = json.loads((run / STATE_FILE).read_text())
    led, path = resume_ledger(state, str(tmp_path / "nothing"), run)
    assert [r.name for r in led.records] == [QUERY_MECHANISM] and path == {}


def test_spent_upper_bound_charges_a_failed_run_its_whole_plan(tmp_path):
    done = _run_dir(tmp_path, "done", parent="S", started_finetune=True, finished=True,
                    dp_steps=120)
    failed = _run_dir(tmp_path, "failed", parent="S", started_finetune=True, finished=False,
                      planned=200)
    early = _run_dir(tmp_path, "early", parent="S", started_finetune=False, finished=False)
    assert spent_upper_bound(done) == json.loads((done / STATE_FILE).read_text())["ledger"]
    f = spent_upper_bound(failed)
    assert [r["steps"] for r in f["records"] if r["name"] == DP_SGD_MECHANISM] == [200]
    assert [r["name"] for r in spent_upper_bound(early)["records"]] == [QUERY_MECHANISM]
    assert spent_upper_bound(tmp_path / "absent") is None


def test_sweep_composes_every_trial_of_this_sweep_including_failed(tmp_path):
    _run_dir(tmp_path, "t1", parent="S", started_finetune=True, finished=True, dp_steps=120)
    _run_dir(tmp_path, "t2", parent="S", started_finetune=True, finished=False, planned=200)
    _run_dir(tmp_path, "other", parent="X", started_finetune=True, finished=True, dp_steps=120)
    by_dir = sweep_ledgers(str(tmp_path), "S")
    assert sorted(Path(d).name for d in by_dir) == ["t1", "t2"]
    ledgers = [by_dir[str((tmp_path / n).resolve())] for n in ("t1", "t2")]
    only_finished = compose_ledgers(ledgers[:1], 1e-5)
    assert compose_ledgers(ledgers, 1e-5) > only_finished  # the failed trial is charged


def test_sweep_without_shared_storage_uses_reports_and_says_when_incomplete(tmp_path):
    """Trials on other nodes: their directories are not visible to the driver.
    A finished one is charged the ledger it reported; a failed invisible one
    makes the composition a lower bound, flagged as such."""
    from types import SimpleNamespace

    from services.tune import compose_sweep

    local = _run_dir(tmp_path, "t1", parent="S", started_finetune=True, finished=True,
                     dp_steps=120)
    never = _run_dir(tmp_path, "t0", parent="S", started_finetune=False, finished=False)
    state = json.loads((never / STATE_FILE).read_text())
    del state["ledger"]  # failed before the query: spent nothing
    (never / STATE_FILE).write_text(json.dumps(state))
    remote = {"run_dir": "/elsewhere/t2", "ledger": _ledger(120)}
    results = [SimpleNamespace(metrics={"run_dir": str(local), "ledger": _ledger(120)}),
               SimpleNamespace(metrics={}),  # t0, failed, but its directory is here
               SimpleNamespace(metrics=remote)]
    ledgers, complete = compose_sweep(results, str(tmp_path), "S")
    assert len(ledgers) == 2 and complete  # t1 once (not twice), t2 from its report
    results.append(SimpleNamespace(metrics={}))  # a failed trial on another node
    ledgers, complete = compose_sweep(results, str(tmp_path), "S")
    assert len(ledgers) == 2 and not complete
