"""The evaluation suite, its report and the membership audit of a diffusion
model: a memorising (non-private) model is caught, the same training under
DP-SGD is not; a ledger epsilon below the empirical bound is flagged; the
report holds no real image and says the evaluation is non-private.

The FID network is replaced by a cheap stand-in where only the wiring is
under test (FID itself is checked in test_evaluation.py). One thread, tiny
models: each test runs in seconds to ~30 s on the shared 2-core machines.
"""
from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from privimage_core.config import EvaluationConfig, from_dict
from privimage_core.models.diffusion.edm import EDMObjective, edm_loss, sample_training_noise
from privimage_core.errors import ConfigError, DataError
from privimage_core.evaluation.diffusion_mia import (audit_check, denoising_loss_fn,
                                                     diffusion_mia, max_detectable_epsilon)
from privimage_core.evaluation.membership import (empirical_epsilon_lower_bound,
                                                  loss_threshold_scores, roc_metrics)
from privimage_core.evaluation.report import class_strips, render_html
from privimage_core.evaluation.suite import EvaluationResult, run_evaluation
from tests.helpers import noised, shapes, tiny_edm, use_fake_inception

torch.set_num_threads(1)


# ------------------------------------------------------------------ membership audit

N_MEM, STEPS = 32, 300


@pytest.fixture(scope="module")
def audit_data():
    members = shapes(N_MEM, size=16, seed=40)
    nonmembers = shapes(N_MEM, size=16, seed=41)  # same distribution, never trained on
    return members, nonmembers


@pytest.fixture(scope="module")
def memorising_model(audit_data):
    """Non-private: full-batch Adam on the 32 members, no clipping, no noise."""
    members, _ = audit_data
    m = tiny_edm()
    x, y = members.to_tensor(), torch.from_numpy(members.labels)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        sigma, noise = sample_training_noise(x, generator=g)
        loss = edm_loss(m, x, y, sigma, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus: secure RNG off, full backward hooks
def test_attack_catches_memorisation_but_not_dp(audit_data, memorising_model):
    """Same init, data, optimiser, learning rate, steps and full batch (Poisson
    rate q = 1), trained without DP (the fixture) and with DP-SGD through the
    pipeline's own Opacus path (clipping 1, noise multiplier 8: epsilon about 9
    at delta 1e-3, near the quickstart's target 10). The non-private model is
    clearly caught, the DP one is not. The same Opacus path with the noise and
    the clipping switched off (noise 1e-7, clipping 1e3) is caught as clearly
    as the fixture: the gap comes from DP, not from a difference in code."""
    from privimage_core.models.ema import EMA
    from privimage_core.dp_sgd.finetune import dp_finetune, make_private
    from privimage_core.privacy.ledger import PrivacyLedger

    members, nonmembers = audit_data
    dp_model = tiny_edm()
    ledger = PrivacyLedger(100.0, 1e-3)
    x, y = members.to_tensor(), torch.from_numpy(members.labels)
    opt = torch.optim.Adam(dp_model.parameters(), lr=3e-3)
    dp = make_private(dp_model, opt, x, y, batch_size=N_MEM, noise_multiplier=8.0,
                      max_grad_norm=1.0, ledger=ledger)
    assert dp.sample_rate == 1.0
    assert dp_finetune(dp, EMA(dp_model, decay=0.0), dp_model, STEPS, N_MEM,
                       objective=EDMObjective()) == STEPS
    eps = ledger.epsilon()

    off_model = tiny_edm()
    off = make_private(off_model, torch.optim.Adam(off_model.parameters(), lr=3e-3), x, y,
                       batch_size=N_MEM, noise_multiplier=1e-7, max_grad_norm=1e3,
                       ledger=PrivacyLedger(1e30, 1e-3))
    assert dp_finetune(off, EMA(off_model, decay=0.0), off_model, STEPS, N_MEM,
                       objective=EDMObjective()) == STEPS
    off_res = diffusion_mia(off_model.eval(), members, nonmembers)

    np_res = diffusion_mia(memorising_model, members, nonmembers, ledger_epsilon=eps)
    dp_res = diffusion_mia(dp_model.eval(), members, nonmembers, ledger_epsilon=eps)
    untrained = diffusion_mia(tiny_edm(), members, nonmembers)
    print("AUC non-private %.3f DP %.3f untrained %.3f; eps_lb %.3f / %.3f (max %.3f), ledger %.2f"
          % (np_res["auc"], dp_res["auc"], untrained["auc"], np_res["eps_lb"], dp_res["eps_lb"],
             np_res["eps_lb_max"], eps))
    assert 5 < eps < 15
    assert np_res["auc"] > 0.85 and np_res["eps_lb"] > 1.2
    # DP noise comes from OS entropy: chance-level AUC with 32 + 32 images has
    # a standard deviation of ~0.07, so 0.75 is > 3 sigma away
    assert dp_res["auc"] < 0.75 and dp_res["eps_lb"] < np_res["eps_lb"] - 1.0
    assert untrained["auc"] < 0.75 and untrained["eps_lb"] < 0.5
    print("same Opacus path, noise and clipping off: AUC %.3f eps_lb %.3f"
          % (off_res["auc"], off_res["eps_lb"]))
    assert off_res["auc"] > 0.85 and off_res["eps_lb"] > dp_res["eps_lb"] + 1.0
    assert dp_res["audit_ok"] is True and dp_res["eps_lb"] <= eps
    assert 0 <= np_res["tpr_at_0_1pct_fpr"] <= np_res["tpr_at_1pct_fpr"] <= 1
    assert np_res["eps_lb"] <= np_res["eps_point"] and np_res["eps_lb"] <= np_res["eps_lb_max"]


def test_scores_use_identical_noise_for_members_and_nonmembers(audit_data):
    """Common random numbers: scoring the same images as 'members' and as
    'non-members' gives identical scores, so AUC is exactly 0.5 and no bound.
    (diffusion_mia itself refuses such a pair: non-members must be held out.)"""
    members, _ = audit_data
    fn = denoising_loss_fn(tiny_edm().eval())
    kw = dict(noise_levels=(0.1, 0.3, 1.0), seed=0)
    s_m, s_n = loss_threshold_scores(fn, members, **kw), loss_threshold_scores(fn, members, **kw)
    assert np.array_equal(s_m, s_n)
    assert roc_metrics(s_m, s_n)["auc"] == 0.5
    assert empirical_epsilon_lower_bound(s_m, s_n, delta=1e-5)["eps_lb"] == 0.0
    with pytest.raises(DataError, match="non-members must be held-out data"):
        diffusion_mia(tiny_edm(), members, members)


def test_audit_flags_ledger_below_empirical_bound(audit_data, memorising_model):
    members, nonmembers = audit_data
    # a "ledger" claiming epsilon 0.2 for the memorising model: a violation
    r = diffusion_mia(memorising_model, members, nonmembers, ledger_epsilon=0.2)
    assert r["eps_lb"] > 0.2 and r["audit_ok"] is False
    assert r["audit_message"].startswith("PRIVACY AUDIT FAILED")
    # the report says so loudly
    res = EvaluationResult(metrics={"mia_eps_lb": r["eps_lb"], "ledger_epsilon": 0.2},
                           audit_ok=False, audit_message=r["audit_message"])
    page = render_html(res, members)
    assert re.search(r"<div class=fail id=audit>PRIVACY AUDIT FAILED", page)
    # the check itself, both ways, and without a ledger
    assert audit_check(1.5, 1.0)["audit_ok"] is False
    assert audit_check(1.0, 1.5)["audit_ok"] is True
    assert audit_check(1.0, None)["audit_ok"] is None
    # below the ledger: a diagnostic that cannot certify anything, never "passed"
    assert "passed" not in audit_check(1, 2)["message"]
    assert audit_check(1, 2)["message"].startswith("not exceeded (diagnostic, not an audit)")


def test_max_detectable_epsilon():
    # perfect separation with n = 1000 per side (test_evaluation's saturation value)
    assert max_detectable_epsilon(1000, 1000, 1e-5) == pytest.approx(
        np.log((1 - 1e-5) / (1 - 0.025 ** (1 / 1000))), rel=1e-3)
    assert max_detectable_epsilon(50, 50, 1e-5) < max_detectable_epsilon(500, 500, 1e-5)


# ------------------------------------------------------------------ suite + report

def _png_arrays(page: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))))
            for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)]


def _tiles(strip: np.ndarray, size: int, scale: int = 2) -> list[bytes]:
    """The size x size images in a class strip (undo the pixel repetition)."""
    if strip.ndim != 2 or strip.shape[0] != size * scale:
        return []
    s = strip[::scale, ::scale]
    return [s[:, j * size:(j + 1) * size].tobytes() for j in range(s.shape[1] // size)]


def test_strip_scanner_finds_images():
    """The scanner the report test relies on does find images that ARE shown."""
    ds = shapes(20, size=16, seed=50)
    found = {t for _, png in class_strips(ds, per_class=20) for t in
             _tiles(np.asarray(Image.open(io.BytesIO(png))), 16)}
    assert sum(im[..., 0].tobytes() in found for im in ds.images) == 20


@pytest.fixture(scope="module")
def small_cfg():
    return from_dict({"evaluation": {
        "fid_images": 40, "classifiers": ["lr", "cnn"], "classifier": "cnn",
        "classifier_epochs": 1, "ceiling_images": 100, "utility_holdout": 30,
        "detector_images": 60, "detector_min_steps": 30, "mia_members": 40,
        "mia_nonmembers": 40, "mia_noise_levels": [0.3, 1.0]}}).evaluation


@pytest.fixture(scope="module")
def evaluated(small_cfg, tmp_path_factory):
    """run_evaluation on 16x16 shapes with a fake Inception, an untrained generator."""
    real_test = shapes(200, size=16, seed=60)
    real_train = shapes(200, size=16, seed=61)
    synthetic = noised(shapes(150, size=16, seed=62), std=20)
    mp = pytest.MonkeyPatch()
    use_fake_inception(mp)
    logs: list[str] = []
    try:
        from privimage_core.evaluation.canary_audit import CanaryAuditInput, make_canaries
        from privimage_core.models import get_family
        gen = tiny_edm()
        canary = CanaryAuditInput(make_canaries("fashion_mnist", 64, 2, 16, 1),
                                  get_family("diffusion"), gen)
        res = run_evaluation(small_cfg, synthetic, real_test, seed=0, real_train=real_train,
                             family=get_family("diffusion"), release=gen, ledger_epsilon=3.0, delta=1e-5,
                             fid_cache_dir=str(tmp_path_factory.mktemp("fidcache")), log=logs.append,
                             canary=canary)
    finally:
        mp.undo()
    page = render_html(res, synthetic, {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"})
    return res, page, real_test, real_train, synthetic, logs


def test_suite_metrics_and_timings(evaluated):
    res, _, _, _, _, logs = evaluated
    m = res.metrics
    for k in ("fid", "precision", "recall", "accuracy_lr", "accuracy_cnn", "ceiling_accuracy_lr",
              "ceiling_accuracy_cnn", "utility_real_to_real", "utility_synthetic_to_real",
              "utility_real_to_synthetic", "utility_synthetic_to_synthetic", "utility_accuracy_loss",
              "detector_accuracy", "detector_privacy_loss", "mia_auc", "mia_tpr_at_1pct_fpr",
              "mia_tpr_at_0_1pct_fpr", "mia_eps_lb", "mia_eps_point", "mia_eps_lb_max",
              "canary_eps_lb", "canary_eps_max", "canary_eps_max_all", "ledger_epsilon"):
        assert k in m and np.isfinite(m[k]), k
    for k in ("fid", "precision_recall", "accuracy_lr", "accuracy_cnn", "ceiling_accuracy_cnn",
              "utility_matrix", "detector", "mia", "canary_audit"):
        assert m[f"{k}_seconds"] >= 0, k
    assert m["fid_images"] == 40 and m["mia_members"] == 40 and m["utility_holdout"] == 30
    assert m["detector_privacy_loss"] == pytest.approx(2 * m["detector_accuracy"] - 1)
    assert m["utility_accuracy_loss"] == pytest.approx(
        m["utility_real_to_real"] - m["utility_synthetic_to_real"])
    assert m["ceiling_accuracy_lr"] > 0.75  # the easy task, trained on real
    # the check is the canary audit; 64 canaries cannot show the claimed 3.0
    assert m["canary_eps_max_all"] < 3.0 and res.canary["verdict"] == "inconclusive"
    assert "audit_ok" not in m and res.audit_ok is None and not res.notes
    assert res.audit_message.startswith("inconclusive: at most")
    assert not any("passed" in line for line in logs)
    # only aggregates in the metrics (they go to MLflow); the counts stay in res.canary
    assert not any(k.startswith("canary_") and ("correct" in k or "guesses" in k) for k in m)


def test_report_has_banner_and_no_real_images(evaluated):
    res, page, real_test, real_train, synthetic, _ = evaluated
    assert 'id=nonprivate><b>NON-PRIVATE EVALUATION.</b>' in page
    assert "empirical lower bound" in page and "ledger epsilon" in page
    assert "canary audit lower bound" in page and "<div class=banner id=audit>" in page
    assert "passed" not in page
    assert page.count("data:image/png;base64,") == 2 + 2  # 2 class strips, 2 figures (ROC, eps/utility)
    shown = {t for arr in _png_arrays(page) for t in _tiles(arr, 16)}
    assert sum(im[..., 0].tobytes() in shown for im in synthetic.images) >= 2 * 10 * 0.9
    for ds in (real_test, real_train):
        for im in ds.images:
            assert im[..., 0].tobytes() not in shown
            assert im.tobytes() not in page.encode()


def test_suite_identical_and_shifted_sets(fake_fid_inception):
    """Wiring check with the stand-in features: the synthetic set equal to the
    FID reference gives FID ~0 and precision = recall = 1; a shifted set scores worse."""
    real = shapes(60, size=16, seed=70)
    cfg = EvaluationConfig(fid_images=60, classifiers=["lr"], classifier="lr", real_ceiling=False,
                           utility_matrix=False, detector=False, mia=False)
    same = run_evaluation(cfg, real, real).metrics
    assert abs(same["fid"]) < 1e-3 and same["precision"] == 1.0 and same["recall"] == 1.0
    shifted = run_evaluation(cfg, noised(real, std=60), real).metrics
    assert shifted["fid"] > 1.0 and shifted["precision"] < 0.9


@pytest.mark.parametrize("bad,match", [
    ({"classifiers": ["svm"]}, "evaluation.classifiers must be among"),
    ({"fid_images": 2}, "evaluation.fid_images must be"),
    ({"mia_members": 1}, "evaluation.mia_members must be >= 2"),
    ({"mia_noise_levels": []}, "evaluation.mia_noise_levels must be a non-empty list"),
    ({"mia_noise_levels": [0.1, -1]}, "evaluation.mia_noise_levels"),
    ({"mia_confidence": 1.0}, r"evaluation.mia_confidence must be in \(0, 1\)"),
    ({"detector_kind": "tree"}, "evaluation.detector_kind must be"),
    ({"ceiling_images": 0}, "evaluation.ceiling_images must be >= 1"),
])
def test_bad_evaluation_config(bad, match):
    with pytest.raises(ConfigError, match=match) as e:
        from_dict({"evaluation": bad})
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ actor and CLI, no Ray

def _tiny_run_cfg(tmp_path) -> dict:
    return {"run": {"output_dir": str(tmp_path / "runs"), "torch_threads": 1},
            "generator": {"preset": "tiny", "overrides": {"base_channels": 8}},
            "sampling": {"num_images": 60, "num_steps": 2, "batch_size": 60},
            "evaluation": {"fid_images": 20, "classifiers": ["lr"], "classifier": "lr",
                           "ceiling_images": 100, "utility_holdout": 10, "detector_images": 40,
                           "detector_kind": "lr", "mia_members": 30, "mia_nonmembers": 30}}


@pytest.fixture(scope="module")
def mnist_small():
    from privimage_core.data.sources import load_source
    try:
        test = load_source("mnist", split="test")
        train = load_source("mnist", split="train")
    except Exception as e:  # offline MNIST not installed (scripts/setup.sh installs it)
        pytest.skip(f"MNIST not available: {e}")
    return train.subset(np.arange(300)), test.subset(np.arange(400))


def test_evaluator_actor_class_and_cli(tmp_path, monkeypatch, mnist_small, fake_fid_inception):
    """services.actors.Evaluator (used without Ray) and privimage evaluate:
    same metrics, the report written, the sensitive images nowhere in it."""
    from privimage_core.models.release import ReleaseManifest, write_release
    from privimage_core.models.state import state_bytes
    from services.actors import Evaluator
    from services.evaluate_cli import evaluate_dataset

    train, test = mnist_small
    cfg = _tiny_run_cfg(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    c = from_dict(cfg)
    manifest = ReleaseManifest.for_run(c, "diffusion", train.class_names, "dp_generator.pt")
    gen = manifest.build()
    ev = Evaluator(c.to_dict(), str(run_dir))
    syn = ev.synthesize(state_bytes(gen.state_dict()), manifest.to_dict(),
                        {"epsilon": 4.0, "delta": 1e-5, "generator_preset": "tiny"})
    out = ev.evaluate((test.images, test.labels), train.class_names, (train.images, train.labels))
    page = out.pop("report_html")
    # no canaries given: no privacy verdict (the train-vs-test attack is a diagnostic)
    assert "audit_ok" not in out and out["ledger_epsilon"] == 4.0 and "mia_auc" in out
    assert any("canary audit skipped" in n for n in out["notes"])
    assert "accuracy_lr" in out and "ceiling_accuracy_lr" in out and "NON-PRIVATE" in page
    for im in train.images[::10]:
        assert im.tobytes() not in page.encode()
    # the CLI on the same synthetic set, with the generator: the same audit
    write_release(run_dir, gen.state_dict(), manifest)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    res = evaluate_dataset(syn["path"], "mnist", config=str(tmp_path / "cfg.json"),
                           generator=str(run_dir / "dp_generator.pt"), out_dir=str(tmp_path / "ev"))
    assert (tmp_path / "ev" / "evaluation_report.html").is_file()
    assert res["ledger_epsilon"] == 4.0 and "mia_auc" in res and "audit_ok" not in res
    assert json.loads((tmp_path / "ev" / "evaluation_metrics.json").read_text())["fid_images"] == 20
    # without --generator: no audit, and the report says it was skipped
    res2 = evaluate_dataset(syn["path"], "mnist", config=str(tmp_path / "cfg.json"),
                            out_dir=str(tmp_path / "ev2"))
    assert "mia_auc" not in res2 and any("membership" in n for n in res2["notes"])
    assert "Skipped" in (tmp_path / "ev2" / "evaluation_report.html").read_text()
