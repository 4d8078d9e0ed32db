"""Privacy-audit utilities, independent of the generative model.

* ``roc_metrics``: AUC and TPR at low FPR of a membership score (higher =
  more likely a training member), the numbers Carlini et al. 2022 recommend.
* ``empirical_epsilon_lower_bound``: the statistical lower bound on epsilon
  an attack's FPR/FNR imply (Jagielski et al. 2020; Nasr et al. 2021). A DP
  guarantee of (eps, delta) forces FPR + e^eps * FNR >= 1 - delta and
  FNR + e^eps * FPR >= 1 - delta for every test, so high-confidence upper
  bounds on the rates give a high-confidence lower bound on eps. A lower
  bound far below the claimed eps is expected (weak attacks); one ABOVE it
  means the implementation or the accounting is broken.
* ``loss_threshold_scores``: scores = -mean per-example loss over fixed noise
  levels, for a loss callable the caller closes over its model (diffusion
  models: denoising loss at a few sigmas).
* ``detector_attack``: seed 002's attacker, a classifier telling real from
  generated images, with privacy loss = (accuracy - 0.5) / 0.5.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve

from privimage_core.data.imageset import ImageSet, writable_tensor
from privimage_core.errors import DataError
from privimage_core.evaluation.downstream import train_classifier


def _scores(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise DataError(f"{name} is empty; pass at least one score")
    if not np.all(np.isfinite(a)):
        raise DataError(f"{name} has NaN or infinite values; drop or clip them before auditing")
    return a


def roc_metrics(member_scores, nonmember_scores) -> dict:
    """ROC of the test 'member iff score >= t'.

    Returns auc, tpr_at_1pct_fpr, tpr_at_0_1pct_fpr (the largest TPR whose FPR
    is <= the target; with fewer than 1/target non-members only FPR = 0
    qualifies) and the fpr, tpr, thresholds arrays.
    """
    m = _scores(member_scores, "member_scores")
    n = _scores(nonmember_scores, "nonmember_scores")
    y = np.r_[np.ones(len(m)), np.zeros(len(n))]
    s = np.r_[m, n]
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)

    def tpr_at(target):
        ok = fpr <= target
        return float(tpr[ok].max()) if ok.any() else 0.0

    return {"auc": float(roc_auc_score(y, s)), "tpr_at_1pct_fpr": tpr_at(0.01),
            "tpr_at_0_1pct_fpr": tpr_at(0.001), "fpr": fpr, "tpr": tpr, "thresholds": thr}


def clopper_pearson_upper(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial rate k/n."""
    k = np.asarray(k, dtype=np.float64)
    ub = np.ones_like(k)
    lt = k < n
    ub[lt] = beta.ppf(1.0 - alpha, k[lt] + 1.0, n - k[lt])
    return ub


def _eps_from_rates(fpr, fnr, delta):
    """max(log((1-d-FPR)/FNR), log((1-d-FNR)/FPR)) per threshold; -inf where
    a numerator is <= 0 or a denominator is 0 (no finite bound there)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where((1 - delta - fpr > 0) & (fnr > 0), np.log((1 - delta - fpr) / fnr), -np.inf)
        b = np.where((1 - delta - fnr > 0) & (fpr > 0), np.log((1 - delta - fnr) / fpr), -np.inf)
    return np.maximum(a, b)


def empirical_epsilon_lower_bound(member_scores, nonmember_scores, delta: float,
                                  confidence: float = 0.95,
                                  thresholds: Sequence[float] | None = None) -> dict:
    """Lower bound on epsilon implied by the test 'member iff score >= t'.

    For each threshold t: FP = non-members with score >= t, FN = members with
    score < t; one-sided Clopper-Pearson upper bounds FPR_ub, FNR_ub at
    alpha/2 each (alpha = 1 - confidence; union bound, so both hold jointly
    with probability >= confidence); eps_t = max(log((1-delta-FPR_ub)/FNR_ub),
    log((1-delta-FNR_ub)/FPR_ub)). Returns eps_lb = max(0, max_t eps_t), the
    threshold reaching it, the rates there, and eps_point, the same formula on
    the raw rates (no confidence; thresholds where a raw rate is 0 are
    skipped because that bound is infinite).

    Caveat, multiple thresholds: the confidence holds for ONE threshold fixed
    in advance. Maximising over all thresholds on the same scores is a search,
    which makes the reported bound somewhat optimistic. For a rigorous audit
    choose the threshold on held-out scores and pass it in ``thresholds``.
    """
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    m = np.sort(_scores(member_scores, "member_scores"))
    u = np.sort(_scores(nonmember_scores, "nonmember_scores"))
    n1, n0 = len(m), len(u)
    if thresholds is None:
        # every distinct score, plus +inf (never predict member)
        t = np.r_[np.unique(np.r_[m, u]), np.inf]
    else:
        t = np.asarray(thresholds, dtype=np.float64).ravel()
    fp = n0 - np.searchsorted(u, t, side="left")  # non-members with score >= t
    fn = np.searchsorted(m, t, side="left")       # members with score < t
    alpha = (1.0 - confidence) / 2.0
    fpr_ub = clopper_pearson_upper(fp, n0, alpha)
    fnr_ub = clopper_pearson_upper(fn, n1, alpha)
    eps_t = _eps_from_rates(fpr_ub, fnr_ub, delta)
    i = int(np.argmax(eps_t))
    eps_pt = _eps_from_rates(fp / n0, fn / n1, delta)
    finite = eps_pt[np.isfinite(eps_pt)]
    return {"eps_lb": float(max(0.0, eps_t[i])),
            "eps_point": float(max(0.0, finite.max())) if finite.size else 0.0,
            "threshold": float(t[i]),
            "fpr": float(fp[i] / n0), "fnr": float(fn[i] / n1),
            "fpr_ub": float(fpr_ub[i]), "fnr_ub": float(fnr_ub[i]),
            "num_members": n1, "num_nonmembers": n0, "confidence": confidence, "delta": delta,
            "num_thresholds": int(len(t))}


def _images_labels(images, labels):
    if isinstance(images, ImageSet):
        x, y = images.images, images.labels if labels is None else labels
    else:
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[..., None]
        y = labels
    if x.ndim != 4 or x.dtype != np.uint8:
        raise DataError(f"images must be uint8 [N,H,W,C] or an ImageSet, got {x.dtype} {x.shape}; "
                        "convert them with np.asarray(x, np.uint8)")
    if y is None:
        raise DataError("loss_threshold_scores needs labels; pass labels= or an ImageSet")
    y = np.asarray(y, dtype=np.int64)
    if len(y) != len(x):
        raise DataError(f"{len(x)} images but {len(y)} labels; give one label per image")
    return x, y


@torch.no_grad()
def loss_threshold_scores(per_example_loss_fn: Callable, images, labels=None,
                          noise_levels: Sequence[float] = (0.05, 0.2, 0.5, 1.0),
                          repeats: int = 1, batch_size: int = 256, seed: int = 0) -> np.ndarray:
    """Membership scores = -(mean per-example loss over fixed noise levels).

    ``per_example_loss_fn(x, y, sigma, noise) -> Tensor [B]`` is supplied by
    the caller (e.g. a closure over the diffusion model computing the EDM
    denoising loss of x + sigma * noise); x is float [B,C,H,W] in [-1, 1]
    (the models' scale), y int64 [B], sigma a float, noise a standard normal
    tensor shaped like x. Noise is seeded per (seed, image index), so scores do
    not depend on batch_size, and members and non-members scored with the
    same seed see the same noise draws (common random numbers).
    Low loss = memorised = likely member, hence the minus sign.
    """
    x_all, y_all = _images_labels(images, labels)
    if not noise_levels or repeats < 1:
        raise ValueError("need at least one noise level and repeats >= 1")
    draws = len(noise_levels) * repeats
    out = np.empty(len(x_all), dtype=np.float64)
    for i in range(0, len(x_all), batch_size):
        x = writable_tensor(x_all[i:i + batch_size]).permute(0, 3, 1, 2).float()
        x = x / 127.5 - 1.0
        y = writable_tensor(y_all[i:i + batch_size])
        noise = torch.stack([_image_noise(seed, i + j, draws, x.shape[1:]) for j in range(len(x))], 1)
        total = torch.zeros(len(x), dtype=torch.float64)
        for d, sigma in enumerate(s for s in noise_levels for _ in range(repeats)):
            loss = torch.as_tensor(per_example_loss_fn(x, y, float(sigma), noise[d]))
            if loss.shape != (len(x),):
                raise ValueError(f"per_example_loss_fn must return one loss per example "
                                 f"(shape [{len(x)}]), got {tuple(loss.shape)}")
            total += loss.detach().double().cpu()
        out[i:i + len(x)] = -(total / draws).numpy()
    return out


def _image_noise(seed: int, index: int, draws: int, shape) -> torch.Tensor:
    """[draws, C, H, W] standard normal noise of the image at ``index``: a
    per-(seed, index) stream, so scores do not depend on batch_size and two
    sets scored with the same seed see the same noise at the same position."""
    s = int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)
    return torch.randn((draws, *shape), generator=torch.Generator().manual_seed(s))


def detector_attack(real: ImageSet, synthetic: ImageSet, seed: int = 0, kind: str = "cnn",
                    test_fraction: float = 0.5, **train_kw) -> dict:
    """Seed 002's attacker: train a classifier to tell real (1) from generated
    (0) images, report its accuracy on a held-out split and
    privacy_loss = (accuracy - 0.5) / 0.5 (0: indistinguishable, 1: always
    told apart; negative values are chance fluctuations).

    Both classes are subsampled to the same size so chance is exactly 0.5.
    ``kind``: 'cnn' (default, strongest), 'mlp' or 'lr' (see downstream).
    """
    if real.shape != synthetic.shape:
        raise DataError(f"real images are {real.shape} but synthetic are {synthetic.shape} (H,W,C); "
                        "resize one set to match")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    n = min(len(real), len(synthetic))
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n - n_test < 2:
        raise DataError(f"detector_attack needs at least 3 images per class, got {len(real)} real and "
                        f"{len(synthetic)} synthetic; pass more images")
    ri = rng.permutation(len(real))[:n]
    si = rng.permutation(len(synthetic))[:n]
    # the same number of each class in train and test keeps chance at 0.5 on both
    def part(idx_r, idx_s, name):
        x = np.concatenate([real.images[idx_r], synthetic.images[idx_s]])
        y = np.r_[np.ones(len(idx_r), np.int64), np.zeros(len(idx_s), np.int64)]
        p = rng.permutation(len(y))
        return ImageSet(x[p], y[p], ["synthetic", "real"], name=name)

    train = part(ri[n_test:], si[n_test:], "detector_train")
    test = part(ri[:n_test], si[:n_test], "detector_test")
    clf = train_classifier(kind, train, seed=seed, **train_kw)
    acc = float((clf.predict_images(test) == test.labels).mean())
    return {"accuracy": acc, "privacy_loss": (acc - 0.5) / 0.5, "n_train": len(train),
            "n_test": len(test), "kind": kind}
