"""Memorisation checks of a synthetic release (NON-PRIVATE, operator only).

Both checks read the SENSITIVE training set (the members) beside held-out
real images the generator never saw (a random part of the real test split).
Their numbers describe the release; they are not covered by its DP guarantee,
and they are logged as non-private (``nonprivate_train.memorisation_*``).

* Distance to closest record (DCR; Yale et al. 2019, Chen et al. 2020's
  GAN-Leaks distance; the "DCR share" of Platzer & Reutterer 2021): for each
  synthetic image, its distance to the nearest training image and to the
  nearest held-out image, in pixel space (against EVERY training image: a
  sample of members would miss copies of the others, and diluted a copying
  generator to chance) and in FID-Inception pool3 space (on a sample). If the
  generator treats training and held-out images alike, the nearest record's
  side is a fair coin once the two are weighted to equal size per class, so
  the weighted share of synthetic images nearer a training image is 1/2; a
  share well above 1/2 means the release sits on its training records. The
  null is drawn by permuting the training / held-out labels of the records
  within each class: exact for that hypothesis and valid when many synthetic
  images share one nearest record ("hubs", common for blurry samples), where
  the binomial test (independent images; reported beside it) is far too
  confident.
* Reconstruction attack (Carlini et al., USENIX Security 2023, "Extracting
  training data from diffusion models", Sec. 5-6: members are denoised far
  better than held-out images): each target is noised, x + sigma * eps, and
  denoised in ONE step by the family's x0 prediction (``ModelFamily.reconstructor``;
  a latent model noises and denoises the target's latent, then decodes);
  members and held-out images of the same class get the same eps (common
  random numbers). A one-sided Mann-Whitney U test per noise level
  (Bonferroni over the levels) asks whether members are reconstructed better.
  Families without a denoiser (the GAN) get "not applicable"; DCR covers them.

A run makes up to three such tests (DCR in pixel and in feature space, the
reconstruction attack), so each runs at ``alpha / 3`` (Bonferroni): the
chance that a release which does not memorise gets a "memorisation" alarm
from any of them is at most ``alpha``, not about three times it.

Verdicts: "memorisation" = significant at its level AND an effect of at least
``effect`` (share or AUC >= 0.5 + effect: a tiny shift between the train and
test splits becomes significant with enough images, and is not memorisation);
"no evidence" = not significant and the check had >= 80% power against that
effect; "inconclusive" = not significant with too few images to have seen it.
"""
from __future__ import annotations

import io
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from scipy.stats import binomtest, mannwhitneyu, norm

from privimage_core.data.imageset import ImageSet
from privimage_core.errors import DataError
from privimage_core.evaluation.membership import loss_threshold_scores

VERDICT_CODES = {"memorisation": 1.0, "no evidence": 0.0, "inconclusive": -1.0}
PERMUTATIONS = 1999
CHECKS = 3  # DCR pixel, DCR feature, reconstruction: the Bonferroni divisor
_Z_POWER = 0.8416  # standard normal quantile of 0.8: the power "no evidence" needs


def _verdict(p: float, effect_size: float, min_detectable: float, alpha: float,
             effect: float) -> str:
    if p < alpha and effect_size >= 0.5 + effect:
        return "memorisation"
    return "inconclusive" if min_detectable > 0.5 + effect else "no evidence"


def heldout_indices(n_test: int, used: Sequence[np.ndarray], n: int, seed: int) -> np.ndarray:
    """A seeded random part of the test split outside every part already
    ``used`` (FID prefix, detector, audit non-members): disjoint from them,
    and random, so no selection on the test split."""
    taken = np.zeros(n_test, bool)
    for u in used:
        taken[np.asarray(u, dtype=np.int64)] = True
    free = np.random.default_rng([seed, 31]).permutation(np.nonzero(~taken)[0])
    return np.sort(free[:n])


def matched_references(members: ImageSet, heldout: ImageSet, n: int,
                       seed: int) -> tuple[ImageSet, ImageSet]:
    """Up to ``n`` member / held-out pairs of the same class, in a random pair
    order: every prefix has the same classes on both sides (equal-size,
    class-matched references make the null share exactly 1/2)."""
    if members.shape != heldout.shape:
        raise DataError(f"members are {members.shape} but held-out images are {heldout.shape}")
    rng = np.random.default_rng([seed, 37])
    mi, hi = [], []
    for c in np.union1d(members.labels, heldout.labels):
        a = rng.permutation(np.nonzero(members.labels == c)[0])
        b = rng.permutation(np.nonzero(heldout.labels == c)[0])
        k = min(len(a), len(b))
        mi.append(a[:k])
        hi.append(b[:k])
    mi, hi = np.concatenate(mi), np.concatenate(hi)
    order = rng.permutation(len(mi))[:n]
    return (members.subset(mi[order], "memorisation_members"),
            heldout.subset(hi[order], "memorisation_heldout"))


def nearest(queries, refs, scale: float = 1.0,
            max_block_bytes: int = 64 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each query's nearest reference (L2 of the rows
    times ``scale``). References are converted to float block by block and
    torch.cdist runs on query x reference blocks of <= ``max_block_bytes``, so
    uint8 references of any size stay uint8 (10k x 60k MNIST: ~30 s, ~100 MB
    extra). The search uses the fast matrix-product form; the winner's
    distance is recomputed directly (an exact copy is at 0, not rounding noise)."""
    q = torch.as_tensor(np.asarray(queries).reshape(len(queries), -1)).float() * scale
    r = np.asarray(refs).reshape(len(refs), -1)
    if q.shape[1] != r.shape[1] or len(r) == 0:
        raise DataError(f"need [N, D] queries and [M>0, D] references, got {tuple(q.shape)} and "
                        f"{r.shape}")
    cols = max(1, min(len(r), max_block_bytes // (4 * max(256, q.shape[1]))))
    rows = max(1, max_block_bytes // (4 * cols))
    best = torch.full((len(q),), float("inf"))
    idx = torch.zeros(len(q), dtype=torch.long)
    for j in range(0, len(r), cols):
        # a copy: references may be read-only (Ray's object store), which torch warns about
        rb = torch.from_numpy(np.array(r[j:j + cols], dtype=np.float32)) * scale
        for i in range(0, len(q), rows):
            v, k = torch.cdist(q[i:i + rows], rb, compute_mode="use_mm_for_euclid_dist").min(dim=1)
            better = v < best[i:i + rows]
            best[i:i + rows] = torch.where(better, v, best[i:i + rows])
            idx[i:i + rows] = torch.where(better, k + j, idx[i:i + rows])
    q0 = torch.as_tensor(np.asarray(queries).reshape(len(queries), -1)).double()
    win = torch.as_tensor(r[idx.numpy()]).double()
    return (q0 - win).norm(dim=1).numpy() * scale, idx.numpy()


def dcr_statistics(d_mem, i_mem, d_ho, i_ho, labels_mem, labels_ho, alpha: float = 0.05,
                   effect: float = 0.1, seed: int = 0, permutations: int = PERMUTATIONS) -> dict:
    """For each synthetic image, is its nearest record a member (vote 1), a
    held-out image (0) or both at once (1/2 each)? Members and held-out images
    may differ in number per class: with q_c = share of members among the
    class-c references, a vote for a member counts 1/(2 q_c) and one for a
    held-out image 1/(2 (1 - q_c)), which makes the ``share`` of member votes
    1/2 in expectation when the two sets are exchangeable within each class
    (and equal to the raw share for equal-size references). Its null is
    drawn by permuting the member / held-out labels within each class (exact
    for that hypothesis, whatever the nearest-neighbour 'hubs')."""
    d_mem, d_ho = np.asarray(d_mem, np.float64), np.asarray(d_ho, np.float64)
    lm, lh = np.asarray(labels_mem), np.asarray(labels_ho)
    n, n_m = len(d_mem), len(lm)
    closer, tie = d_mem < d_ho, d_mem == d_ho
    wm = closer + 0.5 * tie  # vote mass for the nearest member, the rest for the nearest held-out
    ref = np.r_[np.asarray(i_mem), n_m + np.asarray(i_ho)]
    mass = np.r_[wm, 1.0 - wm]
    ids, inv = np.unique(ref, return_inverse=True)  # only references that got a vote matter
    votes = np.bincount(inv, weights=mass)
    is_mem = ids < n_m
    cls = np.where(is_mem, lm[np.minimum(ids, n_m - 1)], lh[np.maximum(ids - n_m, 0)])
    classes = np.union1d(lm, lh)
    cnt_m = {c: int(np.sum(lm == c)) for c in classes}
    cnt_h = {c: int(np.sum(lh == c)) for c in classes}
    q = np.array([cnt_m[c] / (cnt_m[c] + cnt_h[c]) for c in cls])
    a, b = votes * 0.5 / np.maximum(q, 1e-12), votes * 0.5 / np.maximum(1 - q, 1e-12)

    def stat(mask):  # mask [..., voted refs]: which are members
        num = (mask * a).sum(-1)
        return num / np.maximum(num + (~mask * b).sum(-1), 1e-300)

    share = float(stat(is_mem))
    rng = np.random.default_rng([seed, 41])
    null = []
    for k0 in range(0, permutations, 200):
        p = min(200, permutations - k0)
        mask = np.zeros((p, len(ids)), bool)
        for c in classes:
            j = np.nonzero(cls == c)[0]
            if len(j) == 0:
                continue
            # members among the voted class-c refs ~ hypergeometric; which ones: uniform
            k = rng.hypergeometric(cnt_m[c], cnt_h[c], len(j), size=p)
            ranks = np.argsort(np.argsort(rng.random((p, len(j))), axis=1), axis=1)
            mask[:, j] = ranks < k[:, None]
        null.append(stat(mask))
    null = np.concatenate(null)
    p_perm = float((1 + np.sum(null >= share - 1e-12)) / (1 + len(null)))
    min_det = float(null.mean() + (norm.ppf(1 - alpha) + _Z_POWER) * null.std())
    raw = float(wm.mean())
    expected = float(np.sum(votes * q) / n)  # raw share the null expects
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d_ho > 0, d_mem / d_ho, np.where(d_mem > 0, np.inf, 1.0))
    out = {"share": share, "share_raw": raw, "share_raw_expected": expected, "p_value": p_perm,
           "binom_p_value": float(binomtest(int(np.floor(wm.sum())), n, min(expected, 1.0),
                                            alternative="greater").pvalue),
           "min_detectable_share": min(min_det, 1.0),
           "median_dcr_train": float(np.median(d_mem)), "median_dcr_heldout": float(np.median(d_ho)),
           "median_ratio": float(np.median(ratio)), "images": n,
           "references_train": n_m, "references_heldout": len(lh)}
    out["verdict"] = ("inconclusive" if n < 2 or min(n_m, len(lh)) < 2 else
                      _verdict(p_perm, share, out["min_detectable_share"], alpha, effect))
    return out


def distance_to_closest_record(synthetic: ImageSet, members: ImageSet, heldout: ImageSet,
                               features: Callable[[np.ndarray], np.ndarray] | None = None,
                               feature_images: int = 0, alpha: float = 0.05, effect: float = 0.1,
                               seed: int = 0, pairs: int = 16) -> dict:
    """DCR in pixel space ([0, 1] pixels, L2) against EVERY member, so a copy
    of any training image counts; and, with ``features`` (uint8 [N,H,W,C] ->
    [N, D]), in that space on ``feature_images`` synthetic images against
    ``feature_images`` class-matched member / held-out pairs (a feature pass
    over the whole training set is too costly on CPU, so there only copies of
    the sampled members count). Returns {'pixel': stats, 'feature': stats (if
    run), 'pairs': (synthetic, member, held-out) indices of the ``pairs``
    closest synthetic / member pairs}."""
    if min(len(members), len(heldout), len(synthetic)) < 1:
        raise DataError(f"DCR needs members, held-out and synthetic images, got {len(members)}, "
                        f"{len(heldout)}, {len(synthetic)}")
    if synthetic.shape != members.shape or members.shape != heldout.shape:
        raise DataError(f"synthetic {synthetic.shape}, member {members.shape} and held-out "
                        f"{heldout.shape} images differ in shape (H,W,C)")
    d_m, i_m = nearest(synthetic.images, members.images, 1 / 255)
    d_h, i_h = nearest(synthetic.images, heldout.images, 1 / 255)
    out = {"pixel": dcr_statistics(d_m, i_m, d_h, i_h, members.labels, heldout.labels,
                                   alpha, effect, seed)}
    order = np.argsort(d_m, kind="stable")[:pairs]
    out["pairs"] = (order, i_m[order], i_h[order])
    fm_set, fh_set = matched_references(members, heldout, feature_images, seed)
    k = min(feature_images, len(synthetic), len(fm_set))
    if features is not None and k >= 2:
        sub = np.random.default_rng([seed, 47]).choice(len(synthetic), k, replace=False)
        fs = features(synthetic.images[np.sort(sub)])
        fm, fh = features(fm_set.images[:k]), features(fh_set.images[:k])
        a, ia = nearest(fs, fm)
        b, ib = nearest(fs, fh)
        out["feature"] = dcr_statistics(a, ia, b, ib, fm_set.labels[:k], fh_set.labels[:k],
                                        alpha, effect, seed)
    return out


def pairs_grid_png(synthetic: ImageSet, members: ImageSet, heldout: ImageSet, pairs,
                   scale: int = 2) -> bytes:
    """PNG: one column per pair; rows = synthetic image, its nearest MEMBER
    (a sensitive training image), its nearest held-out image; exact pixels."""
    si, mi, hi = (np.asarray(p) for p in pairs)
    h, w, c = synthetic.shape
    grid = np.full((3 * h + 2, max(1, len(si)) * (w + 1), c), 255, np.uint8)
    for j, (a, b, d) in enumerate(zip(si, mi, hi)):
        for r, im in enumerate((synthetic.images[a], members.images[b], heldout.images[d])):
            grid[r * (h + 1):r * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = im
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(buf, format="PNG")
    return buf.getvalue()


def reconstruction_errors(reconstruct: Callable, images: ImageSet, sigma: float, seed: int = 0,
                          batch_size: int = 250) -> np.ndarray:
    """Per-image mean squared error (in [-1, 1] units) of the one-step
    reconstruction reconstruct(x, eps, sigma, y) of x (for a pixel model
    the denoiser on x + sigma * eps); eps is seeded per (seed, position),
    so pair i of two sets sees the same noise."""
    def err(x, y, s, noise):
        x0 = reconstruct(x, noise, torch.full((len(x),), float(s), dtype=x.dtype), y)
        return ((x0.clamp(-1, 1) - x) ** 2).flatten(1).mean(1)

    # loss_threshold_scores returns -(mean loss); with one level it is -error
    return -loss_threshold_scores(err, images, noise_levels=(float(sigma),), seed=seed,
                                  batch_size=batch_size)


def reconstruction_attack(reconstruct: Callable | None, members: ImageSet, heldout: ImageSet,
                          noise_levels: Sequence[float] = (0.5, 1.0, 2.0), alpha: float = 0.05,
                          effect: float = 0.1, seed: int = 0, reason: str = "") -> dict:
    """Members vs held-out reconstruction errors per noise level: median
    errors, AUC = P(member error < held-out error), one-sided Mann-Whitney U
    p-value (Bonferroni-adjusted over the levels), and one verdict (the
    strongest level). ``reconstruct`` None -> 'not applicable' with ``reason``."""
    if reconstruct is None:
        return {"verdict": "not applicable",
                "reason": reason or "the family has no one-step reconstruction"}

    n1, n2 = len(members), len(heldout)
    if n1 < 2 or n2 < 2:
        return {"verdict": "inconclusive", "reason": f"{n1} members and {n2} held-out images",
                "levels": {}, "members": n1, "heldout": n2}
    L = len(noise_levels)
    # the smallest AUC the Bonferroni-corrected test detects with 80% power (normal approx.)
    se0 = np.sqrt((n1 + n2 + 1) / (12.0 * n1 * n2))
    min_det = float(min(1.0, 0.5 + (norm.ppf(1 - alpha / L) + _Z_POWER) * se0))
    levels, best = {}, None
    for s in noise_levels:
        em = reconstruction_errors(reconstruct, members, s, seed)
        eh = reconstruction_errors(reconstruct, heldout, s, seed)
        u = mannwhitneyu(em, eh, alternative="less")
        auc = 1.0 - float(u.statistic) / (n1 * n2)  # U counts pairs member > held-out
        lv = {"auc": auc, "p_value": float(min(1.0, u.pvalue * L)),
              "median_error_member": float(np.median(em)),
              "median_error_heldout": float(np.median(eh))}
        lv["median_ratio"] = lv["median_error_member"] / max(lv["median_error_heldout"], 1e-12)
        levels[float(s)] = lv
        if best is None or (lv["p_value"], -auc) < (best[1]["p_value"], -best[1]["auc"]):
            best = (float(s), lv)
    sigma, lv = best
    return {"verdict": _verdict(lv["p_value"], lv["auc"], min_det, alpha, effect),
            "sigma": sigma, "auc": lv["auc"], "p_value": lv["p_value"],
            "median_ratio": lv["median_ratio"], "min_detectable_auc": min_det,
            "levels": levels, "members": n1, "heldout": n2}


def _message(name: str, r: dict, stat: str) -> str:
    v = r["verdict"]
    if v == "not applicable":
        return f"{name}: not applicable ({r.get('reason', '')})"
    if stat not in r:
        return f"{name}: inconclusive ({r.get('reason', 'too few images')})"
    tail = {"memorisation": "MEMORISATION: the release favours its training records",
            "no evidence": "no evidence of memorisation",
            "inconclusive": "inconclusive: too few images to rule it out"}[v]
    md = r.get("min_detectable_share", r.get("min_detectable_auc"))
    return f"{name}: {stat} {r[stat]:.3f} (chance 0.5, p = {r['p_value']:.3g}; {md:.3f} " \
           f"detectable) -> {tail}"


def run_memorisation(ecfg, synthetic: ImageSet, members: ImageSet, heldout: ImageSet, *,
                     reconstruct: Callable | None = None, no_reconstruction: str = "",
                     seed: int = 0,
                     feature_fn: Callable | None = None) -> tuple[dict, dict]:
    """Both checks with the ``evaluation.memorisation_*`` settings: DCR of
    ``memorisation_images`` synthetic images against all ``members`` and all
    ``heldout`` images; the reconstruction attack on
    ``memorisation_reconstruction_images`` class-matched pairs. Returns
    (metrics: memorisation_* floats, info: verdict messages, the pair grid's
    PNG when ``memorisation_show_pairs``, the settings)."""
    if len(members) < 2 or len(heldout) < 2:
        raise DataError(f"memorisation checks need >= 2 members and held-out images, have "
                        f"{len(members)} and {len(heldout)}")
    rng = np.random.default_rng([seed, 43])
    n = min(ecfg.memorisation_images, len(synthetic))
    syn = synthetic.subset(np.sort(rng.choice(len(synthetic), n, replace=False)), "memorisation")
    # family-wise level alpha over the (up to) three checks (module docstring)
    kw = dict(alpha=ecfg.memorisation_alpha / CHECKS, effect=ecfg.memorisation_effect, seed=seed)
    dcr = distance_to_closest_record(syn, members, heldout, features=feature_fn,
                                     feature_images=ecfg.memorisation_feature_images, **kw)
    rm, rh = matched_references(members, heldout, ecfg.memorisation_reconstruction_images, seed)
    rec = reconstruction_attack(reconstruct, rm, rh, ecfg.memorisation_noise_levels,
                                reason=no_reconstruction, **kw)
    m: dict[str, float] = {}
    info = {"messages": [], "verdicts": {}, "grid_png": None,
            "config": {k: getattr(ecfg, k) for k in (
                "memorisation_images", "memorisation_heldout", "memorisation_reconstruction_images",
                "memorisation_feature_images",
                "memorisation_noise_levels", "memorisation_alpha", "memorisation_effect")}}
    for space in ("pixel", "feature"):
        if space not in dcr:
            continue
        r = dcr[space]
        for k in ("share", "share_raw", "share_raw_expected", "p_value", "binom_p_value",
                  "min_detectable_share", "median_ratio", "median_dcr_train",
                  "median_dcr_heldout", "images", "references_train", "references_heldout"):
            m[f"memorisation_dcr_{space}_{k}"] = float(r[k])
        m[f"memorisation_dcr_{space}_verdict"] = VERDICT_CODES[r["verdict"]]
        info["verdicts"][f"dcr_{space}"] = r["verdict"]
        info["messages"].append(_message(f"DCR ({space} space)", r, "share"))
    info["verdicts"]["reconstruction"] = rec["verdict"]
    info["messages"].append(_message("reconstruction attack", rec, "auc"))
    if rec["verdict"] in VERDICT_CODES:
        m["memorisation_recon_verdict"] = VERDICT_CODES[rec["verdict"]]
        m["memorisation_recon_members"] = float(rec["members"])
        for k in ("auc", "p_value", "median_ratio", "min_detectable_auc", "sigma"):
            if k in rec:
                m[f"memorisation_recon_{k}"] = float(rec[k])
        for s, lv in rec.get("levels", {}).items():
            for k, v in lv.items():
                m[f"memorisation_recon_sigma{s:g}_{k}"] = float(v)
    codes = [v for v in info["verdicts"].values() if v in VERDICT_CODES]
    if codes:  # 1: a check found memorisation; else 0 all clear, -1 some inconclusive
        m["memorisation_detected"] = (1.0 if "memorisation" in codes
                                      else min(VERDICT_CODES[v] for v in codes))
    if ecfg.memorisation_show_pairs:
        info["grid_png"] = pairs_grid_png(syn, members, heldout, dcr["pairs"])
    return m, info
