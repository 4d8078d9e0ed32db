"""The evaluation report says what the code does: the memorisation checks'
level as the code applies it, the detector among the fidelity figures,
counts as integers, accuracies as percentages, no note about a metric that
did not run; a release at chance level is called a failure."""
from __future__ import annotations

import re

import numpy as np

from privimage_core.config import EvaluationConfig
from privimage_core.data.imageset import ImageSet
from privimage_core.evaluation import memorisation as memo
from privimage_core.evaluation.context import EvaluationResult
from privimage_core.evaluation.report import memorisation_section, render_html


def _images(n: int, seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 255, (n, 8, 8, 1), dtype=np.uint8), np.arange(n) % 2,
                    ["a", "b"], f"set{seed}")


def test_the_stated_level_is_the_one_the_checks_use(monkeypatch):
    used = []

    def fake_dcr(*a, alpha, **k):
        used.append(alpha)
        return {}

    def fake_rec(*a, alpha, **k):
        used.append(alpha)
        return {"verdict": "not applicable", "reason": "test"}

    monkeypatch.setattr(memo, "distance_to_closest_record", fake_dcr)
    monkeypatch.setattr(memo, "reconstruction_attack", fake_rec)
    cfg = EvaluationConfig(memorisation_alpha=0.06)
    _, info = memo.run_memorisation(cfg, _images(20, 0), _images(20, 1), _images(20, 2))
    text = memorisation_section(EvaluationResult(memorisation=info))
    stated = float(re.search(r"tested at alpha / \d+ = ([0-9.]+)", text).group(1))
    assert used and all(abs(a - stated) < 1e-3 for a in used), (used, stated)
    assert "no correction" not in text
    # control: a section that claimed the uncorrected level would not match the code
    assert abs(0.06 - used[0]) > 1e-3


def test_fidelity_holds_the_detector_counts_are_integers_accuracies_percentages():
    m = {"accuracy_cnn": 0.9303, "ceiling_accuracy_cnn": 0.97, "ceiling_images": 60000.0,
         "detector_accuracy": 0.985, "detector_privacy_loss": 0.97, "ledger_epsilon": 9.989,
         "accuracy_lr_seconds": 1.0}
    page = render_html(EvaluationResult(metrics=m), _images(20, 3), {"epsilon": 9.989})
    fidelity = page.split("<h3>Fidelity")[1].split("<h3>")[0]
    assert "detector" in fidelity and "98.5%" in fidelity
    privacy = page.split("<h3>Privacy")[1].split("<h3>")[0] if "<h3>Privacy" in page else ""
    assert "detector" not in privacy
    assert "93.0%" in page and "60,000" in page and "6e+04" not in page
    # FID did not run: no note about its feature pass
    assert "FID includes" not in page


def test_a_release_at_chance_level_is_a_failure_and_one_above_it_is_not():
    from privimage_core.evaluation.metric_groups import chance_failure

    msg = chance_failure(0.104, 1000, 10, "lr")  # 104 of 1,000 right, 10 classes
    assert msg and "10.4%" in msg and "not above chance (10.0%" in msg
    assert chance_failure(0.15, 1000, 10, "lr") is None  # p about 1e-6
    # small test sets need a larger margin: 3 of 10 right is still chance
    assert chance_failure(0.3, 10, 10, "cnn") is not None
