"""The canary audit has power: a model that leaks is flagged, at the rate
its own statistics promise. (Its validity, a bound near zero without
leakage and no violation for real DP-SGD, is in tests/test_canary_audit.py.)

Scores are simulated: a model that reveals each canary's bit through
randomised response with parameter eps_true (flip with probability
1 / (1 + e^eps_true)); eps_true = inf reveals every bit."""
from __future__ import annotations

import numpy as np
from scipy.special import expit
from scipy.stats import binom

from privimage_core.evaluation import canary_audit as ca

DELTA, BETA = 1e-5, 0.05


def _scores(bits: np.ndarray, eps_true: float, rng) -> np.ndarray:
    flip = rng.random(len(bits)) < (0.0 if np.isinf(eps_true) else 1 / (1 + np.exp(eps_true)))
    return np.where(bits ^ flip, 0.0, 1.0) + rng.normal(0, 1e-3, len(bits))


def _count_transfer_lb(scores, bits) -> float:
    """The audit as it was: the selection half's guess COUNTS applied to the
    evaluation half, whose number of members differs."""
    sel, ev = np.arange(0, len(scores), 2), np.arange(1, len(scores), 2)
    _, _, kp, kn = ca.choose_thresholds(scores[sel], bits[sel], BETA, DELTA)
    g = ca.guesses(scores[ev], kp, kn)
    r, v = int((g != 0).sum()), int((g == np.where(bits[ev], 1, -1)).sum())
    return ca.epsilon_lower_bound(len(ev), r, v, BETA, DELTA)


def test_a_model_revealing_every_canary_is_flagged_at_every_claim_it_can_show():
    rng = np.random.default_rng(7)
    broken = []
    for _ in range(40):
        bits = ca.draw_inclusion(500, rng)
        s = _scores(bits, np.inf, rng)
        a = ca.audit(s, bits, 3.0, DELTA, BETA)
        # every guess right: the bound is what these guesses can show at most
        assert a["correct"] == a["guesses"] > 0 and a["eps_lb"] == a["eps_max"]
        assert a["verdict"] == "violation", a["message"]
        for claim in (0.5, 1.0, 2.0, 3.0):
            assert ca.verdict(a["eps_lb"], a["eps_max"], claim, 500)[0] == "violation"
        broken.append(_count_transfer_lb(s, bits))
    # control: transferring counts instead of thresholds loses the violation
    # in some draws (the evaluation half's member count differs)
    assert min(broken) < 3.0, min(broken)


def test_a_partly_leaking_model_is_flagged_at_the_promised_rate():
    """eps_true 2 against a claim of 1 with 1,000 canaries: each draw's
    promised rejection probability, given the guesses it made, is the
    Binomial(r, expit(eps_true)) tail above the count that rejects the claim;
    the empirical rate of violations matches their mean."""
    rng = np.random.default_rng(11)
    eps_true, claim, m, draws = 2.0, 1.0, 1000, 40
    hits, promised = 0, []
    for _ in range(draws):
        bits = ca.draw_inclusion(m, rng)
        a = ca.audit(_scores(bits, eps_true, rng), bits, claim, DELTA, BETA)
        hits += a["verdict"] == "violation"
        r, n = a["guesses"], a["canaries_eval"]
        v_star = next((v for v in range(r + 1) if ca.p_value(n, r, v, claim, DELTA) <= BETA),
                      r + 1)
        promised.append(binom.sf(v_star - 1, r, expit(eps_true)))
    p = float(np.mean(promised))
    se = np.sqrt(p * (1 - p) / draws)
    print(f"violations {hits}/{draws}, promised {p:.3f}")
    assert p > 0.5 and abs(hits / draws - p) <= 3 * se + 0.05


def test_the_audit_tests_the_epsilon_of_the_stages_canaries_enter(monkeypatch):
    """Canaries enter DP-SGD, never the semantic (or size) query: the audit's
    claim is the DP-SGD stages' epsilon alone, below the run's."""
    from privimage_core.config import EvaluationConfig
    from privimage_core.evaluation import metric_groups
    from privimage_core.evaluation.suite import run_evaluation
    from privimage_core.data.imageset import ImageSet
    from privimage_core.privacy.ledger import PrivacyLedger

    led = PrivacyLedger(10.0, 1e-5)
    led.record_gaussian("semantic_distribution_query", 4.0)
    led.begin_dp_sgd("dp_sgd_finetune", 0.45, 0.0084).steps = 60
    assert 0 < led.epsilon_of("dp_sgd_") < led.epsilon()
    seen = {}
    monkeypatch.setattr(metric_groups, "run_canary_audit",
                        lambda canary, claimed, *a, **k: seen.setdefault("claim", claimed) and
                        {"eps_lb": 0.0, "eps_max": 1.0, "eps_max_all": 1.0, "canaries": 16,
                         "beta": 0.05, "verdict": "inconclusive", "message": "m"})
    cfg = EvaluationConfig(fid=False, classifiers=["lr"], classifier="lr", real_ceiling=False,
                           utility_matrix=False, detector=False, mia=False, memorisation=False)
    rng = np.random.default_rng(3)
    data = ImageSet(rng.integers(0, 255, (40, 16, 16, 1), dtype=np.uint8),
                    np.arange(40) % 2, ["a", "b"], "real")
    run_evaluation(cfg, data, data, ledger_epsilon=led.epsilon(),
                   audit_epsilon=led.epsilon_of("dp_sgd_"), canary=object())
    assert seen["claim"] == led.epsilon_of("dp_sgd_")
