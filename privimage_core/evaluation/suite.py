"""The full evaluation of one synthetic release: fidelity, utility, privacy audit.

``run_evaluation`` is what the pipeline's evaluator actor and ``privimage
evaluate`` both call; ``report.render_html`` turns its result into the
one-page report. Every metric is timed (``<metric>_seconds``, wall clock).

Which real data is read, and why every number here is NON-PRIVATE (it
describes the release; nothing it computes is trained into the release):

* real TEST split: classifiers are tested on all of it; its first
  ``fid_images`` images are the FID / precision-recall reference (a fixed
  prefix, so its Inception features are cached by content hash across runs);
  of the rest, a seeded random part is the detector's real class and another,
  disjoint part the membership audit's NON-MEMBERS (the generator never saw
  the test split).
* real TRAIN split = the SENSITIVE data (optional): a random subset of
  ``ceiling_images`` trains the "train on real" ceiling classifiers, and a
  random subset of ``mia_members`` images are the audit's MEMBERS (the
  pipeline fine-tunes on the whole sensitive set, so every image is a member).
  Neither is ever returned or written: only the numbers.
* synthetic set: with the utility matrix on, a seeded hold-out of
  ``utility_holdout`` images is kept out of the synthetic-trained classifiers
  and serves as the synthetic TEST set (synthetic -> synthetic,
  real -> synthetic); LR and MLP train on at most ``sklearn_max_images``.

Memorisation checks (``memorisation_*``; evaluation/memorisation.py): members
= the SENSITIVE training set (all of it for DCR in pixel space, class-matched
samples otherwise); held-out = a seeded random part of the test split outside
every part above in use (disjoint, no selection). Only numbers and verdicts
come back, plus, with ``memorisation_show_pairs``, a grid that DOES show
training images.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from privimage_core.config import EvaluationConfig
from privimage_core.data.imageset import ImageSet
from privimage_core.errors import DataError

NON_PRIVATE_NOTE = ("Evaluation on real data is NON-PRIVATE: the metrics below read the real test "
                    "split and, for the 'train on real' ceiling and the membership audit, the "
                    "sensitive training set. They describe the release; they are not covered by "
                    "its (epsilon, delta) guarantee. No real image appears in this report.")


@dataclass
class EvaluationResult:
    metrics: dict[str, float] = field(default_factory=dict)
    # ROC of the membership audit (fpr, tpr), for the report's plot
    roc: tuple[np.ndarray, np.ndarray] | None = None
    # The privacy check's verdict (the canary audit, evaluation/canary_audit.py):
    # audit_ok False = violation, True = consistent, None = inconclusive / not run.
    audit_message: str | None = None
    audit_ok: bool | None = None
    # The canary audit's full result (operator only: the run dir, never MLflow).
    canary: dict | None = None
    notes: list[str] = field(default_factory=list)
    # what each metric read (for the report's table)
    config: dict = field(default_factory=dict)
    # memorisation checks: verdict messages, settings, optional pair grid (PNG)
    memorisation: dict = field(default_factory=dict)


def _subset(ds: ImageSet, idx, name: str) -> ImageSet:
    return ds.subset(np.asarray(idx, dtype=np.int64), name=name)


def split_real_test(n_test: int, n_fid: int, n_detector: int, n_nonmembers: int,
                    seed: int) -> dict[str, np.ndarray]:
    """Indices of the test split's parts: 'fid' = the first n_fid (fixed, for
    the feature cache); 'detector' and 'nonmembers' = disjoint seeded random
    parts of the rest (shrunk, non-members first, when the split is small)."""
    fid_idx = np.arange(min(n_fid, n_test))
    rest = np.random.default_rng([seed, 7]).permutation(np.arange(len(fid_idx), n_test))
    n_non = min(n_nonmembers, len(rest))
    non = np.sort(rest[:n_non])
    det = np.sort(rest[n_non:n_non + n_detector])
    return {"fid": fid_idx, "nonmembers": non, "detector": det}


def run_evaluation(ecfg: EvaluationConfig, synthetic: ImageSet, real_test: ImageSet, *,
                   seed: int = 0, real_train: ImageSet | None = None, generator=None,
                   ledger_epsilon: float | None = None, delta: float | None = None,
                   fid_cache_dir: str | None = None,
                   log: Callable[[str], None] = lambda s: None,
                   canary=None, family=None, release=None,
                   progress: Callable[[int, int], None] | None = None) -> EvaluationResult:
    """Every enabled metric of ``ecfg`` on ``synthetic`` against ``real_test``.

    ``real_train`` (sensitive; optional): the ceiling classifiers and the
    audit's members. ``generator`` (an EDMPrecond; optional): the membership
    audit. ``ledger_epsilon`` / ``delta``: the release's guarantee, for the
    audit check (delta also enters the lower bound; default 1e-5).
    ``progress(done, total)`` (optional) hears the FID Inception passes, the
    long part on a CPU (images of both sides; the real side only when its
    features are not cached).
    ``canary`` (a canary_audit.CanaryAuditInput; optional): the one-run
    canary audit, the privacy check that can fail; it sets ``audit_ok`` /
    ``audit_message``. The train-vs-test membership attack is a diagnostic.
    Metrics that cannot run (no generator, too few images) are skipped with a
    note, never silently. ``family`` (a ModelFamily or its name; default
    diffusion when a generator is given) and ``release`` (its released module;
    default ``generator``): the memorisation check's reconstruction attack.
    """
    if synthetic.shape != real_test.shape:
        raise DataError(f"synthetic images are {synthetic.shape} but the real test images are "
                        f"{real_test.shape} (H,W,C); load the real data at the synthetic resolution")
    if list(synthetic.class_names) != list(real_test.class_names):
        raise DataError(f"synthetic classes {synthetic.class_names[:5]}... differ from the real "
                        f"classes {real_test.class_names[:5]}...; evaluate against the matching dataset")
    res = EvaluationResult()
    m = res.metrics
    t_all = time.time()

    @contextmanager
    def timed(name: str):
        t0 = time.time()
        yield
        m[f"{name}_seconds"] = time.time() - t0
        log(f"[evaluate] {name}: {m[f'{name}_seconds']:.1f}s")

    def skip(what: str, why: str):
        res.notes.append(f"{what} skipped: {why}")
        log(f"[evaluate] {what} skipped: {why}")

    mia_on = ecfg.mia and generator is not None and real_train is not None
    parts = split_real_test(len(real_test), ecfg.fid_images,
                            ecfg.detector_images if ecfg.detector else 0,
                            ecfg.mia_nonmembers if mia_on else 0, seed)
    rng = np.random.default_rng([seed, 11])

    # ------------------------------------------------------------ fidelity
    if ecfg.fid:  # precision/recall ride on the FID features (no Inception pass of their own)
        from privimage_core.evaluation import fid as fidlib
        n = min(ecfg.fid_images, len(synthetic), len(parts["fid"]))
        if n < max(2, ecfg.pr_k + 1):
            skip("FID / precision-recall", f"needs more than {ecfg.pr_k} images per side, have {n}")
        else:
            syn_idx = np.sort(rng.choice(len(synthetic), n, replace=False))
            t0 = time.time()
            model = fidlib.load_fid_inception(ecfg.fid_weights)
            cache = fidlib.FIDCache(fid_cache_dir)
            real_imgs = real_test.images[parts["fid"][:n]]
            # one progress count over both passes (the real one only when not cached)
            todo = n + (0 if cache.cached(real_imgs, model) else n)

            def ticker(offset: int):
                return None if progress is None else (lambda done: progress(offset + done, todo))

            f_real, _, _ = cache.features(real_imgs, model, backend=ecfg.inception_backend,
                                          progress=ticker(0))
            f_syn = fidlib.extract_features(synthetic.images[syn_idx], model,
                                            backend=ecfg.inception_backend,
                                            progress=ticker(todo - n))
            feat_s = time.time() - t0
            m["inception_features_seconds"] = feat_s
            m["fid_images"] = n
            t0 = time.time()
            m["fid"] = fidlib.frechet_distance_from_features(f_syn, f_real)
            m["fid_seconds"] = feat_s + time.time() - t0  # FID costs the feature pass too
            from privimage_core.evaluation.kid import kernel_inception_distance
            with timed("kid"):  # unbiased at any N: comparable where small-N FID is not
                m["kid"], m["kid_std"] = kernel_inception_distance(f_syn, f_real, seed=seed)
            log(f"[evaluate] fid: {m['fid_seconds']:.1f}s ({feat_s:.1f}s Inception features, "
                f"{2 * n} images)")
            if ecfg.precision_recall:
                from privimage_core.evaluation.precision_recall import precision_recall
                with timed("precision_recall"):  # reuses the FID features
                    m["precision"], m["recall"] = precision_recall(f_real, f_syn, k=ecfg.pr_k)

    # ------------------------------------------------------------ utility
    from privimage_core.evaluation.downstream import (accuracy, check_pair, score_matrix,
                                                      train_classifier)

    kinds = list(dict.fromkeys(list(ecfg.classifiers) + [ecfg.classifier]))
    matrix_on = ecfg.utility_matrix and ecfg.real_ceiling and real_train is not None
    syn_train, syn_test = synthetic, None
    if matrix_on:
        n_hold = min(ecfg.utility_holdout, len(synthetic) // 5)
        if n_hold < 1:
            skip("utility matrix", f"{len(synthetic)} synthetic images are too few for a hold-out")
            matrix_on = False
        else:
            perm = np.random.default_rng([seed, 13]).permutation(len(synthetic))
            syn_test = _subset(synthetic, np.sort(perm[:n_hold]), "synthetic_holdout")
            syn_train = _subset(synthetic, np.sort(perm[n_hold:]), "synthetic_train")
    elif ecfg.utility_matrix:
        skip("utility matrix", "needs the real training set and evaluation.real_ceiling")
    check_pair(syn_train, real_test)

    def fit(kind: str, train: ImageSet):
        if kind == "cnn":
            return train_classifier("cnn", train, seed=seed, epochs=ecfg.classifier_epochs)
        if len(train) > ecfg.sklearn_max_images:
            idx = np.random.default_rng([seed, 17]).choice(len(train), ecfg.sklearn_max_images,
                                                           replace=False)
            train = _subset(train, np.sort(idx), train.name)
        it = ecfg.lr_max_iter if kind == "lr" else ecfg.mlp_max_iter
        return train_classifier(kind, train, seed=seed, max_iter=it)

    models: dict[str, object] = {}
    for kind in kinds:
        with timed(f"accuracy_{kind}"):
            models[f"synthetic/{kind}"] = clf = fit(kind, syn_train)
            m[f"accuracy_{kind}"] = accuracy(clf.predict_images(real_test), real_test.labels)
    if ecfg.real_ceiling:
        if real_train is None:
            skip("train-on-real ceiling", "no real training set given")
        else:
            n = min(ecfg.ceiling_images, len(real_train))
            idx = np.sort(np.random.default_rng([seed, 19]).choice(len(real_train), n, replace=False))
            ceil_train = _subset(real_train, idx, "real_train_subset")
            m["ceiling_images"] = n
            for kind in kinds:
                # NON-PRIVATE: trained on (a subset of) the sensitive training set
                with timed(f"ceiling_accuracy_{kind}"):
                    models[f"real/{kind}"] = clf = fit(kind, ceil_train)
                    m[f"ceiling_accuracy_{kind}"] = accuracy(clf.predict_images(real_test),
                                                              real_test.labels)
            del ceil_train
    if matrix_on:
        k = ecfg.classifier
        with timed("utility_matrix"):  # reuses the two classifiers trained above
            mat = score_matrix({t: models[f"{t}/{k}"] for t in ("real", "synthetic")},
                               real_test, syn_test)
            m.update({f"utility_{key.replace('->', '_to_')}": v for key, v in mat.items()})
            m["utility_holdout"] = len(syn_test)

    # ------------------------------------------------------------ privacy audit
    if ecfg.detector:
        from privimage_core.evaluation.membership import detector_attack
        n = min(len(parts["detector"]), len(synthetic))
        if n < 4:
            skip("detector attack", f"needs at least 4 real and 4 synthetic images, have {n}")
        else:
            with timed("detector"):
                real_d = _subset(real_test, parts["detector"][:n], "detector_real")
                d = detector_attack(real_d, synthetic, seed=seed, kind=ecfg.detector_kind,
                                    epochs=1, min_steps=ecfg.detector_min_steps,
                                    max_iter=ecfg.lr_max_iter if ecfg.detector_kind == "lr"
                                    else ecfg.mlp_max_iter if ecfg.detector_kind == "mlp" else None)
                m["detector_accuracy"] = d["accuracy"]
                m["detector_privacy_loss"] = d["privacy_loss"]
                m["detector_test_images"] = d["n_test"]

    if ecfg.mia:
        if generator is None:
            skip("membership-inference audit", "no generator given (privimage evaluate --generator)")
        elif real_train is None:
            skip("membership-inference audit", "no real training set (members) given")
        else:
            from privimage_core.evaluation.diffusion_mia import diffusion_mia
            n_mem = min(ecfg.mia_members, len(real_train))
            non = parts["nonmembers"]
            if n_mem < 2 or len(non) < 2:
                skip("membership-inference audit",
                     f"needs >= 2 members and non-members, have {n_mem} and {len(non)}")
            else:
                with timed("mia"):
                    idx = np.sort(np.random.default_rng([seed, 23]).choice(len(real_train), n_mem,
                                                                           replace=False))
                    members = _subset(real_train, idx, "mia_members")
                    nonmembers = _subset(real_test, non, "mia_nonmembers")
                    a = diffusion_mia(generator, members, nonmembers,
                                      noise_levels=ecfg.mia_noise_levels, repeats=ecfg.mia_repeats,
                                      delta=1e-5 if delta is None else delta,
                                      confidence=ecfg.mia_confidence,
                                      ledger_epsilon=ledger_epsilon, seed=seed)
                    del members, nonmembers
                for key in ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "eps_lb", "eps_point",
                            "eps_lb_max", "score_gap"):
                    m[f"mia_{key}"] = a[key]
                m["mia_members"], m["mia_nonmembers"] = a["num_members"], a["num_nonmembers"]
                res.roc = (a["fpr"], a["tpr"])
                # A diagnostic, not the audit: members and non-members are not
                # randomised and the threshold is maximised on the same scores.
                log("[evaluate] diagnostic (train-vs-test attack, not an audit): "
                    + a["audit_message"])
                if a["audit_ok"] is False:
                    res.notes.append("diagnostic: " + a["audit_message"])
    # ------------------------------------------------------------ canary audit (issue 13 W1)
    if ecfg.canary_audit:
        if canary is None:
            skip("canary audit", "no canaries given (a run's audit_canaries.npz and its model)")
        else:
            from privimage_core.evaluation.canary_audit import run_canary_audit
            with timed("canary_audit"):
                a = run_canary_audit(canary, ledger_epsilon, 1e-5 if delta is None else delta,
                                     beta=ecfg.canary_beta, repeats=ecfg.canary_repeats)
            # only aggregates become metrics; counts stay in res.canary (operator only)
            m.update({f"canary_{k}": float(a[k]) for k in ("eps_lb", "eps_max", "eps_max_all",
                                                           "canaries", "beta")})
            res.canary = a
            res.audit_message = a["message"]
            res.audit_ok = {"violation": False, "consistent": True}.get(a["verdict"])
            if res.audit_ok is not None:
                m["audit_ok"] = float(res.audit_ok)
            log(("[evaluate] !!! " if res.audit_ok is False else "[evaluate] canary audit: ")
                + a["message"])

    # ------------------------------------------------------------ memorisation (non-private)
    if ecfg.memorisation:
        if real_train is None:
            skip("memorisation checks", "no real training set (members) given")
        else:
            from privimage_core.evaluation import memorisation as memo
            used = [v for k, v in parts.items() if k != "fid" or ecfg.fid]  # parts in use
            ho_idx = memo.heldout_indices(len(real_test), used, ecfg.memorisation_heldout, seed)
            fam = family
            if isinstance(fam, str) or (fam is None and generator is not None):
                from privimage_core.models import get_family
                fam = get_family(fam or "diffusion")
            rel = release if release is not None else generator
            rec = fam.reconstructor(rel) if fam is not None and rel is not None else None
            why = ("no generator given" if rel is None else "no model family given" if fam is None
                   else f"the {fam.name} family has no one-step denoiser; DCR covers it")
            feat = None
            if ecfg.memorisation_feature_images and ecfg.fid:
                from privimage_core.errors import MissingWeightsError
                from privimage_core.evaluation import fid as fidlib
                try:
                    inc = fidlib.load_fid_inception(ecfg.fid_weights)
                    feat = lambda x: fidlib.extract_features(  # noqa: E731
                        x, inc, backend=ecfg.inception_backend).astype(np.float32)
                except MissingWeightsError as e:  # pixel space only, and said so
                    res.notes.append(f"memorisation DCR in Inception space skipped: {e}")
            try:
                with timed("memorisation"):
                    mm, info = memo.run_memorisation(
                        ecfg, synthetic, real_train, _subset(real_test, ho_idx, "heldout"),
                        reconstruct=rec, no_reconstruction=why, seed=seed,
                        feature_fn=feat)
            except DataError as e:
                skip("memorisation checks", str(e))
            else:
                m.update(mm)
                res.memorisation = info
                for line in info["messages"]:
                    log("[evaluate] " + ("!!! " + line + " !!!" if "MEMORISATION" in line
                                         else line))
    if ledger_epsilon is not None:
        m["ledger_epsilon"] = float(ledger_epsilon)
    if delta is not None:
        m["ledger_delta"] = float(delta)
    m["num_synthetic"] = len(synthetic)
    m["evaluation_seconds"] = time.time() - t_all
    res.config = {"seed": seed, "classifiers": kinds, **{k: getattr(ecfg, k) for k in (
        "fid_images", "pr_k", "ceiling_images", "sklearn_max_images", "lr_max_iter",
        "mlp_max_iter", "classifier_epochs", "detector_kind", "detector_images",
        "mia_members", "mia_nonmembers", "mia_noise_levels", "mia_repeats", "mia_confidence",
        "utility_holdout", "canaries", "canary_beta", "canary_source", "canary_repeats")}}
    return res
