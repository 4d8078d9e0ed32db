"""The run uses, and releases, a public size instead of the true number of
records (privimage_core/privacy/dataset_size.py, services/budget.py)."""
from __future__ import annotations

import json

import pytest

from privimage_core.config import from_dict
from privimage_core.data.subsample import materialise_subsample
from privimage_core.errors import PrivacyBudgetError
from privimage_core.methods import get_method
from privimage_core.privacy import dataset_size as ds
from privimage_core.privacy.plan import plan_run, sample_rate_for
from services import budget as budget_mod
from services.budget import open_lifetime, prepare_budget
from tests.helpers import noise_folder


def _cfg(tmp_path, spec, **privacy):
    return from_dict({"method": "dpdm",
                      "data": {"sensitive": spec, "sensitive_test": spec},
                      "run": {"ledger_store": str(tmp_path / "store")},
                      "finetune": {"steps": 5, "batch_size": 50},
                      "evaluation": {"canary_audit": False},
                      "privacy": privacy})


def test_public_sizes_come_from_declarations_never_from_the_data(tmp_path):
    d = noise_folder(tmp_path / "data", 20)
    spec = f"folder:{d}"
    assert ds.known_size(_cfg(tmp_path, spec)) is None  # a user folder: nothing public
    assert ds.known_size(_cfg(tmp_path, spec, dataset_size=5000)) == ds.PublicSize(5000,
                                                                                   "declared")
    mnist = from_dict({})
    assert ds.known_size(mnist) == ds.PublicSize(60_000, "builtin")
    sub = materialise_subsample(spec, 30, tmp_path / "sub.parquet")
    assert ds.known_size(_cfg(tmp_path, f"parquet:{sub}")) == ds.PublicSize(30, "subsample")


def test_neighbouring_datasets_get_the_same_plan():
    """With a public size, adding a record changes nothing the plan holds
    (q, sigma, steps); the control shows that a plan from the true N did."""
    cfg = from_dict({"method": "dpdm", "evaluation": {"canary_audit": False}})
    method = get_method("dpdm")
    a, b = plan_run(cfg, method, 60_000, 1e-5), plan_run(cfg, method, 60_000, 1e-5)
    assert a.to_dict() == b.to_dict()
    # what q from the true N would have done, at a dataset of 118 batches of 512
    # plus one record: its neighbour without that record gets another rate
    n, n1 = plan_run(cfg, method, 512 * 118, 1e-5), plan_run(cfg, method, 512 * 118 + 1, 1e-5)
    assert n.stages["finetune"].sample_rate != n1.stages["finetune"].sample_rate


def test_the_size_query_is_reserved_before_it_runs_and_not_repeated_on_resume(tmp_path,
                                                                              monkeypatch):
    d = noise_folder(tmp_path / "data", 20)
    cfg = _cfg(tmp_path, f"folder:{d}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    seen = {}
    real = ds.estimate_size

    def spy(n, sigma, ledger):
        seen["reserved"] = open_lifetime(cfg, 1e-5).runs()[str(run_dir)]["ledger"]["records"]
        seen["n"] = n
        return real(n, sigma, ledger)

    monkeypatch.setattr(budget_mod, "estimate_size", spy)
    state: dict = {"stages": {}}
    b = prepare_budget(cfg, get_method("dpdm"), 40, state, run_dir, log=lambda s: None)
    assert [r["name"] for r in seen["reserved"]] == [ds.SIZE_MECHANISM] and seen["n"] == 40
    assert b.size.source == "dp_estimate" and b.plan.size_sigma == b.size.noise_multiplier
    assert [r.name for r in b.ledger.records] == [ds.SIZE_MECHANISM]
    # q comes from the estimate, the reservation grew to the whole plan
    assert b.plan.stages["finetune"].sample_rate == sample_rate_for(b.size.value, 50)
    names = [r["name"] for r in open_lifetime(cfg, b.delta).runs()[str(run_dir)]["ledger"]
             ["records"]]
    assert names == [ds.SIZE_MECHANISM, "dp_sgd_finetune"]
    saved = json.loads((run_dir / "pipeline_state.json").read_text())
    assert saved["dataset_size"]["value"] == b.size.value
    # a resume neither queries again nor changes anything
    seen.clear()
    b2 = prepare_budget(cfg, get_method("dpdm"), 40, state, run_dir, log=lambda s: None)
    assert not seen and b2.plan.to_dict() == b.plan.to_dict() and b2.size == b.size


def test_a_refused_plan_keeps_the_size_query_charged(tmp_path):
    d = noise_folder(tmp_path / "data", 20)
    cfg = _cfg(tmp_path, f"folder:{d}", lifetime_epsilon=10.0)
    led = open_lifetime(cfg, 1e-5)
    led.reserve("earlier", plan_run(_cfg(tmp_path, f"folder:{d}", dataset_size=40),
                                    get_method("dpdm"), 40, 1e-5).ledger().state_dict())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(PrivacyBudgetError, match="lifetime epsilon"):
        prepare_budget(cfg, get_method("dpdm"), 40, {"stages": {}}, run_dir, log=lambda s: None)
    entry = open_lifetime(cfg, 1e-5).runs()[str(run_dir)]
    assert [r["name"] for r in entry["ledger"]["records"]] == [ds.SIZE_MECHANISM]
