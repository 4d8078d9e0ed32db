"""Memorisation checks (privimage_core/evaluation/memorisation.py): DCR and
the one-step reconstruction attack (Carlini et al. 2023).

Failing control: a tiny diffusion model trained WITHOUT DP on 64 MNIST
images (16x16 here; 28x28 in the slow test) is caught by the reconstruction
attack, and a 'generator' returning noisy copies of those images by DCR; the
same model trained with DP-SGD (Opacus, real noise) is caught by neither.
Null checks: fresh draws of the training distribution give a share near 0.5
and no verdict of memorisation, also when many synthetic images share one
nearest neighbour (where a binomial test would cry wolf). One thread.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from privimage_core.config import EvaluationConfig, from_dict
from privimage_core.data.imageset import ImageSet
from privimage_core.models.diffusion.edm import EDMPrecond, edm_loss, sample, sample_training_noise
from privimage_core.models.diffusion.unet import build_unet
from privimage_core.errors import ConfigError
from privimage_core.evaluation import memorisation as memo
from privimage_core.models import get_family
from tests.helpers import shapes

torch.set_num_threads(1)


def noisy_copies(ds: ImageSet, n: int, std: float = 8.0, seed: int = 5) -> ImageSet:
    """The memorising 'generator': training images plus a little pixel noise."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ds), n)
    x = np.clip(ds.images[idx].astype(np.float64) + rng.normal(0, std, (n, *ds.shape)), 0, 255)
    return ImageSet(x.astype(np.uint8), ds.labels[idx], ds.class_names, name="copies")


# ------------------------------------------------------------------ DCR units

def test_nearest_in_blocks_matches_brute_force():
    rng = np.random.default_rng(0)
    q, r = rng.random((37, 20)), rng.random((101, 20))
    d, i = memo.nearest(q, r, max_block_bytes=4 * 7 * 13)  # many row and column blocks
    ref = np.linalg.norm(q[:, None] - r[None], axis=2)
    assert np.array_equal(i, ref.argmin(1)) and np.allclose(d, ref.min(1), atol=1e-6)
    d0, _ = memo.nearest(r[:5], r)
    assert np.all(d0 == 0)  # an exact copy is at distance 0


def test_matched_references_and_heldout_part():
    a, b = shapes(80, seed=1), shapes(50, seed=2)
    mem, ho = memo.matched_references(a, b, 40, seed=0)
    assert len(mem) == len(ho) == 40 and np.array_equal(mem.labels, ho.labels)
    used = [np.arange(10), np.array([15, 20, 99])]
    idx = memo.heldout_indices(100, used, 200, seed=0)
    assert len(idx) == 87 and not set(idx) & {*range(10), 15, 20, 99}
    assert not np.array_equal(idx[:20], memo.heldout_indices(100, used, 20, seed=1))


def test_dcr_share_near_half_for_fresh_draws_and_one_for_copies():
    members, heldout = memo.matched_references(shapes(400, seed=11), shapes(400, seed=12), 300, 0)
    fresh = shapes(400, seed=13)  # the same distribution, neither set
    feats = lambda x: x.reshape(len(x), -1)[:, ::3].astype(np.float32)  # noqa: E731
    null = memo.distance_to_closest_record(fresh, members, heldout, features=feats,
                                           feature_images=300)
    for r in (null["pixel"], null["feature"]):
        assert abs(r["share"] - 0.5) < 0.07 and r["p_value"] > 0.05, r
        assert r["verdict"] == "no evidence" and r["min_detectable_share"] < 0.6, r
        assert 0.85 < r["median_ratio"] < 1.15
    copies = memo.distance_to_closest_record(noisy_copies(members, 400), members, heldout,
                                             features=feats, feature_images=300)
    for r in (copies["pixel"], copies["feature"]):
        assert r["share"] > 0.99 and r["p_value"] < 0.002 and r["binom_p_value"] < 1e-9, r
        assert r["verdict"] == "memorisation" and r["median_ratio"] < 0.5
    si, mi, _ = copies["pairs"]
    png = memo.pairs_grid_png(noisy_copies(members, 400), members, heldout, copies["pairs"])
    assert png[:4] == b"\x89PNG" and len(si) == len(mi) == 16


def test_unequal_sizes_weighted_share_is_half_under_null_and_sees_every_copy():
    """4x more training than held-out images: the raw share sits near 0.8
    without memorisation; the class-weighted share stays near 0.5. Copies of
    ANY training image count (no member sample to miss them)."""
    members, heldout = shapes(600, seed=14), shapes(150, seed=15)
    r = memo.distance_to_closest_record(shapes(400, seed=16), members, heldout)["pixel"]
    assert abs(r["share"] - 0.5) < 0.08 and r["p_value"] > 0.05 and r["verdict"] != "memorisation"
    assert abs(r["share_raw"] - r["share_raw_expected"]) < 0.08 and r["share_raw_expected"] > 0.75
    c = memo.distance_to_closest_record(noisy_copies(members, 400), members, heldout)["pixel"]
    assert c["share"] > 0.99 and c["verdict"] == "memorisation"


def test_a_hub_does_not_fool_the_permutation_test():
    """Blurry samples all nearest ONE reference: the share is 0 or 1 by the
    luck of which side that reference is on. The binomial test (independent
    images) is then wrong by many orders of magnitude; the permutation test
    is not, and the check says it cannot tell."""
    members, heldout = memo.matched_references(shapes(200, seed=21), shapes(200, seed=22), 100, 0)
    blob = members.images.astype(np.float64).mean(0, keepdims=True)
    syn = ImageSet(np.repeat(blob, 300, 0).round().astype(np.uint8), np.zeros(300, np.int64),
                   members.class_names)
    r = memo.distance_to_closest_record(syn, members, heldout)["pixel"]
    assert r["share"] in (0.0, 1.0) and r["p_value"] > 0.3
    assert r["verdict"] == "inconclusive" and r["min_detectable_share"] == 1.0
    if r["share"] == 1.0:
        assert r["binom_p_value"] < 1e-50


def test_reconstruction_not_applicable_without_denoiser_and_inconclusive_when_tiny():
    assert get_family("gan").denoiser(torch.nn.Identity()) is None
    members, heldout = shapes(10, seed=31), shapes(10, seed=32)
    r = memo.reconstruction_attack(None, members, heldout, reason="the gan family has none")
    assert r == {"verdict": "not applicable", "reason": "the gan family has none"}
    perfect = lambda x, n, s, y: x * 0 + torch.from_numpy(  # noqa: E731
        members.images[:len(x)]).permute(0, 3, 1, 2).float() / 127.5 - 1
    small = memo.reconstruction_attack(perfect, members.subset(np.arange(2)),
                                       heldout.subset(np.arange(2)), noise_levels=(1.0,))
    # perfect separation of 2 vs 2 cannot reach significance (p >= 1/6): inconclusive, not "no evidence"
    assert small["auc"] == 1.0 and small["verdict"] == "inconclusive"


# ------------------------------------------------------------------ failing control

N, STEPS, SIZE = 64, 300, 16


def _mnist(size: int):
    from privimage_core.data.sources import load_source, resize_images
    try:
        train, test = load_source("mnist", split="train"), load_source("mnist", split="test")
    except Exception as e:  # offline MNIST not installed (scripts/setup.sh installs it)
        pytest.skip(f"MNIST not available: {e}")
    rng = np.random.default_rng(0)
    tr = train.subset(np.sort(rng.choice(len(train), N, replace=False)))
    te = test.subset(np.sort(rng.choice(len(test), 2000, replace=False)))
    if size != 28:
        tr = ImageSet(resize_images(tr.images, size), tr.labels, tr.class_names, "train")
        te = ImageSet(resize_images(te.images, size), te.labels, te.class_names, "test")
    return memo.matched_references(tr, te, N, seed=0)


def _tiny(size: int) -> EDMPrecond:
    torch.manual_seed(0)
    return EDMPrecond(build_unet("tiny", image_size=size, channels=1, num_classes=10,
                                 base_channels=16))


def _train(members: ImageSet, size: int, steps: int, dp: bool):
    """Full-batch Adam (lr 5e-3) on the members: without DP, or through the
    pipeline's own Opacus DP-SGD path (clip 1, noise multiplier 8, q = 1)."""
    x, y = members.to_tensor(), torch.from_numpy(members.labels)
    m = _tiny(size)
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)
    if not dp:
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            sigma, noise = sample_training_noise(x, generator=g)
            loss = edm_loss(m, x, y, sigma, noise).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return m.eval(), None
    from privimage_core.models.ema import EMA
    from privimage_core.dp_sgd.finetune import dp_finetune, make_private
    from privimage_core.privacy.ledger import PrivacyLedger
    ledger = PrivacyLedger(100.0, 1e-3)
    run = make_private(m, opt, x, y, batch_size=len(x), noise_multiplier=8.0, max_grad_norm=1.0,
                       ledger=ledger)
    from privimage_core.models.diffusion.edm import EDMObjective
    assert dp_finetune(run, EMA(m, decay=0.0), m, steps, len(x), objective=EDMObjective()) == steps
    return m.eval(), ledger.epsilon()


def _samples(model, n_per_class: int, class_names) -> ImageSet:
    labels = np.repeat(np.arange(10), n_per_class)
    return ImageSet(sample(model, torch.as_tensor(labels), num_steps=10, seed=3,
                           batch_size=len(labels)), labels, class_names, name="samples")


def _control(size: int, steps: int) -> dict:
    members, heldout = _mnist(size)
    fam, out = get_family("diffusion"), {}
    for name, dp in (("non-DP", False), ("DP-SGD", True)):
        model, eps = _train(members, size, steps, dp)
        rec = memo.reconstruction_attack(fam.reconstructor(model), members, heldout)
        dcr = memo.distance_to_closest_record(_samples(model, 20, members.class_names),
                                              members, heldout)["pixel"]
        out[name] = {"recon": rec, "dcr": dcr, "eps": eps}
        print(f"{size}x{size} {name} (eps {eps}): reconstruction AUC {rec['auc']:.3f} at sigma "
              f"{rec['sigma']} p {rec['p_value']:.2g} ratio {rec['median_ratio']:.3f} -> "
              f"{rec['verdict']}; own samples DCR share {dcr['share']:.3f} p {dcr['p_value']:.2g} "
              f"binom p {dcr['binom_p_value']:.2g} -> {dcr['verdict']}")
    copies = memo.distance_to_closest_record(noisy_copies(members, 200), members,
                                             heldout)["pixel"]
    print(f"noisy copies: DCR share {copies['share']:.3f} p {copies['p_value']:.2g}")
    out["copies"] = copies
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus: secure RNG off, full backward hooks
def test_failing_control_non_dp_caught_dp_not():
    c = _control(SIZE, STEPS)
    assert c["DP-SGD"]["eps"] < 15
    assert c["non-DP"]["recon"]["verdict"] == "memorisation"
    assert c["non-DP"]["recon"]["auc"] > 0.7 and c["non-DP"]["recon"]["median_ratio"] < 0.85
    assert c["copies"]["verdict"] == "memorisation" and c["copies"]["share"] > 0.95
    for check in ("recon", "dcr"):
        assert c["DP-SGD"][check]["verdict"] != "memorisation", check
    assert c["DP-SGD"]["recon"]["auc"] < 0.65


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_failing_control_full_resolution_own_samples():
    """28x28, 600 steps (about 3 minutes on one thread): the non-DP model's
    OWN samples are caught by DCR as well, the DP model's are not."""
    c = _control(28, 600)
    assert c["non-DP"]["recon"]["verdict"] == "memorisation"
    assert c["non-DP"]["dcr"]["verdict"] == "memorisation"
    for check in ("recon", "dcr"):
        assert c["DP-SGD"][check]["verdict"] != "memorisation", check


# ------------------------------------------------------------------ suite, report, config

def _suite(show_pairs: bool, family="gan"):
    from privimage_core.evaluation.suite import run_evaluation
    cfg = EvaluationConfig(fid=False, classifiers=["lr"], classifier="lr", real_ceiling=False,
                           utility_matrix=False, detector=False, mia=False,
                           memorisation_images=100, memorisation_heldout=60,
                           memorisation_reconstruction_images=30,
                           memorisation_show_pairs=show_pairs)
    train, test = shapes(120, seed=51), shapes(200, seed=52)
    logs: list[str] = []
    res = run_evaluation(cfg, noisy_copies(train, 100), test, real_train=train,
                         family=family, release=torch.nn.Identity(), log=logs.append)
    return res, train, test, logs


def test_suite_report_and_mlflow_names():
    from privimage_core.evaluation.report import render_html
    from services.actors import Evaluator
    from services.stages.release import mlflow_key

    res, train, test, logs = _suite(show_pairs=False)
    m = res.metrics
    assert m["memorisation_dcr_pixel_share"] > 0.95 and m["memorisation_detected"] == 1.0
    assert m["memorisation_dcr_pixel_references_heldout"] == 60 and "memorisation_recon_auc" not in m
    assert m["memorisation_dcr_pixel_references_train"] == 120
    assert res.memorisation["verdicts"] == {"dcr_pixel": "memorisation",
                                            "reconstruction": "not applicable"}
    assert any("!!! DCR (pixel space)" in line for line in logs)
    assert any("gan family has no one-step denoiser" in x for x in res.memorisation["messages"])
    mem_keys = [k for k in m if k.startswith("memorisation")]
    assert all(mlflow_key(k).startswith("nonprivate_") for k in mem_keys)
    assert not set(mem_keys) & set(Evaluator.LIVE_METRICS)
    page = render_html(res, noisy_copies(train, 100))
    assert "NON-PRIVATE: reads the sensitive training set" in page and "Closest-pair grid not" in page
    assert "shows_training" not in page
    for im in train.images:  # no training image anywhere by default
        assert im.tobytes() not in page.encode()
    shown, _, _, _ = _suite(show_pairs=True)
    page2 = render_html(shown, noisy_copies(train, 100))
    assert "id=shows_training" in page2 and "SENSITIVE TRAINING IMAGES" in page2
    assert page2.count("data:image/png;base64,") == page.count("data:image/png;base64,") + 1


@pytest.mark.parametrize("bad,match", [
    ({"memorisation_images": 1}, "evaluation.memorisation_images must be >= 2"),
    ({"memorisation_feature_images": -1}, "evaluation.memorisation_feature_images must be >= 0"),
    ({"memorisation_noise_levels": []}, "evaluation.memorisation_noise_levels must be"),
    ({"memorisation_alpha": 0.5}, r"evaluation.memorisation_alpha must be in \(0, 0.5\)"),
    ({"memorisation_effect": 0}, "evaluation.memorisation_effect must be in"),
])
def test_bad_memorisation_config(bad, match):
    with pytest.raises(ConfigError, match=match) as e:
        from_dict({"evaluation": bad})
    assert "\n" not in str(e.value)


def test_checks_share_the_family_wise_level(monkeypatch):
    """Each of the three checks runs at alpha / 3 (Bonferroni), so a release
    that memorises nothing raises a false alarm in at most alpha of runs."""
    seen = []

    def fake_dcr(*a, alpha, **k):
        seen.append(("dcr", alpha))
        raise StopIteration  # only the level matters here

    def fake_rec(*a, alpha, **k):
        seen.append(("reconstruction", alpha))
        raise StopIteration

    monkeypatch.setattr(memo, "distance_to_closest_record", fake_dcr)
    ds = shapes(8, size=8)
    with pytest.raises(StopIteration):
        memo.run_memorisation(EvaluationConfig(memorisation_alpha=0.06), ds, ds, ds)
    assert seen == [("dcr", pytest.approx(0.02))]
    monkeypatch.setattr(memo, "distance_to_closest_record",
                        lambda *a, **k: {"pixel": {}, "pairs": ([], [], [])})
    monkeypatch.setattr(memo, "reconstruction_attack", fake_rec)
    with pytest.raises(StopIteration):
        memo.run_memorisation(EvaluationConfig(memorisation_alpha=0.06), ds, ds, ds)
    assert seen[-1] == ("reconstruction", pytest.approx(0.02))
