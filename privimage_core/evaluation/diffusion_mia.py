"""Loss-threshold membership-inference diagnostic of a released generator
(the EDM denoising loss for the diffusion family).

Score of an image = -(mean EDM denoising loss over a few fixed noise levels),
computed with ``membership.loss_threshold_scores``: each image's noise draws
come from a per-(seed, index) stream, so member i and non-member i see the
same noise (common random numbers) and the two score sets differ only by
what the model learnt. The test "member iff score >= t" gives the ROC (AUC,
TPR at 1% and 0.1% FPR) and, through ``empirical_epsilon_lower_bound``, a
statistical lower bound on the epsilon any DP guarantee of the model can have.

Members must be images the model was trained on (for the pipeline: a random
subset of the sensitive training set, all of which DP fine-tuning reads);
non-members held-out images of the same distribution the model never saw
(the pipeline uses part of the real test split); a non-member identical to
a member (same uint8 pixels) is refused. Reading either is a
non-private evaluation: its numbers describe the release, nothing is
trained on them and no image leaves this function.

The audit check: a correct (eps, delta)-DP implementation can never let the
lower bound exceed eps (except with probability 1 - confidence, and up to the
optimism of searching over thresholds, see ``empirical_epsilon_lower_bound``).
``eps_lb_max`` is the largest bound the attack could report with this many
members / non-members (perfect separation); a ledger epsilon above it cannot
be refuted by this audit, however much the model leaks.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from privimage_core.data.imageset import ImageSet
from privimage_core.models.diffusion.edm import denoising_loss_fn
from privimage_core.errors import DataError
from privimage_core.evaluation.membership import (empirical_epsilon_lower_bound,
                                                  loss_threshold_scores, roc_metrics)


def max_detectable_epsilon(num_members: int, num_nonmembers: int, delta: float,
                           confidence: float = 0.95) -> float:
    """The lower bound a perfect attack (members and non-members separated)
    would give with these sample sizes: the audit's ceiling."""
    return empirical_epsilon_lower_bound(np.ones(num_members), np.zeros(num_nonmembers), delta,
                                         confidence)["eps_lb"]


def audit_check(eps_lb: float, ledger_epsilon: float | None) -> dict:
    """{'audit_ok': bool | None, 'message': str}. ``audit_ok`` is False when the
    empirical lower bound exceeds the ledger's epsilon (the implementation or
    the accounting is broken), None when no ledger epsilon is known."""
    if ledger_epsilon is None or not np.isfinite(ledger_epsilon):
        return {"audit_ok": None,
                "message": f"empirical epsilon lower bound {eps_lb:.3f}; no ledger epsilon given, "
                           "nothing to check it against"}
    if eps_lb > ledger_epsilon:
        return {"audit_ok": False,
                "message": f"PRIVACY AUDIT FAILED: the empirical epsilon lower bound {eps_lb:.3f} "
                           f"EXCEEDS the ledger's epsilon {ledger_epsilon:.3f}; the DP "
                           "implementation or its accounting is broken: do not release this model "
                           "or its samples"}
    # Not "passed": with members from the train split and non-members from the
    # test split this bound is capped far below usual claims (eps_lb_max) and
    # its threshold is searched on the same scores; the canary audit
    # (canary_audit.py) is the check that can fail.
    return {"audit_ok": True,
            "message": f"not exceeded (diagnostic, not an audit): empirical epsilon lower bound "
                       f"{eps_lb:.3f} <= ledger epsilon {ledger_epsilon:.3f}"}


def _check_pair(members: ImageSet, nonmembers: ImageSet) -> None:
    if len(members) < 2 or len(nonmembers) < 2:
        raise DataError(f"the membership audit needs at least 2 members and 2 non-members, got "
                        f"{len(members)} and {len(nonmembers)}; pass more images")
    if members.shape != nonmembers.shape:
        raise DataError(f"members are {members.shape} but non-members are {nonmembers.shape} "
                        "(H,W,C); load both at the model's resolution")
    shared = image_digests(members) & image_digests(nonmembers)
    if shared:
        raise DataError(f"{len(shared)} non-member image(s) are identical to member images; "
                        "non-members must be held-out data the model never saw (a real test "
                        "split; for folder:/parquet: data a separate --real-test / "
                        "data.sensitive_test)")


def image_digests(ds: ImageSet) -> set[bytes]:
    """Content hashes of the uint8 images (shape-checked by the caller)."""
    return {hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).digest()
            for im in ds.images}


def diffusion_mia(precond: torch.nn.Module, members: ImageSet, nonmembers: ImageSet,
                  **kw) -> dict:
    """``membership_diagnostic`` with the EDM denoising loss of ``precond``
    (an EDMPrecond), in eval mode; its train/eval mode is restored afterwards."""
    was_training = precond.training
    precond.eval()
    try:
        return membership_diagnostic(denoising_loss_fn(precond), members, nonmembers, **kw)
    finally:
        precond.train(was_training)


def membership_diagnostic(loss_fn, members: ImageSet, nonmembers: ImageSet,
                          noise_levels: Sequence[float] = (0.1, 0.3, 1.0), repeats: int = 1,
                          delta: float = 1e-5, confidence: float = 0.95,
                          ledger_epsilon: float | None = None, seed: int = 0,
                          batch_size: int = 250) -> dict:
    """Loss-threshold attack with ``loss_fn(x, y, sigma, noise) -> [B]`` (a
    family's ``membership_loss``). Returns auc, tpr_at_1pct_fpr,
    tpr_at_0_1pct_fpr, eps_lb (one-sided ``confidence`` lower confidence
    bound), eps_point (the same on the raw rates), eps_lb_max (the bound a
    perfect attack would reach at these sample sizes), the ROC arrays fpr /
    tpr, audit_ok / audit_message (see ``audit_check``) and the sizes."""
    _check_pair(members, nonmembers)
    kw = dict(noise_levels=tuple(float(s) for s in noise_levels), repeats=repeats,
              batch_size=batch_size, seed=seed)
    s_m = loss_threshold_scores(loss_fn, members, **kw)
    s_n = loss_threshold_scores(loss_fn, nonmembers, **kw)
    roc = roc_metrics(s_m, s_n)
    lb = empirical_epsilon_lower_bound(s_m, s_n, delta=delta, confidence=confidence)
    out = {"auc": roc["auc"], "tpr_at_1pct_fpr": roc["tpr_at_1pct_fpr"],
           "tpr_at_0_1pct_fpr": roc["tpr_at_0_1pct_fpr"],
           "eps_lb": lb["eps_lb"], "eps_point": lb["eps_point"],
           "eps_lb_max": max_detectable_epsilon(len(members), len(nonmembers), delta, confidence),
           "confidence": confidence, "delta": delta,
           "num_members": len(members), "num_nonmembers": len(nonmembers),
           "ledger_epsilon": ledger_epsilon,
           "fpr": roc["fpr"], "tpr": roc["tpr"],
           # mean score gap (members - non-members), in loss units
           "score_gap": float(s_m.mean() - s_n.mean())}
    chk = audit_check(out["eps_lb"], ledger_epsilon)
    out["audit_ok"], out["audit_message"] = chk["audit_ok"], chk["message"]
    return out
