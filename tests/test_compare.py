"""Sweep grids over any config keys and the comparison table (no Ray)."""
from __future__ import annotations

import pytest

from privimage_core.config import from_dict
from privimage_core.errors import ConfigError
from services.compare import comparison_rows, render
from services.tune import expand_grid

def test_grid_is_any_dotted_keys_and_duplicates_run_once():
    cfg = from_dict({"tune": {"search_space": {
        "method": ["privimage", "dpdm"], "privacy.target_epsilon": [1.0, 10.0],
        "run.seed": [0, 1], "finetune.steps": [60, 60.0]}}})
    trials = expand_grid(cfg)
    assert len(trials) == 2 * 2 * 2  # 60 and 60.0 resolve to the same config
    assert {t["config"]["method"] for t in trials} == {"privimage", "dpdm"}
    assert len({t["config"]["run"]["name"] for t in trials}) == len(trials)
    # a null default and the number it resolves to (finetune.lr for grayscale
    # data) are one trial, not two charged to the budget
    same = from_dict({"tune": {"search_space": {"finetune.lr": [None, 0.004]}}})
    assert len(expand_grid(same)) == 1
    assert len(expand_grid(same.with_overrides({"data.channels": 3}))) == 2

def test_sweep_epsilon_splits_the_budget_so_the_composition_fits():
    cfg = from_dict({"tune": {"search_space": {"run.seed": [0, 1, 2, 3]}, "sweep_epsilon": 8.0}})
    trials = expand_grid(cfg)
    assert [t["config"]["privacy"]["target_epsilon"] for t in trials] == [2.0] * 4
    assert sum(t["config"]["privacy"]["target_delta"] for t in trials) == pytest.approx(1e-5)
    # Tune runs every grid point num_samples times: the split counts every run
    rep = from_dict({"tune": {"search_space": {"run.seed": [0, 1]}, "sweep_epsilon": 8.0,
                              "num_samples": 2}})
    assert [t["config"]["privacy"]["target_epsilon"] for t in expand_grid(rep)] == [2.0] * 2


def test_a_retried_trial_keeps_its_run_directory(tmp_path):
    """A trial's run directory is fixed by the sweep and the trial, so a
    retried or restored trial resumes its run (and ledger) instead of
    spending again under a new one; the sweep's composition finds it."""
    import json

    from services.run_store import STATE_FILE
    from services.tune import sweep_ledgers, trial_run_dir

    a = trial_run_dir(str(tmp_path), "0123456789abcdef0123", "trial_0001")
    assert a == trial_run_dir(str(tmp_path), "0123456789abcdef0123", "trial_0001")
    assert a != trial_run_dir(str(tmp_path), "0123456789abcdef0123", "trial_0002")
    a.mkdir(parents=True)
    (a / STATE_FILE).write_text(json.dumps({"parent_run_id": "0123456789abcdef0123",
                                            "stages": {}}))
    assert list(sweep_ledgers(str(tmp_path), "0123456789abcdef0123")) == [str(a.resolve())]

def test_bad_search_spaces_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="not a config key"):
        from_dict({"tune": {"search_space": {"generator.size": ["tiny"]}}})
    with pytest.raises(ConfigError, match="not in tune.search_space"):
        from_dict({"tune": {"search_space": {"method": ["dpdm"]}, "compare_by": ["run.seed"]}})
    with pytest.raises(ConfigError, match="method 'dpgann' is unknown"):
        expand_grid(from_dict({"tune": {"search_space": {"method": ["dpgann"]}}}))

def test_comparison_table_gives_mean_and_std_over_seeds_and_counts_failures():
    trials = [{"overrides": {"method": "dpdm", "run.seed": s}, "accuracy": a, "fid": 50.0 + s,
               "kid": None, "epsilon": 9.9, "total_seconds": 100.0}
              for s, a in enumerate([0.80, 0.82, 0.84])]
    trials.append({"overrides": {"method": "privimage", "run.seed": 0}, "error": "boom"})
    rows = comparison_rows(trials, ["method"])
    assert rows[0]["accuracy (%)"] == "82.00 ± 2.00" and rows[0]["runs"] == "3/3"
    assert rows[1]["accuracy (%)"] == "—" and rows[1]["runs"] == "0/1"
    md, page = render(rows, ["method"], {"sweep_epsilon_composed": 17.5, "delta": 1e-5,
                                         "trials_charged": 3}, "t")
    assert "epsilon 17.500" in md and "<table>" in page and "dpdm" in page

def test_a_stopped_sweep_says_so_and_how_to_go_on(capsys, monkeypatch):
    """Ctrl-C makes Tune return with trials neither finished nor failed: the
    command exits 130 with the way to restore, and compare writes no table of
    the partial grid; a finished sweep (errors included) is not 'stopped'."""
    from types import SimpleNamespace

    import services.compare as compare
    from services.cli import _sweep_stopped
    from services.tune import trial_rows, unfinished_trials

    class Grid(list):
        def __init__(self, statuses):
            super().__init__(statuses)
            self.num_terminated = statuses.count("TERMINATED")
            self.num_errors = statuses.count("ERROR")

    assert unfinished_trials(Grid(["TERMINATED", "ERROR", "TERMINATED"])) == 0
    # what Tune returns for a trial stopped mid-way: its own metrics, none of ours
    trial = {"trial": {"overrides": {"method": "dpdm"}}}
    stopped_mid_way = SimpleNamespace(config=trial, error=None,
                                      metrics={"trial_id": "x", "done": False})
    done = SimpleNamespace(config=trial, error=None, metrics={
        "accuracy": 0.5, "run_dir": "/r", "epsilon": 1.0})
    assert trial_rows([stopped_mid_way, done]) == [
        {"overrides": {"method": "dpdm"}, "error": "unfinished"},
        {"overrides": {"method": "dpdm"}, "accuracy": 0.5, "fid": None, "kid": None,
         "epsilon": 1.0, "total_seconds": None, "run_dir": "/r"}]
    stopped = unfinished_trials(Grid(["TERMINATED", "RUNNING", "PENDING"]))
    assert stopped == 2
    assert _sweep_stopped({"unfinished_trials": 0, "trial_runs": 3}) is None
    assert _sweep_stopped({"unfinished_trials": stopped, "trial_runs": 3}) == 130
    assert "2 of 3 trials unfinished; run the same command again" in capsys.readouterr().err
    monkeypatch.setattr(compare, "run_sweep", lambda cfg, log=print: {
        "unfinished_trials": 2, "trial_runs": 3, "trials": []})
    assert compare.run_compare(from_dict({}))["table"] is None
