"""The evaluation's metric groups, one function each, in the order
``suite.run_evaluation`` runs them: fidelity (FID, KID, precision/recall),
utility (downstream classifiers, the train-on-real ceiling, the utility
matrix), the detector attack, the membership diagnostic, the canary audit
and the memorisation checks. Each reads what it needs from the
``EvaluationContext`` and writes its metrics and notes into its result.
"""
from __future__ import annotations

import time

import numpy as np
from scipy.stats import binom

from privimage_core.data.imageset import ImageSet
from privimage_core.errors import DataError, MissingWeightsError
from privimage_core.evaluation import fid as fidlib
from privimage_core.evaluation import memorisation as memo
from privimage_core.evaluation.canary_audit import run_canary_audit
from privimage_core.evaluation.context import EvaluationContext, subset
from privimage_core.evaluation.diffusion_mia import membership_diagnostic
from privimage_core.evaluation.downstream import (accuracy, check_pair, score_matrix,
                                                  train_classifier)
from privimage_core.evaluation.kid import kernel_inception_distance
from privimage_core.evaluation.membership import detector_attack
from privimage_core.evaluation.precision_recall import precision_recall
from privimage_core.evaluation.protocol import comparability, meets_protocol


def fidelity(ctx: EvaluationContext) -> None:
    """FID and KID on one Inception pass per side; precision/recall reuse
    its features."""
    e, m, syn = ctx.ecfg, ctx.m, ctx.synthetic
    n = min(e.fid_images, len(syn), len(ctx.parts["fid"]))
    if n < max(2, e.pr_k + 1):
        ctx.skip("FID / precision-recall", f"needs more than {e.pr_k} images per side, have {n}")
        return
    rng = np.random.default_rng([ctx.seed, 11])
    syn_idx = np.sort(rng.choice(len(syn), n, replace=False))
    t0 = time.time()
    model = fidlib.load_fid_inception(e.fid_weights)
    cache = fidlib.FIDCache(ctx.fid_cache_dir)
    real_imgs = ctx.real_test.images[ctx.parts["fid"][:n]]
    # one progress count over both passes (the real one only when not cached)
    todo = n + (0 if cache.cached(real_imgs, model, device=ctx.device) else n)

    def ticker(offset: int):
        return None if ctx.progress is None else (lambda done: ctx.progress(offset + done, todo))

    f_real, _, _ = cache.features(real_imgs, model, backend=e.inception_backend,
                                  progress=ticker(0), device=ctx.device)
    f_syn = fidlib.extract_features(syn.images[syn_idx], model, backend=e.inception_backend,
                                    progress=ticker(todo - n), device=ctx.device)
    feat_s = time.time() - t0
    m["inception_features_seconds"] = feat_s
    m["fid_images"] = n
    t0 = time.time()
    m["fid"] = fidlib.frechet_distance_from_features(f_syn, f_real)
    m["fid_seconds"] = feat_s + time.time() - t0  # FID costs the feature pass too
    with ctx.timed("kid"):  # unbiased at any N: comparable where small-N FID is not
        m["kid"], m["kid_std"] = kernel_inception_distance(f_syn, f_real, seed=ctx.seed)
    ctx.log(f"[evaluate] fidelity: FID {m['fid']:.2f}, KID {m['kid']:.4f} ± {m['kid_std']:.4f} "
            f"on {n:,} synthetic against {n:,} real test images"
            + ("" if meets_protocol(m) else f" ({comparability(m)})"))
    if e.precision_recall:
        with ctx.timed("precision_recall"):  # reuses the FID features
            m["precision"], m["recall"] = precision_recall(f_real, f_syn, k=e.pr_k)


def utility(ctx: EvaluationContext) -> list[str]:
    """Classifiers trained on the synthetic set and tested on the real test
    split; the train-on-real ceiling (NON-PRIVATE: a subset of the sensitive
    training set) and the real/synthetic utility matrix. Returns the
    classifier kinds trained."""
    e, m, seed = ctx.ecfg, ctx.m, ctx.seed
    synthetic, real_test, real_train = ctx.synthetic, ctx.real_test, ctx.real_train
    kinds = list(dict.fromkeys(list(e.classifiers) + [e.classifier]))
    ctx.log(f"[evaluate] utility: {', '.join(kinds)} trained on {len(synthetic):,} synthetic "
            "images")
    matrix_on = e.utility_matrix and e.real_ceiling and real_train is not None
    syn_train, syn_test = synthetic, None
    if matrix_on:
        n_hold = min(e.utility_holdout, len(synthetic) // 5)
        if n_hold < 1:
            ctx.skip("utility matrix",
                     f"{len(synthetic)} synthetic images are too few for a hold-out")
            matrix_on = False
        else:
            perm = np.random.default_rng([seed, 13]).permutation(len(synthetic))
            syn_test = subset(synthetic, np.sort(perm[:n_hold]), "synthetic_holdout")
            syn_train = subset(synthetic, np.sort(perm[n_hold:]), "synthetic_train")
    elif e.utility_matrix:
        ctx.skip("utility matrix", "needs the real training set and evaluation.real_ceiling")
    check_pair(syn_train, real_test)

    def fit(kind: str, train: ImageSet):
        if kind == "cnn":
            return train_classifier("cnn", train, seed=seed, epochs=e.classifier_epochs,
                                    device=ctx.device)
        if len(train) > e.sklearn_max_images:
            idx = np.random.default_rng([seed, 17]).choice(len(train), e.sklearn_max_images,
                                                           replace=False)
            train = subset(train, np.sort(idx), train.name)
        it = e.lr_max_iter if kind == "lr" else e.mlp_max_iter
        return train_classifier(kind, train, seed=seed, max_iter=it)

    models: dict[str, object] = {}
    for kind in kinds:
        with ctx.timed(f"accuracy_{kind}"):
            models[f"synthetic/{kind}"] = clf = fit(kind, syn_train)
            m[f"accuracy_{kind}"] = accuracy(clf.predict_images(real_test), real_test.labels)
    ctx.res.failure = chance_failure(m[f"accuracy_{e.classifier}"], len(real_test),
                                     real_test.num_classes, e.classifier)
    if e.real_ceiling:
        if real_train is None:
            ctx.skip("train-on-real ceiling", "no real training set given")
        else:
            n = min(e.ceiling_images, len(real_train))
            idx = np.sort(np.random.default_rng([seed, 19]).choice(len(real_train), n,
                                                                   replace=False))
            ceil_train = subset(real_train, idx, "real_train_subset")
            m["ceiling_images"] = n
            for kind in kinds:
                # NON-PRIVATE: trained on (a subset of) the sensitive training set
                with ctx.timed(f"ceiling_accuracy_{kind}"):
                    models[f"real/{kind}"] = clf = fit(kind, ceil_train)
                    m[f"ceiling_accuracy_{kind}"] = accuracy(clf.predict_images(real_test),
                                                              real_test.labels)
            del ceil_train
    if matrix_on:
        k = e.classifier
        with ctx.timed("utility_matrix"):  # reuses the two classifiers trained above
            mat = score_matrix({t: models[f"{t}/{k}"] for t in ("real", "synthetic")},
                               real_test, syn_test)
            m.update({f"utility_{key.replace('->', '_to_')}": v for key, v in mat.items()})
            m["utility_holdout"] = len(syn_test)
    return kinds


# A release whose headline classifier cannot be told from guessing at this
# level on the real test split carries no class information: a failed run.
CHANCE_ALPHA = 1e-3


def chance_failure(acc: float, n_test: int, num_classes: int, kind: str) -> str | None:
    """The failure message when ``acc`` on ``n_test`` images is not above
    chance (1 / num_classes) at level CHANCE_ALPHA (one-sided binomial test),
    else None."""
    chance = 1.0 / num_classes
    p = float(binom.sf(round(acc * n_test) - 1, n_test, chance))
    if p <= CHANCE_ALPHA:
        return None
    return (f"a {kind.upper()} trained on the synthetic images scores {100 * acc:.1f}% on the "
            f"real test split, not above chance ({100 * chance:.1f}%, p = {p:.2g}): the release "
            "carries no class information. Check the selection warning and the samples; more "
            "DP-SGD steps, epsilon or data, or a public pool closer to the data may help")


def detector(ctx: EvaluationContext) -> None:
    """A classifier that tells real test images from synthetic ones (fidelity)."""
    e = ctx.ecfg
    n = min(len(ctx.parts["detector"]), len(ctx.synthetic))
    if n < 4:
        ctx.skip("detector attack", f"needs at least 4 real and 4 synthetic images, have {n}")
        return
    with ctx.timed("detector"):
        real_d = subset(ctx.real_test, ctx.parts["detector"][:n], "detector_real")
        max_iter = (e.lr_max_iter if e.detector_kind == "lr"
                    else e.mlp_max_iter if e.detector_kind == "mlp" else None)
        d = detector_attack(real_d, ctx.synthetic, seed=ctx.seed, kind=e.detector_kind,
                            epochs=1, min_steps=e.detector_min_steps, max_iter=max_iter,
                            device=ctx.device)
        ctx.m["detector_accuracy"] = d["accuracy"]
        ctx.m["detector_privacy_loss"] = d["privacy_loss"]
        ctx.m["detector_test_images"] = d["n_test"]


def membership(ctx: EvaluationContext) -> None:
    """The train-vs-test loss-threshold attack through the family's
    ``membership_loss``: a diagnostic, not the audit (members and
    non-members are not randomised and the threshold is searched on the same
    scores)."""
    e, m = ctx.ecfg, ctx.m
    loss_fn = (ctx.family.membership_loss(ctx.release)
               if ctx.family is not None and ctx.release is not None else None)
    if loss_fn is None:
        ctx.skip("membership-inference audit",
                 "no generator given (privimage evaluate --generator)" if ctx.release is None
                 else f"the {ctx.family.name} family has no per-example membership loss")
        return
    if ctx.real_train is None:
        ctx.skip("membership-inference audit", "no real training set (members) given")
        return
    n_mem = min(e.mia_members, len(ctx.real_train))
    non = ctx.parts["nonmembers"]
    if n_mem < 2 or len(non) < 2:
        ctx.skip("membership-inference audit",
                 f"needs >= 2 members and non-members, have {n_mem} and {len(non)}")
        return
    with ctx.timed("mia"):
        idx = np.sort(np.random.default_rng([ctx.seed, 23]).choice(len(ctx.real_train), n_mem,
                                                                   replace=False))
        members = subset(ctx.real_train, idx, "mia_members")
        nonmembers = subset(ctx.real_test, non, "mia_nonmembers")
        a = membership_diagnostic(loss_fn, members, nonmembers,
                                  noise_levels=e.mia_noise_levels, repeats=e.mia_repeats,
                                  delta=1e-5 if ctx.delta is None else ctx.delta,
                                  confidence=e.mia_confidence,
                                  ledger_epsilon=ctx.ledger_epsilon, seed=ctx.seed)
        del members, nonmembers
    for key in ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "eps_lb", "eps_point",
                "eps_lb_max", "score_gap"):
        m[f"mia_{key}"] = a[key]
    m["mia_members"], m["mia_nonmembers"] = a["num_members"], a["num_nonmembers"]
    ctx.res.roc = (a["fpr"], a["tpr"])
    ctx.log("[evaluate] membership (train-vs-test attack) " + a["audit_message"])
    if a["audit_ok"] is False:
        ctx.res.notes.append("diagnostic: " + a["audit_message"])


def canary_audit(ctx: EvaluationContext, canary) -> None:
    """The one-run canary audit (Steinke, Nasr & Jagielski 2023): the privacy
    check that can fail; it sets ``audit_ok`` / ``audit_message``."""
    if canary is None:
        ctx.skip("canary audit", "no canaries given (a run's audit_canaries.npz and its model)")
        return
    e = ctx.ecfg
    with ctx.timed("canary_audit"):
        a = run_canary_audit(canary, ctx.audit_epsilon, 1e-5 if ctx.delta is None else ctx.delta,
                             beta=e.canary_beta, repeats=e.canary_repeats)
    # only aggregates become metrics; counts stay in res.canary (operator only)
    ctx.m.update({f"canary_{k}": float(a[k]) for k in ("eps_lb", "eps_max", "eps_max_all",
                                                       "canaries", "beta")})
    res = ctx.res
    res.canary = a
    res.audit_message = a["message"]
    res.audit_ok = {"violation": False, "consistent": True}.get(a["verdict"])
    if res.audit_ok is not None:
        ctx.m["audit_ok"] = float(res.audit_ok)
    ctx.log(("[evaluate] !!! " if res.audit_ok is False else "[evaluate] canary audit: ")
            + a["message"])


def memorisation(ctx: EvaluationContext) -> None:
    """Distance to the closest record in pixel and Inception space and the
    one-step reconstruction attack (NON-PRIVATE: they read the training set)."""
    e = ctx.ecfg
    if ctx.real_train is None:
        ctx.skip("memorisation checks", "no real training set (members) given")
        return
    used = [v for k, v in ctx.parts.items() if k != "fid" or e.fid]  # parts in use
    ho_idx = memo.heldout_indices(len(ctx.real_test), used, e.memorisation_heldout, ctx.seed)
    fam, rel = ctx.family, ctx.release
    rec = fam.reconstructor(rel) if fam is not None and rel is not None else None
    why = ("no generator given" if rel is None else "no model family given" if fam is None
           else f"the {fam.name} family has no one-step denoiser; DCR covers it")
    feat = None
    if e.memorisation_feature_images and e.fid:
        try:
            inc = fidlib.load_fid_inception(e.fid_weights)
            feat = lambda x: fidlib.extract_features(  # noqa: E731
                x, inc, backend=e.inception_backend, device=ctx.device).astype(np.float32)
        except MissingWeightsError as err:  # pixel space only, and said so
            ctx.res.notes.append(f"memorisation DCR in Inception space skipped: {err}")
    try:
        with ctx.timed("memorisation"):
            mm, info = memo.run_memorisation(
                e, ctx.synthetic, ctx.real_train, subset(ctx.real_test, ho_idx, "heldout"),
                reconstruct=rec, no_reconstruction=why, seed=ctx.seed, feature_fn=feat)
    except DataError as err:
        ctx.skip("memorisation checks", str(err))
        return
    ctx.m.update(mm)
    ctx.res.memorisation = info
    for line in info["messages"]:
        ctx.log("[evaluate] " + ("!!! " + line + " !!!" if "MEMORISATION" in line else line))
