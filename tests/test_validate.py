"""``privimage validate`` runs every check ``privimage run`` makes before a
mechanism reads the sensitive data, and spends nothing."""
from __future__ import annotations

import json

from privimage_core.config import from_dict
from privimage_core.methods import get_method
from privimage_core.privacy.plan import plan_run
from services.budget import open_lifetime
from services.cli import main


def _validate(capsys, *sets: str) -> tuple[int, str, str]:
    rc = main(["validate", *[a for s in sets for a in ("--set", s)]])
    out, err = capsys.readouterr()
    return rc, out, err


def test_validate_refuses_what_run_refuses_before_reading_data(capsys, tmp_path):
    store = f"run.ledger_store={tmp_path / 'store'}"
    rc, out, err = _validate(capsys, store, "evaluation.sds=false")
    assert rc == 0, err
    got = json.loads(out)
    assert got["ok"] and got["dataset_size_source"] == "builtin" and got["classes"] == 10
    assert 0 < got["planned_epsilon"] <= 10.0 and got["dp_stages"]["finetune"]["steps"] == 60
    # a generator override that does not build (run refused it; validate said ok)
    rc, out, err = _validate(capsys, store, "evaluation.sds=false",
                             "generator.overrides={base_chanels: 64}")
    assert rc == 2 and not out and len(err.strip().splitlines()) == 1
    assert "generator.overrides" in err
    # a lifetime budget the plan would exceed (two such runs compose to about 11.6)
    cfg = from_dict({"run": {"ledger_store": str(tmp_path / "store")}})
    plan = plan_run(cfg, get_method("privimage"), 60_000, 1e-5)
    open_lifetime(cfg, 1e-5).reserve("earlier-run", plan.ledger().state_dict())
    rc, out, err = _validate(capsys, store, "evaluation.sds=false",
                             "privacy.lifetime_epsilon=11")
    assert rc == 2 and "lifetime epsilon" in err and len(err.strip().splitlines()) == 1
    # nothing was reserved or spent by validating
    assert list(open_lifetime(cfg, 1e-5).runs()) == ["earlier-run"]
