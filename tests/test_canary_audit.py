"""The one-run canary audit (privimage_core/evaluation/canary_audit.py;
Steinke, Nasr & Jagielski 2023): the bound's math, the inclusion bits, the
verdicts, and a failing control: a broken DP-SGD (noise off, no clipping)
must be caught, the same training with real noise must not be."""
from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
from scipy.special import expit, logit
from scipy.stats import binom

from privimage_core.config import from_dict
from privimage_core.errors import ConfigError, DataError
from privimage_core.evaluation import canary_audit as ca

torch.set_num_threads(1)


# ------------------------------------------------------------------ the bound
def test_p_value_without_delta_is_the_binomial_tail():
    for r, v, eps in ((50, 40, 1.0), (200, 120, 0.3), (10, 10, 2.0)):
        assert ca.p_value(500, r, v, eps, 0.0) == pytest.approx(binom.sf(v - 1, r, expit(eps)))
    # the delta term only makes the p-value larger, hence the bound smaller
    assert ca.p_value(500, 50, 45, 1.0, 1e-5) >= ca.p_value(500, 50, 45, 1.0, 0.0)
    assert (ca.epsilon_lower_bound(500, 100, 95, 0.05, 1e-3)
            <= ca.epsilon_lower_bound(500, 100, 95, 0.05, 0.0))


def test_all_correct_guesses_give_the_provable_maximum():
    for r in (8, 64, 250):
        top = ca.max_provable_epsilon(r, r, 0.05, 0.0)
        # closed form at delta 0: q^r = beta, eps = logit(beta^(1/r))
        assert top == pytest.approx(logit(0.05 ** (1 / r)), abs=1e-4)
        assert ca.epsilon_lower_bound(r, r, r, 0.05, 0.0) == top
        assert ca.epsilon_lower_bound(r, r, r - 1, 0.05, 0.0) < top
    # the default m = 500 (250 evaluated): at most ~4.4 can be shown
    assert 4.3 < ca.max_provable_epsilon(250, 250, 0.05, 1e-5) < 4.5


def test_bound_is_monotone_in_the_number_of_canaries():
    tops = [ca.max_provable_epsilon(n, n, 0.05, 1e-5) for n in (16, 64, 256, 1024, 4096)]
    assert all(a < b for a, b in zip(tops, tops[1:])), tops
    # the same 90% accuracy proves more with more guesses
    lbs = [ca.epsilon_lower_bound(n, n, int(0.9 * n), 0.05, 1e-5) for n in (50, 100, 200, 400)]
    assert all(a < b for a, b in zip(lbs, lbs[1:])), lbs


def test_random_guesses_give_a_bound_near_zero():
    """Scores independent of the bits (no leakage): the bound is > 0 with
    probability <= beta (Theorem 5.2 at eps = 0)."""
    rng = np.random.default_rng(0)
    lbs = np.array([ca.audit(rng.normal(size=200), ca.draw_inclusion(200, rng), 1.0, 1e-5)["eps_lb"]
                    for _ in range(100)])
    print(f"random guesses: {np.mean(lbs > 0):.2f} of trials > 0, mean {lbs.mean():.3f}")
    assert np.mean(lbs > 0) <= 0.15 and lbs.mean() < 0.1


def test_guesses_are_chosen_on_the_other_half():
    rng = np.random.default_rng(1)
    bits = ca.draw_inclusion(400, rng)
    scores = np.where(bits, 0.0, 1.0) + rng.normal(0, 0.3, 400)
    a = ca.audit(scores, bits, 1.0, 1e-5)
    flipped = bits.copy()
    flipped[1::2] = ~flipped[1::2]  # the evaluation half's bits: no say in k
    b = ca.audit(scores, flipped, 1.0, 1e-5)
    assert (a["k_pos"], a["k_neg"]) == (b["k_pos"], b["k_neg"])
    assert a["eps_lb"] > 1.0 and b["eps_lb"] == 0.0  # all wrong proves nothing
    g = ca.guesses(np.array([3.0, 1.0, 2.0, 0.0]), 1, 1)
    assert g.tolist() == [-1, 0, 0, 1]  # lowest loss = "in"


# ------------------------------------------------------------------ verdicts
def test_verdicts_and_never_passed():
    v, msg = ca.verdict(0.5, 4.4, 10.0, 500)
    assert v == "inconclusive" and msg.startswith("inconclusive: at most 4.400 can be shown with "
                                                  "500 canaries")
    assert ca.verdict(2.0, 4.4, 1.0, 500)[0] == "violation"
    assert ca.verdict(0.3, 4.4, 1.0, 500)[0] == "consistent"
    assert ca.verdict(0.3, 4.4, None, 500)[0] == "inconclusive"
    for args in ((0.5, 4.4, 10.0), (2.0, 4.4, 1.0), (0.3, 4.4, 1.0), (0.3, 4.4, None)):
        assert "pass" not in ca.verdict(*args, 500)[1].lower()
    # a claim beyond what m canaries can show is inconclusive even with perfect scores
    bits = ca.draw_inclusion(500)
    a = ca.audit(np.where(bits, 0.0, 1.0), bits, 10.0, 1e-5)
    assert a["verdict"] == "inconclusive" and a["eps_max_all"] < 10
    assert a["eps_lb"] <= a["eps_max"] <= a["eps_max_all"]


# ------------------------------------------------------------------ canaries
def test_inclusion_is_bernoulli_half_from_os_entropy(monkeypatch):
    b = ca.draw_inclusion(20_000)
    assert b.dtype == bool and abs(b.mean() - 0.5) < 0.02
    # not reproducible from any seed the run logs
    np.random.seed(0)
    torch.manual_seed(0)
    b1 = ca.draw_inclusion(256)
    np.random.seed(0)
    torch.manual_seed(0)
    assert not np.array_equal(b1, ca.draw_inclusion(256))
    # ... because it comes from `secrets` (OS entropy)
    monkeypatch.setattr(ca.secrets, "randbits", lambda k: 12345)
    assert np.array_equal(ca.draw_inclusion(256), ca.draw_inclusion(256))


def test_canaries_are_public_images_with_uniform_labels(tmp_path):
    c = ca.make_canaries("fashion_mnist", 400, 10, 16, 1)
    assert c.images.shape == (400, 16, 16, 1) and c.images.dtype == np.uint8
    assert len(np.unique(c.source_index)) == 400 and set(np.unique(c.labels)) == set(range(10))
    x, y = c.members()
    assert len(x) == c.included.sum() == len(y)
    c.save(tmp_path / ca.CANARY_FILE)
    d = ca.CanarySet.load(tmp_path / ca.CANARY_FILE)
    assert np.array_equal(d.included, c.included) and np.array_equal(d.images, c.images)
    assert d.source == "fashion_mnist"
    with pytest.raises(DataError, match="canaries must be public data"):
        ca.check_canary_source("fashion_mnist", "fashion_mnist")
    ca.check_canary_source("fashion_mnist", "mnist")
    # the default picks a public source the sensitive data is not drawn from
    assert ca.check_canary_source("auto", "mnist") == "fashion_mnist"
    assert ca.check_canary_source("auto", "fashion_mnist") == "mnist"


@pytest.mark.parametrize("bad,match", [
    ({"canaries": 8}, r"evaluation.canaries must be in \[16"),
    ({"canary_source": "cifar10"}, "evaluation.canary_source must be auto or one of"),
    ({"canary_beta": 0.7}, r"evaluation.canary_beta must be in \(0, 0.5\]"),
    ({"canary_repeats": 0}, "evaluation.canary_repeats"),
    ({"canary_audit": "yes"}, "must be true or false"),
])
def test_bad_canary_config(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"evaluation": bad})


def test_sampling_rate_does_not_depend_on_the_included_canaries():
    """make_private(num_records=N + m): q and Opacus's expected batch size
    are the planned ones whatever number of canaries went in."""
    from privimage_core.dp_sgd.finetune import make_private
    from privimage_core.privacy.plan import sample_rate_for
    from privimage_core.privacy.ledger import PrivacyLedger

    out = []
    for rows in (100, 137):
        net = torch.nn.Linear(4, 2)
        dp = make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), torch.randn(rows, 4),
                          torch.zeros(rows, dtype=torch.long), batch_size=32,
                          noise_multiplier=1.0, max_grad_norm=1.0,
                          ledger=PrivacyLedger(10.0, 1e-5), num_records=164)
        out.append((dp.sample_rate, dp.optimizer.expected_batch_size, len(dp.loader.dataset)))
    assert out[0][:2] == out[1][:2] == (sample_rate_for(164, 32), int(164 * sample_rate_for(164, 32)))
    assert (out[0][2], out[1][2]) == (100, 137)


# ------------------------------------------------------------------ failing control
SIZE, N_SENS, M, STEPS, BATCH = 8, 32, 256, 1500, 64


def _control_data():
    from privimage_core.data.sources import load_source
    sens = load_source("mnist", split="train", image_size=SIZE)
    canaries = ca.make_canaries("fashion_mnist", M, 10, SIZE, 1)
    ci, cl = canaries.members()
    x = np.concatenate([sens.images[:N_SENS], ci])
    y = np.concatenate([sens.labels[:N_SENS], cl])
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return canaries, xt, torch.from_numpy(y).long()


def _tiny_model():
    from privimage_core.models import get_family
    fam = get_family("diffusion")
    return fam, fam.make("tiny", {"base_channels": 16}, SIZE, 1, 10)


def test_failing_control_broken_dp_sgd_is_caught():
    """A broken implementation: DP-SGD with the noise off and no clipping
    (plain Adam), many steps on a small set holding the included canaries
    (mislabelled, out-of-domain Fashion-MNIST images memorise fast). The
    audit must show a lower bound above a claimed epsilon of 1."""
    t0 = time.time()
    canaries, x, y = _control_data()
    fam, model = _tiny_model()
    trainer = fam.public_trainer(model, lr=5e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (BATCH,), generator=g)
        trainer.step(x[idx], y[idx], g)
    a = ca.run_canary_audit(ca.CanaryAuditInput(canaries, fam, model), 1.0, 1e-5, repeats=16)
    print(f"broken DP-SGD: eps_lb {a['eps_lb']:.3f} (max {a['eps_max']:.3f}, {a['correct']}/"
          f"{a['guesses']} correct) in {time.time() - t0:.0f}s")
    assert a["verdict"] == "violation" and a["eps_lb"] > 1.0
    assert a["message"].startswith("PRIVACY AUDIT FAILED")


@pytest.mark.slow
def test_control_with_real_noise_shows_no_violation():
    """The same model, data and canaries through the real Opacus path
    (privimage_core.dp_sgd.finetune) at a calibrated epsilon of 1: no violation."""
    from privimage_core.models.ema import EMA
    from privimage_core.dp_sgd.finetune import dp_finetune, make_private
    from privimage_core.privacy.plan import sample_rate_for
    from privimage_core.privacy.ledger import PrivacyLedger

    t0 = time.time()
    canaries, x, y = _control_data()
    fam, model = _tiny_model()
    ledger = PrivacyLedger(1.0, 1e-5)
    n_records = N_SENS + M
    steps = STEPS // 3
    sigma = ledger.calibrate_noise(sample_rate_for(n_records, BATCH), steps)
    dp = make_private(model, torch.optim.Adam(model.parameters(), lr=5e-3), x, y, BATCH, sigma,
                      1.0, ledger, num_records=n_records)
    assert dp_finetune(dp, EMA(model, decay=0.0), model, steps, BATCH,
                       objective=fam.dp_objective(model)) == steps
    assert ledger.epsilon() <= 1.0
    a = ca.run_canary_audit(ca.CanaryAuditInput(canaries, fam, model), ledger.epsilon(), 1e-5,
                            repeats=16)
    print(f"DP-SGD sigma {sigma:.2f}: eps_lb {a['eps_lb']:.3f} (max {a['eps_max']:.3f}) "
          f"in {time.time() - t0:.0f}s")
    assert a["verdict"] != "violation" and a["eps_lb"] <= ledger.epsilon()


def test_reference_calibration_and_scores_do_not_depend_on_bits():
    canaries = ca.make_canaries("fashion_mnist", 32, 10, SIZE, 1)
    fam, model = _tiny_model()
    ref = copy.deepcopy(model)
    s1 = ca.score_canaries(fam, model, canaries.images, canaries.labels, repeats=2)
    s2 = ca.score_canaries(fam, model, canaries.images, canaries.labels, repeats=2)
    assert np.array_equal(s1, s2)  # fixed seeds: scoring adds no randomness of its own
    cal = ca.score_canaries(fam, model, canaries.images, canaries.labels, repeats=2, reference=ref)
    assert np.allclose(cal, 0.0)  # the same model as reference: nothing left


# ------------------------------------------------------------------ the pipeline, on Ray
@pytest.mark.ray
@pytest.mark.slow
def test_pipeline_audit_run_keeps_bits_in_the_run_dir(ray_local, tmp_path):
    """An audit run end to end: the canaries and bits are in the run dir
    only; q is fixed from N + m; ledger.json says the dataset held canaries;
    the report and MLflow carry the bound and verdict, never the bits."""
    import json
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from privimage_core.privacy.plan import sample_rate_for
    from services.pipeline import run_pipeline
    from tests.helpers import tiny_config

    cfg = from_dict(tiny_config(tmp_path, **{"evaluation.canaries": 64}))
    s = run_pipeline(cfg, log=lambda _: None)
    run_dir = Path(s["run_dir"])
    c = ca.CanarySet.load(run_dir / ca.CANARY_FILE)
    assert len(c) == 64 and c.source == "fashion_mnist"
    state = json.loads((run_dir / "pipeline_state.json").read_text())
    assert state["dp_plans"]["finetune"]["sample_rate"] == sample_rate_for(1000 + 64, 50)
    g = json.loads((run_dir / "ledger.json").read_text())["guarantee"]
    assert g["audit"]["audit_run"] is True and "AN AUDIT RUN" in g["audit"]["note"]
    detail = json.loads((run_dir / "canary_audit.json").read_text())
    assert detail["verdict"] == "inconclusive" and detail["eps_max_all"] < s["epsilon"]
    assert s["audit_message"].startswith("inconclusive: at most") and s["audit_ok"] is None
    page = (run_dir / "evaluation_report.html").read_text()
    assert "Canary audit [non-private, operator only]" in page and "passed" not in page
    client = MlflowClient(s["mlflow_uri"])
    ev = next(r for r in client.search_runs(
        [client.get_run(s["mlflow_run_id"]).info.experiment_id],
        f"tags.mlflow.parentRunId = '{s['mlflow_run_id']}'") if r.data.tags.get("stage") == "evaluate")
    assert ev.data.tags["canary_audit_verdict"] == "inconclusive"
    keys = {k for k in ev.data.metrics if "canary" in k}
    assert keys == {f"nonprivate_audit.canary_{k}" for k in
                    ("eps_lb", "eps_max", "eps_max_all", "canaries", "beta", "audit_seconds")}
    # the bits appear nowhere but the operator's canary file
    bits_txt = json.dumps(c.included.astype(int).tolist())[1:-1].encode()
    bits_bin = np.packbits(c.included).tobytes()
    for p in Path(cfg.run.output_dir).rglob("*"):
        if p.is_file() and p.name != ca.CANARY_FILE and p.stat().st_size < 200_000_000:
            data = p.read_bytes()
            assert bits_txt not in data and bits_bin not in data, p
