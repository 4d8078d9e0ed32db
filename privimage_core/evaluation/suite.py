"""The full evaluation of one synthetic release: fidelity, utility, privacy audit.

``run_evaluation`` is what the pipeline's evaluator actor and ``privimage
evaluate`` both call; ``report.render_html`` turns its result into the
one-page report. Every metric is timed (``<metric>_seconds``, wall clock).
What each metric reads, and why all of it is non-private, is in
``evaluation/context.py``; the metric groups are in ``metric_groups.py``.
"""
from __future__ import annotations

import time
from typing import Callable

from privimage_core.config.evaluation import EvaluationConfig
from privimage_core.data.imageset import ImageSet
from privimage_core.errors import DataError
from privimage_core.evaluation import metric_groups
from privimage_core.evaluation.context import (NON_PRIVATE_NOTE, EvaluationContext,
                                               EvaluationResult, split_real_test)
from privimage_core.models import get_family

__all__ = ["NON_PRIVATE_NOTE", "EvaluationResult", "run_evaluation", "split_real_test"]

# The settings the report's table says each metric read.
_REPORTED_SETTINGS = (
    "fid_images", "pr_k", "ceiling_images", "sklearn_max_images", "lr_max_iter", "mlp_max_iter",
    "classifier_epochs", "detector_kind", "detector_images", "mia_members", "mia_nonmembers",
    "mia_noise_levels", "mia_repeats", "mia_confidence", "utility_holdout", "canaries",
    "canary_beta", "canary_source", "canary_repeats")


def run_evaluation(ecfg: EvaluationConfig, synthetic: ImageSet, real_test: ImageSet, *,
                   seed: int = 0, real_train: ImageSet | None = None,
                   ledger_epsilon: float | None = None, delta: float | None = None,
                   audit_epsilon: float | None = None,
                   fid_cache_dir: str | None = None,
                   log: Callable[[str], None] = lambda s: None,
                   canary=None, family=None, release=None,
                   progress: Callable[[int, int], None] | None = None,
                   device: str = "cpu") -> EvaluationResult:
    """Every enabled metric of ``ecfg`` on ``synthetic`` against ``real_test``.

    ``real_train`` (sensitive; optional): the ceiling classifiers, the
    membership diagnostic's members and the memorisation checks.
    ``family`` (a ModelFamily or its registered name) and ``release`` (its
    released module): the membership diagnostic (the family's
    ``membership_loss``) and the memorisation check's reconstruction attack.
    ``ledger_epsilon`` / ``delta``: the release's guarantee, for the audits
    (delta also enters the lower bounds; default 1e-5). ``audit_epsilon``:
    the claim the canary audit tests, the epsilon of the mechanisms the
    canaries entered (DP-SGD only; default ``ledger_epsilon``). ``progress(done,
    total)`` (optional) hears the FID Inception passes, the long part on a
    CPU (images of both sides; the real side only when its features are not
    cached). ``canary`` (a canary_audit.CanaryAuditInput; optional): the
    one-run canary audit, the privacy check that can fail; it sets
    ``audit_ok`` / ``audit_message``. Metrics that cannot run (no generator,
    too few images) are skipped with a note, never silently. ``device``: where
    the Inception passes and the CNN classifiers run ("cpu", "cuda"); the
    scikit-learn classifiers and the audits of ``release`` run where they are.
    """
    if synthetic.shape != real_test.shape:
        raise DataError(f"synthetic images are {synthetic.shape} but the real test images are "
                        f"{real_test.shape} (H,W,C); load the real data at the synthetic resolution")
    if list(synthetic.class_names) != list(real_test.class_names):
        raise DataError(f"synthetic classes {synthetic.class_names[:5]}... differ from the real "
                        f"classes {real_test.class_names[:5]}...; evaluate against the matching dataset")
    t_all = time.time()
    if isinstance(family, str):
        family = get_family(family)
    mia_on = (ecfg.mia and real_train is not None and family is not None
              and release is not None and family.membership_loss(release) is not None)
    parts = split_real_test(len(real_test), ecfg.fid_images,
                            ecfg.detector_images if ecfg.detector else 0,
                            ecfg.mia_nonmembers if mia_on else 0, seed)
    ctx = EvaluationContext(ecfg, synthetic, real_test, seed, parts, real_train=real_train,
                            family=family, release=release, ledger_epsilon=ledger_epsilon,
                            audit_epsilon=ledger_epsilon if audit_epsilon is None
                            else audit_epsilon,
                            delta=delta, fid_cache_dir=fid_cache_dir, log=log, progress=progress,
                            device=str(device))
    # One line as each group starts: the long ones run for minutes on a CPU
    # (the Inception pass draws its own progress line).
    if ecfg.fid:
        metric_groups.fidelity(ctx)
    kinds = metric_groups.utility(ctx)
    if ctx.res.failure:
        log("[evaluate] !!! RUN FAILED: " + ctx.res.failure)
    groups = ((ecfg.detector, "detector: real vs synthetic",
               lambda: metric_groups.detector(ctx)),
              (ecfg.mia, "membership attack on the DP generator (diagnostic)",
               lambda: metric_groups.membership(ctx)),
              (ecfg.canary_audit, "canary audit", lambda: metric_groups.canary_audit(ctx, canary)),
              (ecfg.memorisation, "memorisation checks", lambda: metric_groups.memorisation(ctx)))
    for on, what, run in groups:
        if on:
            log(f"[evaluate] {what}")
            run()
    m, res = ctx.m, ctx.res
    if ledger_epsilon is not None:
        m["ledger_epsilon"] = float(ledger_epsilon)
    if delta is not None:
        m["ledger_delta"] = float(delta)
    m["num_synthetic"] = len(synthetic)
    m["evaluation_seconds"] = time.time() - t_all
    res.config = {"seed": seed, "classifiers": kinds,
                  **{k: getattr(ecfg, k) for k in _REPORTED_SETTINGS}}
    return res
